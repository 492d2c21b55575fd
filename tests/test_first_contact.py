"""What a new user meets first (issue 36): one process per output folder (two real processes each time), models
and runs put side by side only when they fit, flags refused in one line before any work, defaults that follow the
model, a suite that leaves the checkout alone, and `--help` that shows the presets in their groups."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY
from test_hardening import digest, fails

SAMPLE = ["--toy-train-steps", "8", "--num-steps", "2"]


def script_env(run) -> dict:
    return dict(os.environ, DRLHF_CACHE=str(run.cache_dir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT))


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def holder(folder, kind, flag="--out"):
    """Another live process holding `folder` as drlhf.files.hold_folder does; yields its pid, SIGKILLed after."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from drlhf.files import hold_folder; "
        f"hold_folder({str(folder)!r}, {kind!r}, {flag!r}); print('held', flush=True); time.sleep(120)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------
# one process per output folder
# ---------------------------------------------------------------------------------------------------------
def test_two_runs_started_together_into_one_folder_one_trains_the_other_is_refused(run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, ROOT / "train_ppo.py", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--output-dir", out]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=script_env(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 1], [err[-500:] for _, _, err in results]
    refused = next(err for code, _, err in results if code == 1)
    assert "Traceback" not in refused and refused.strip().splitlines()[-1].startswith("error: --output-dir")
    assert "in use by another process" in refused or "already holds a run" in refused  # which, depends on timing
    assert len(list((out / "tb").iterdir())) == 1  # one run's events, not two
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_00001", "epoch_00002", "latest"]
    assert all((c / "state.pt").exists() for c in (out / "checkpoints").glob("epoch_*"))  # none left empty
    assert not (tmp_path / ".run.lock").exists()  # the finished run let go of its folder


def test_a_live_run_refuses_a_second_process_and_a_killed_one_blocks_nothing(run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, ROOT / "train_ppo.py", *TINY, "--epochs", "500", "--eval-every", "100",
                             "--checkpoint-every", "1", "--output-dir", out], cwd=tmp_path, env=script_env(run),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), "the first checkpoint")
        for flags in ([*TINY, "--epochs", "1", "--output-dir", out],   # a new run, a resume with another learning rate
                      ["--resume", out, "--epochs", "600", "--policy-lr", "1e-4"]):
            fails(run("train_ppo.py", *flags, check=False), f"--output-dir {out}", "in use by another process",
                  f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == ["run"]  # no branch of a live run either
    epoch = int((out / "checkpoints" / "latest").read_text().strip()[6:])
    run("train_ppo.py", "--resume", out, "--epochs", str(epoch + 1))  # a killed run holds no lock
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == epoch + 1 and summary["lineage"]["rounds"][-1]["resumes"][0]["from_epoch"] == epoch


def test_reward_model_dataset_and_eval_folders_take_one_process_each(run, tmp_path):
    ds = tmp_path / "ds"
    run("sample.py", *SAMPLE, "--num-tasks", "4", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    for script, flags, folder, kind in (
            ("train_reward.py", ["--dataset", ds, "--epochs", "1"], tmp_path / "rm", "a reward model"),
            ("sample.py", [*SAMPLE, "--num-tasks", "4", "--k", "3"], ds, "a labeling dataset"),  # another one finishes it
            ("sample.py", ["eval", "--toy-train-steps", "8", "--num-steps", "2", "--num-samples", "2"], tmp_path / "ev",
             "an evaluation")):
        before = digest(ds)
        with holder(folder, kind) as pid:
            fails(run(script, *flags, "--out", folder, check=False), f"--out {folder}", "in use", f"pid {pid}")
        assert digest(ds) == before
        run(script, *flags, "--out", folder)  # the holder is gone: the same command runs
    assert (tmp_path / "rm" / "model.safetensors").exists() and (tmp_path / "ev" / "scores.json").exists()


def test_no_script_writes_into_another_scripts_kind_of_folder(run, tmp_path):
    kinds = {"run": ["args.json", "summary.json"], "rm": ["model.safetensors", "config.json"],
             "ds": ["dataset.json", "tasks.jsonl"], "ev": ["scores.json"]}
    for name, markers in kinds.items():
        (tmp_path / name).mkdir()
        for m in markers:
            (tmp_path / name / m).write_text("{}")
    before = digest(tmp_path)
    for cmd, flag, own in ((["train_ppo.py", *TINY, "--epochs", "1", "--replace-run", "true"], "--output-dir", "run"),
                           (["train_reward.py", "--dataset", tmp_path / "ds", "--replace-out", "true"], "--out", "rm"),
                           (["sample.py", *SAMPLE], "--out", "ds"), (["sample.py", "eval", *SAMPLE], "--out", "ev")):
        for name in kinds.keys() - {own}:
            fails(run(*cmd, flag, tmp_path / name, check=False), f"{flag} {tmp_path / name} holds", "would mix")
    assert digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(kinds)  # no lock file left either


@pytest.mark.parametrize("script,flag,value,where", [
    ("train_ppo.py", "--kl-coef", "nan", "--output-dir"), ("train_ppo.py", "--policy-lr", "inf", "--output-dir"),
    ("train_ppo.py", "--seed", "-5", "--output-dir"), ("train_reward.py", "--lr", "nan", "--out"),
    ("train_reward.py", "--guidance", "-inf", "--out"), ("sample.py", "--guidance-scale", "inf", "--out"),
    ("sample.py", "--seed", "-5", "--out")])
def test_non_finite_numbers_and_negative_seeds_are_refused_when_flags_are_parsed(run, tmp_path, script, flag, value,
                                                                                   where):
    out = tmp_path / "out"
    proc = run(script, f"{flag}={value}", where, out, "--pretrained", tmp_path / "never-loaded", check=False)
    fails(proc, flag, value)  # before the model: --pretrained names a folder that does not exist
    assert sorted(os.listdir(tmp_path)) == []  # no folder and no lock left to block the corrected command


def test_a_corrected_command_runs_where_a_refused_one_stopped(run, tmp_path):
    out = tmp_path / "run"
    fails(run("train_ppo.py", *TINY, "--epochs", "1", "--kl-coef", "nan", "--output-dir", out, check=False), "--kl-coef")
    run("train_ppo.py", *TINY, "--epochs", "1", "--kl-coef", "0.01", "--output-dir", out)
    assert (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------------
# models and runs side by side
# ---------------------------------------------------------------------------------------------------------
def test_eval_refuses_a_run_of_another_base_model(run, tmp_path):
    r = tmp_path / "r"
    run("train_ppo.py", *TINY, "--epochs", "1", "--checkpoint-every", "1", "--output-dir", r)
    common = ["sample.py", "eval", "--num-steps", "5", "--num-samples", "2", "--reward", "target"]
    for policy in (r, r / "checkpoints" / "epoch_00001", r / "final_policy"):  # run, checkpoint, pipeline + lineage
        fails(run(*common, "--toy-train-steps", "9", "--checkpoints", policy, "--out", tmp_path / "ev9", check=False),
              f"--checkpoints {policy}", "--pretrained toy:digit4", "root fingerprint")
    assert not (tmp_path / "ev9").exists()
    fails(run(*common, "--pretrained", "toy:digit4-flow", "--checkpoints", r, "--out", tmp_path / "evf", check=False),
          f"--checkpoints {r}", "flow")
    run(*common, "--toy-train-steps", "8", "--checkpoints", f"{r},{r / 'final_policy'}", "--out", tmp_path / "ev")
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert list(scores["reward"]) == ["base", "r", "final_policy"]  # the run's own base model: it fits
    shutil.copytree(r, tmp_path / "copy")  # two policies of one folder name: each keeps its own numbers
    run(*common, "--toy-train-steps", "8", "--checkpoints", f"{r / 'final_policy'},{tmp_path / 'copy' / 'final_policy'}",
        "--out", tmp_path / "ev2")
    scores = json.loads((tmp_path / "ev2" / "scores.json").read_text())
    assert list(scores["reward"]) == ["base", "r/final_policy", "copy/final_policy"]
    assert (tmp_path / "ev2" / "histogram_reward_copy-final_policy.png").exists()


def test_compare_refuses_a_model_of_another_kind_and_names_its_flag(run, tmp_path):
    common = ["sample.py", *SAMPLE, "--num-tasks", "2", "--k", "2"]
    fails(run(*common, "--compare", "toy:digit4-flow", "--out", tmp_path / "a", check=False),
          "--compare toy:digit4-flow", "--pretrained toy:digit4", "flow True against False")
    fails(run(*common, "--compare", tmp_path / "nonexistent", "--out", tmp_path / "b", check=False),
          f"--compare {tmp_path / 'nonexistent'}", "no such folder")
    r = tmp_path / "r9"  # a run of another base model: its weights would go on --pretrained's network
    run("train_ppo.py", *TINY[2:], "--toy-train-steps", "9", "--epochs", "1", "--output-dir", r)
    fails(run(*common, "--compare", r, "--out", tmp_path / "c", check=False), f"--compare {r}", "root fingerprint")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_winrate_refuses_a_dataset_without_judgments_or_with_an_edited_key_and_writes_strict_json(run, tmp_path):
    ds, b = tmp_path / "ab", tmp_path / "b"
    run("train_ppo.py", *TINY, "--epochs", "1", "--output-dir", b)
    run("sample.py", *SAMPLE, "--compare", b / "final_policy", "--k", "2", "--num-tasks", "6", "--out", ds)
    fails(run("label.py", "winrate", ds, check=False), "no project")  # nothing labeled: no store yet
    run("label.py", "create", ds)
    fails(run("label.py", "winrate", ds, check=False), "no judgments yet", "label.py label")
    assert not (ds / "report.json").exists()
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "winrate", ds)
    text = (ds / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}, not strict JSON"))
    assert report["agreement"] == [] and report["overall"]["judgments"] == 6
    key = json.loads((ds / "comparison.json").read_text())
    for edited in (dict(key, sides=key["sides"][:3]), dict(key, sides=["ab"] * 5 + ["left"]), {"sides": key["sides"]}):
        (ds / "comparison.json").write_text(json.dumps(edited))
        fails(run("label.py", "winrate", ds, check=False), str(ds / "comparison.json"), "restore it")
    (ds / "comparison.json").write_text(json.dumps(key)[:-20])
    fails(run("label.py", "winrate", ds, check=False), str(ds / "comparison.json"), "not valid JSON")


def test_finishing_a_dataset_rechecks_the_models_fingerprint(run, tmp_path):
    from safetensors.torch import load_file, save_file
    from drlhf import models
    model = tmp_path / "model"
    shutil.copytree(models.load_base_model("toy:digit4", cache_dir=run.cache_dir, toy_train_steps=8).path, model)
    ds = tmp_path / "ds"
    run("sample.py", "--pretrained", model, "--num-steps", "2", "--num-tasks", "6", "--k", "2", "--batch-size", "4",
        "--out", ds)
    lines = (ds / "tasks.jsonl").read_text().splitlines()
    (ds / "tasks.jsonl").write_text("\n".join(lines[:2]) + "\n")  # interrupted after two tasks
    weights = next(model.rglob("*.safetensors"))
    state = load_file(weights)
    state["conv_in.weight"] = state["conv_in.weight"] + 0.01  # the folder's weights change afterwards
    save_file(state, weights)
    before = digest(ds)
    fails(run("sample.py", "--out", ds, check=False), str(ds), "fingerprint", "weights changed")
    assert digest(ds) == before


# ---------------------------------------------------------------------------------------------------------
# flags that would be ignored, files that would give a traceback, defaults that follow the model
# ---------------------------------------------------------------------------------------------------------
def test_condition_flags_a_model_cannot_take_are_refused(run, tmp_path):
    out = tmp_path / "run"
    for flags, words in ((["--prompts", "/nonexistent.txt"], ["--prompts /nonexistent.txt", "not a text model"]),
                         (["--class-labels", "3,4"], ["--class-labels 3,4", "not a class model"])):
        fails(run("train_ppo.py", *TINY, *flags, "--output-dir", out, check=False), *words)
        fails(run("sample.py", "eval", *SAMPLE, "--num-samples", "2", *flags, "--out", tmp_path / "ev", check=False),
              *words)
    fails(run("train_ppo.py", *TINY, "--exp", "digits-colorfulness", "--class-labels", "3,x", "--output-dir", out,
              check=False), "--class-labels 3,x", "class numbers")
    assert sorted(os.listdir(tmp_path)) == []


def test_a_truncated_image_in_a_dataset_is_one_line_naming_it(run, tmp_path):
    ds = tmp_path / "ds"
    run("sample.py", *SAMPLE, "--num-tasks", "4", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    image = ds / "images" / "task_00002_1.png"
    for damage in (image.read_bytes()[:60], b"not a png at all"):  # cut mid-file, not an image
        image.write_bytes(damage)
        fails(run("train_reward.py", "--dataset", ds, "--epochs", "1", "--out", tmp_path / "rm", check=False),
              str(image), "unreadable", "task 2")
    assert not (tmp_path / "rm").exists()


def test_the_sampler_follows_the_model_and_a_wrong_one_is_still_refused(run, tmp_path):
    out = tmp_path / "flow"
    run("train_ppo.py", "--pretrained", "toy:digit4-flow", *TINY[2:], "--epochs", "1", "--output-dir", out)
    assert json.loads((out / "args.json").read_text())["sampler"] == "flow"
    run("sample.py", "--pretrained", out / "final_policy", "--num-steps", "2", "--num-tasks", "2", "--k", "2",
        "--out", tmp_path / "ds")
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["sampler"]["sampler"] == "flow"
    fails(run("sample.py", "--pretrained", "toy:digit4-flow", "--sampler", "ddpm", "--num-tasks", "2", "--k", "2",
              "--out", tmp_path / "wrong", check=False), "--sampler ddpm", "--sampler flow")
    run("train_ppo.py", *TINY, "--epochs", "1", "--output-dir", tmp_path / "ddpm")
    assert json.loads((tmp_path / "ddpm" / "args.json").read_text())["sampler"] == "ddpm"


def test_threads_beyond_the_cores_are_refused_or_capped_in_one_line(monkeypatch, capsys):
    import torch
    from drlhf import cli, speed
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(speed, "usable_cores", lambda: 2)
        with pytest.raises(ValueError, match=r"--threads 1000: this process may use 2 CPU core\(s\); pass --threads 2"):
            speed.setup_cpu(torch.device("cpu"), 1000)
        monkeypatch.setenv("OMP_NUM_THREADS", "1000")
        monkeypatch.setattr(speed, "busy_cores", lambda window=0.2: 0.0)
        assert speed.setup_cpu(torch.device("cpu"), None) == 2 and torch.get_num_threads() == 2
        err = capsys.readouterr().err
        assert "$OMP_NUM_THREADS=1000" in err and "--threads" in err and len(err.splitlines()) == 1
        # a busy machine: no advice to use 1 thread to a run that already uses 1
        monkeypatch.setattr(speed, "busy_cores", lambda window=0.2: 1.9)
        monkeypatch.setattr(speed, "_cpu_seconds", lambda: (0.0, 0.0, 2))
        assert speed.setup_cpu(torch.device("cpu"), 1) == 1 and capsys.readouterr().err == ""
        assert "--threads 1" in (speed.setup_cpu(torch.device("cpu"), 2), capsys.readouterr().err)[1]
    finally:
        torch.set_num_threads(before)
    assert cli.not_finite(float("nan")) and cli.not_finite(float("-inf")) and cli.not_finite(1e308) is None


def test_write_json_is_strict():
    import tempfile
    from pathlib import Path
    from drlhf import files
    with tempfile.TemporaryDirectory() as d:
        files.write_json(Path(d) / "x.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": (float("-inf"),)})
        assert json.loads((Path(d) / "x.json").read_text()) == {"a": None, "b": [1.5, None], "c": [None]}


def test_a_lock_whose_file_was_replaced_is_taken_on_the_new_file(tmp_path):
    """hold_folder locks the file that is at the lock's path when the lock is taken (a holder that removed it on
    release leaves no stale lock another process could share), and release_folders removes it."""
    from drlhf import files
    folder = tmp_path / "out"
    with holder(folder, "an evaluation") as pid:
        with pytest.raises(files.FolderInUse, match=f"pid {pid}"):
            files.hold_folder(folder, "an evaluation", "--out")
    files.hold_folder(folder, "an evaluation", "--out")  # the holder died (SIGKILL): its lock went with it
    files.hold_folder(folder, "an evaluation", "--out")  # holding it again is a no-op
    assert "pid" in files.lock_file(folder).read_text()
    files.release_folders()
    assert not files.lock_file(folder).exists() and not folder.exists()


# ---------------------------------------------------------------------------------------------------------
# the suite and the help
# ---------------------------------------------------------------------------------------------------------
def test_the_suite_passes_after_the_quick_starts_main_job(run, tmp_path):
    """In a copy of the checkout: the quick start's main job (`python train_ppo.py`, at toy size) writes
    runs/digits-target; then the tests that run scripts without an output folder pass, and that run is untouched."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    copy = tmp_path / "checkout"
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    env = dict(script_env(run), PYTHONPATH=str(copy))
    main_job = subprocess.run([sys.executable, "train_ppo.py", *TINY, "--epochs", "1"], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=600)
    assert main_job.returncode == 0, main_job.stderr[-2000:]
    before = digest(copy / "runs")
    selected = ["tests/test_hardening.py::test_an_eval_reward_that_breaks_the_contract_is_named_by_its_flag",
                "tests/test_hardening.py::test_malformed_files_are_named",
                "tests/test_ppo.py::test_unknown_preset_and_hub_id_offline",
                "tests/test_first_contact.py::test_a_default_output_folder_lands_in_the_tests_own_directory"]
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *selected],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert suite.returncode == 0, suite.stdout[-3000:]
    assert digest(copy / "runs") == before and sorted(os.listdir(copy / "runs")) == ["digits-target"]


def test_a_default_output_folder_lands_in_the_tests_own_directory(run):
    run("train_ppo.py", *TINY, "--epochs", "1")  # no --output-dir: runs/digits-target of the working directory
    assert run.cwd != ROOT and (run.cwd / "runs" / "digits-target" / "summary.json").exists()


@pytest.mark.parametrize("script,groups", [
    ("train_ppo.py", ["the experiment:", "Table 6.2, one field per row", "the method's options", "the run:",
                      "speed and memory"]),
    ("train_reward.py", ["the experiment:", "the data in, the reward model out:", "training:", "architecture",
                         "which epoch is kept:", "the run:"]),
    ("sample.py", ["the experiment:", "the dataset:", "the sampler:", "the run:"])])
def test_help_lists_every_preset_from_the_table_and_prints_the_groups(run, script, groups):
    from drlhf import presets
    text = run(script, "--help").stdout
    names = presets.for_script(script[:-3])
    listing = text[text.index("presets (--exp NAME"):]
    assert [line.split()[0] for line in listing.splitlines()[1:] if line.strip()] == list(names)
    assert all(presets.about(n) in " ".join(listing.split()) for n in names)
    positions = [text.index(g) for g in groups]
    assert positions == sorted(positions), groups  # in the source's order
    if script == "train_ppo.py":
        assert all(n in text for n in ("macaw", "pink", "target-flow", "pickscore-sd3"))
