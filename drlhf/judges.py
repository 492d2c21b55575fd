"""Judges without a human, for `label.py --auto` (AI feedback, tests and gold preferences): a scoring function of
images (B, C, H, W) in [-1, 1] and their prompts, higher preferred, ranks each task through the same binary
insertion sort a human's answers go through, every comparison recorded as a decision.

    scorer = load_scorer("builtin:ink")          # or module:function, importable from the working directory
    auto_label(store, project, annotator, tasks, dataset, scorer)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from drlhf.labels import LabelError, placement, replay
from drlhf.rewards import checked, colorfulness_reward, import_function


def load_scorer(spec: str):
    """--auto SPEC -> a scoring function of images (B, C, H, W) in [-1, 1] and prompts, higher preferred; the
    built-in ones also serve as gold functions elsewhere (--eval-reward label:ink_score)."""
    builtin = {"ink": ink_score, "stroke": stroke_score}
    if spec.startswith("builtin:"):
        name = spec[8:]
        if name == "colorfulness":
            return lambda images, prompts=None: colorfulness_reward(images)
        if name not in builtin:
            raise LabelError(f"--auto {spec}: built-in scorers are builtin:ink, builtin:stroke, builtin:colorfulness")
        return builtin[name]
    if ":" not in spec:
        raise LabelError(f"--auto {spec}: give builtin:NAME or module:function")
    fn = import_function(spec, "--auto")
    score = checked(lambda images, cond, prompts: fn(images, prompts), spec, "--auto", user_code=True)  # errors name it
    return lambda images, prompts=None: score(images, None, prompts)


# -------- Scoring functions for --auto (AI feedback, tests): images (B, C, H, W) in [-1, 1], prompts -> scores ---
def ink_score(images, prompts=None):
    """Mean brightness: ink coverage of white-on-black digits."""
    return images.float().mean((1, 2, 3))


def stroke_score(images, prompts=None):
    """Share of bright pixels (> 0.5 on [0, 1]), a stroke-thickness proxy."""
    return ((images.float() + 1) / 2 > 0.5).float().mean((1, 2, 3))


def auto_label(store, project, annotator, tasks, dataset: Path, scorer, quiet=False):
    """Rank every unfinished task by the scorer, recording each comparison the sort asks as a decision."""
    state = replay(store.events(project["name"], annotator), tasks, project)
    for task in tqdm([t for t in tasks if not state.sorters[t["task_id"]].done], desc=f"auto-labeling ({annotator})",
                     disable=quiet):
        arrays = [np.asarray(Image.open(dataset / p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in task["images"]]
        images = torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2)
        if all(np.allclose(a[..., 0], a[..., 1]) and np.allclose(a[..., 0], a[..., 2]) for a in arrays):
            images = images[:, :1]  # greyscale
        scores = torch.as_tensor(scorer(images, [task.get("prompt")] * len(arrays))).float().flatten().tolist()
        if len(scores) != len(arrays) or not all(math.isfinite(s) for s in scores):
            raise LabelError(f"--auto: the scorer returned {scores} for task {task['task_id']}; need one finite "
                             "score per image")
        sorter, events = state.sorters[task["task_id"]], []
        while (pair := sorter.next_pair()) is not None:
            a, b = pair
            outcome = "tie" if scores[a] == scores[b] else ("a" if scores[a] > scores[b] else "b")
            left, right = placement(project["name"], annotator, task["task_id"], sorter.decisions, a, b)
            events.append(("decision", task["task_id"], dict(a=a, b=b, left=left, right=right, outcome=outcome,
                                                            ms=0, auto=True)))
            sorter.apply(a, b, outcome)
        store.append_many(project["name"], annotator, events)
