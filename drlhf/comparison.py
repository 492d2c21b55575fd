"""A blind human comparison of two models (thesis 8.1, "Blind Human Evaluation"): do people prefer model B's images
to model A's, and how sure are we?

    python sample.py --pretrained A --compare B --k 2 --num-tasks 300 --out datasets/a-vs-b   # the pairs
    python label.py label datasets/a-vs-b --annotator alice        # or --auto module:function (a judge)
    python label.py winrate datasets/a-vs-b                        # report.json, winrate.png, report_winrate.md

Each task holds one image of A and one of B with the same condition, initial noise and step noise; which of the two
image slots is B is drawn per task from the seed and kept in `comparison.json` (the key), which label.py never
shows: the screen names no model and, with the labeler's own left/right shuffle, orders none. Ties and "both bad"
are answered as in labeling, by any number of annotators, each log as resumable and SIGKILL-safe as labeling's.

The win rate of B over A counts a tie as half a win: (wins_B + ties / 2) / judgments. Its 95 % interval is a
percentile bootstrap (2,000 resamples, seeded) over conditions (prompts or classes) where there are at least 10 of
them, else over tasks, resampling whole clusters with all their annotators' judgments: judgments of one prompt are
not independent. Annotators' agreement is the share of shared tasks answered alike (A, B or tie) and Cohen's kappa.
"""
from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from drlhf import models, pictures
from drlhf.distributed import autocast
from drlhf.files import write_json
from drlhf.labels import LabelError, replay
from drlhf.sampler import rollout

KEY_FILE = "comparison.json"
BOOTSTRAP = 2000


def write_key(out: Path, model_a: str, model_b: str, num_tasks: int, seed: int):
    """The key of a comparison dataset: per task, "ab" (image 0 is A's) or "ba", a fair coin from the seed."""
    rng = random.Random(seed * 7919 + 17)
    write_json(Path(out) / KEY_FILE, dict(model_a=model_a, model_b=model_b, seed=seed,
                                          sides=["ab" if rng.random() < 0.5 else "ba" for _ in range(num_tasks)]))


def read_key(dataset: Path, num_tasks: int | None = None) -> dict:
    """The key of a comparison dataset, checked: both models named and a side ("ab" or "ba") for each of its
    `num_tasks` tasks (task ids 0..num_tasks-1). An edited or damaged key is one LabelError naming the file."""
    path = Path(dataset) / KEY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{dataset}: no {KEY_FILE}; a comparison dataset is made by `sample.py --compare`")
    try:
        key = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelError(f"{path} is not valid JSON ({e}); restore it from a copy: without it no judgment says "
                         "which model won") from None
    sides = key.get("sides") if isinstance(key, dict) else None
    problem = ("it is not an object with model_a, model_b and sides" if not isinstance(key, dict) or
               not all(k in key for k in ("model_a", "model_b", "sides")) else
               "its sides are not a list of \"ab\" / \"ba\"" if not isinstance(sides, list) or
               any(s not in ("ab", "ba") for s in sides) else
               f"it has sides for {len(sides)} tasks and the dataset has {num_tasks}"
               if num_tasks is not None and len(sides) < num_tasks else None)
    if problem:
        raise LabelError(f"{path}: {problem}; the key was edited or damaged: restore it from a copy (it is written "
                         "once by sample.py --compare)")
    return key


@torch.no_grad()
def pair_up(samples_a, images_a, other, schedule, x_T, cond, seed: int, sides: list[str], precision: str,
            guidance_scale: float):
    """Model B (`other`, a models.BaseModel, with its own `schedule` and conditioning `cond`: its scheduler and text
    encoder) from the very noise A's `samples_a` (n, ...) came from: the same x_T and a step-noise generator of the
    same `seed`. Returns samples and images (2n, ...), task n's two rows in the order its side says."""
    g = torch.Generator(x_T.device).manual_seed(seed)
    with autocast(precision, x_T.device):
        samples_b = rollout(models.make_denoiser(other, guidance_scale).eval(), schedule, x_T, cond, generator=g).samples
    images_b = other.decode(samples_b)
    order = lambda a, b: torch.stack([torch.stack([a[n], b[n]] if s == "ab" else [b[n], a[n]])  # noqa: E731
                                      for n, s in enumerate(sides)]).flatten(0, 1)
    return order(samples_a, samples_b), order(images_a, images_b)


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------
def judgments(state, key: dict) -> dict:
    """task id -> {"winner": "A", "B" or "tie", "both_bad"} for one annotator's replayed state (drlhf.labels.replay):
    a decision names the preferred image's index (e["a"] or e["b"]), the key says whose image that is."""
    out = {}
    for e in state.decisions:
        t = e["task_id"]
        winner = "tie" if e["outcome"] == "tie" else key["sides"][t][e[e["outcome"]]].upper()
        out[t] = dict(winner=winner, both_bad=len(state.both_bad[t]) == 2)
    return out


def win_rate(rows: list[dict]) -> float:
    """(wins of B + ties / 2) / judgments."""
    return (sum(r["winner"] == "B" for r in rows) + 0.5 * sum(r["winner"] == "tie" for r in rows)) / max(len(rows), 1)


def interval(rows: list[dict], seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the win rate, resampling clusters (rows' "cluster") whole."""
    clusters = {}
    for r in rows:
        clusters.setdefault(r["cluster"], []).append(r)
    groups = list(clusters.values())
    if not groups:
        return float("nan"), float("nan")
    wins = np.array([win_rate(g) * len(g) for g in groups])
    sizes = np.array([len(g) for g in groups])
    pick = np.random.default_rng(seed).integers(0, len(groups), (BOOTSTRAP, len(groups)))
    rates = wins[pick].sum(1) / sizes[pick].sum(1)
    return float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))


def summary(rows: list[dict], seed: int = 0) -> dict:
    lo, hi = interval(rows, seed)
    n = len(rows)
    return dict(judgments=n, wins_b=sum(r["winner"] == "B" for r in rows), wins_a=sum(r["winner"] == "A" for r in rows),
                ties=sum(r["winner"] == "tie" for r in rows), both_bad=sum(r["both_bad"] for r in rows),
                win_rate_b=win_rate(rows), ci95=[lo, hi], tie_rate=sum(r["winner"] == "tie" for r in rows) / max(n, 1))


def agreement(per_annotator: dict) -> list[dict]:
    """Each pair of annotators: shared tasks, the share answered alike (A, B or tie), Cohen's kappa."""
    out = []
    for x, y in combinations(sorted(per_annotator), 2):
        shared = sorted(set(per_annotator[x]) & set(per_annotator[y]))
        a = [per_annotator[x][t]["winner"] for t in shared]
        b = [per_annotator[y][t]["winner"] for t in shared]
        observed = sum(u == v for u, v in zip(a, b)) / max(len(shared), 1)
        chance = sum((a.count(c) / max(len(a), 1)) * (b.count(c) / max(len(b), 1)) for c in ("A", "B", "tie"))
        kappa = (observed - chance) / (1 - chance) if chance < 1 else float("nan")
        out.append(dict(annotators=[x, y], shared_tasks=len(shared), agreement=observed, cohen_kappa=kappa))
    return out


def report(dataset: Path, key: dict, per_annotator: dict, tasks: list[dict], out: Path, seed: int = 0) -> dict:
    """report.json (overall, per annotator, per condition, agreement) and winrate.png in `out`; returns it."""
    condition = {t["task_id"]: str(t.get("prompt", t.get("class_label", "(unconditional)"))) for t in tasks}
    by_condition = len(set(condition.values())) >= 10
    rows = [dict(r, task=t, annotator=a, condition=condition[t], cluster=condition[t] if by_condition else t)
            for a, judged in per_annotator.items() for t, r in judged.items()]
    conditions = sorted({r["condition"] for r in rows})
    result = dict(model_a=key["model_a"], model_b=key["model_b"], dataset=str(dataset),
                  win_rate="(wins of B + ties / 2) / judgments",
                  interval=f"95 % percentile bootstrap over {'conditions' if by_condition else 'tasks'}, "
                           f"{BOOTSTRAP} resamples",
                  overall=summary(rows, seed),
                  annotators={a: summary([r for r in rows if r["annotator"] == a], seed) for a in per_annotator},
                  conditions={c: summary([dict(r, cluster=r["task"]) for r in rows if r["condition"] == c], seed)
                              for c in conditions},
                  agreement=agreement(per_annotator))
    write_json(out / "report.json", result)
    pictures.win_rate_png(result, out / "winrate.png")
    return result


def report_from_store(dataset: Path, store, project, tasks: list[dict], out: Path, seed: int = 0) -> tuple[dict, dict]:
    """`label.py winrate`: every annotator's answers in a label store (drlhf.labels) -> (the key, the overall row),
    with report.json and winrate.png written to `out`."""
    key = read_key(dataset, 1 + max(t["task_id"] for t in tasks))
    judged = {a: judgments(replay(store.events(project["name"], a), tasks, project), key)
              for a in store.annotators(project["name"])}
    judged = {a: j for a, j in judged.items() if j}  # an annotator who judged nothing yet has no win rate
    if not judged:
        raise LabelError(f"{dataset}: no judgments yet in project {project['name']!r}: nothing to report. Label the "
                         f"pairs first (python label.py label {dataset}, or --auto module:function), then run winrate")
    return key, report(dataset, key, judged, tasks, out, seed)["overall"]
