"""A blind comparison of two models (thesis 8.1): the pairs, judges without a human, the report."""
import json

import numpy as np
from PIL import Image

from test_hardening import fails


def brighter_model(folder, cache_dir):
    """toy:digit4 (8 steps) with its output layer's bias lowered: every sample comes out brighter."""
    import shutil

    import torch
    from diffusers import DDPMPipeline

    from drlhf import toys
    src = toys.toy_model_dir("digit4", cache_dir, 8)
    pipe = DDPMPipeline.from_pretrained(src)
    with torch.no_grad():
        pipe.unet.conv_out.bias -= 0.5
    pipe.save_pretrained(folder)
    shutil.copy(src / "drlhf_toy.json", folder / "drlhf_toy.json")
    return folder


def test_a_blind_comparison_reports_the_judges_preference_with_its_interval(run, tmp_path):
    b, ds = brighter_model(tmp_path / "B", run.cache_dir), tmp_path / "ab"
    common = ["sample.py", "--toy-train-steps", "8", "--compare", b, "--k", "2", "--num-steps", "3", "--out", ds]
    run(*common, "--num-tasks", "300", "--batch-size", "100")
    key = json.loads((ds / "comparison.json").read_text())
    tasks = [json.loads(line) for line in (ds / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 300 and 100 < sum(s == "ab" for s in key["sides"]) < 200  # sides shuffled per task
    for t in tasks:  # one image of each model, from the same seed; the files name no model
        assert t["seeds"][0] == t["seeds"][1] and all("task_" in p for p in t["images"])
        ink = [np.asarray(Image.open(ds / p), dtype=float).mean() for p in t["images"]]
        assert ink[key["sides"][t["task_id"]].index("b")] > ink[key["sides"][t["task_id"]].index("a")]
    run("label.py", "--auto", "tests.helpers:prefers_brighter_70", ds, "--annotator", "judge70")
    run("label.py", "--auto", "tests.helpers:cannot_tell", ds, "--annotator", "coin")
    proc = run("label.py", "winrate", ds)
    assert "win rate" in proc.stdout and (ds / "winrate.png").stat().st_size > 1000
    report = json.loads((ds / "report.json").read_text())
    judge, coin = report["annotators"]["judge70"], report["annotators"]["coin"]
    assert judge["judgments"] == coin["judgments"] == 300
    assert judge["ci95"][0] < 0.7 < judge["ci95"][1] and judge["ci95"][0] > 0.5, judge  # B preferred, about 70 %
    assert coin["ci95"][0] < 0.5 < coin["ci95"][1], coin                                # no preference
    assert report["overall"]["judgments"] == 600 and report["agreement"][0]["shared_tasks"] == 300
    assert "bootstrap over tasks" in report["interval"]  # one condition (an unconditional model): clusters are tasks
    # the dataset refuses other settings when resumed, and a comparison needs pairs
    fails(run(*common, "--num-tasks", "300", "--batch-size", "100", "--compare", tmp_path / "other", check=False),
          "--compare")
    fails(run("sample.py", "--toy-train-steps", "8", "--compare", b, "--k", "3", "--out", tmp_path / "k3", check=False),
          "--k 3")
    plain = tmp_path / "plain"  # a labeling dataset that is no comparison has no key to report by
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "2", "--num-tasks", "2", "--k", "2", "--out", plain)
    run("label.py", "--auto", "builtin:ink", plain)
    fails(run("label.py", "winrate", plain, check=False), "comparison.json", "--compare")
