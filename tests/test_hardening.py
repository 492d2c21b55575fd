"""Bad input and faults: one sentence naming the flag or file, a non-zero exit, nothing lost or half-written."""
import errno
import hashlib
import json
import shutil

import pytest

from conftest import ROOT, TINY
from drlhf import cli, files


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(proc, *words):
    """A user error: exit code 1, one line on stderr that names what to fix, no traceback."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), last


def test_resume_of_a_copied_run_continues_in_the_copy(run, tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    run("train_ppo.py", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--output-dir", original)
    shutil.copytree(original, copy)
    before = digest(original)
    run("train_ppo.py", "--resume", copy, "--epochs", "3")
    assert digest(original) == before  # the folder it was copied from is untouched
    assert (copy / "checkpoints" / "epoch_00003" / "state.pt").exists()
    assert json.loads((copy / "summary.json").read_text())["epochs"] == 3
    # a checkpoint folder outside a run folder needs to be told where to continue
    loose = tmp_path / "loose"
    shutil.copytree(copy / "checkpoints" / "epoch_00002", loose)
    fails(run("train_ppo.py", "--resume", loose, "--epochs", "3", check=False), "--output-dir")
    run("train_ppo.py", "--resume", loose, "--epochs", "3", "--output-dir", tmp_path / "forked")
    assert (tmp_path / "forked" / "checkpoints" / "epoch_00003").exists()


@pytest.mark.parametrize("flag,value,script", [
    ("--num-envs", "0", "train_ppo.py"), ("--num-envs", "-4", "train_ppo.py"), ("--epochs", "-1", "train_ppo.py"),
    ("--policy-lr", "-1e-4", "train_ppo.py"), ("--gae-lambda", "1.5", "train_ppo.py"),
    ("--minibatch-size", "0", "train_ppo.py"), ("--lr", "0", "train_reward.py"), ("--epochs", "0", "train_reward.py"),
    ("--num-tasks", "0", "sample.py")])
def test_sizes_and_rates_are_refused_before_anything_is_written(run, tmp_path, flag, value, script):
    out = tmp_path / "out"
    where = {"train_ppo.py": "--output-dir", "train_reward.py": "--out", "sample.py": "--out"}[script]
    fails(run(script, f"{flag}={value}", where, out, check=False), flag)
    assert not out.exists()


@pytest.mark.parametrize("fn,words", [("one_scalar", ["shape ()"]), ("two_columns", ["shape (4, 2)"]),
                                      ("one_short", ["shape (3,)"]), ("strings", ["returned list"]),
                                      ("raises", ["ZeroDivisionError", "helpers.py"])])
def test_reward_functions_that_break_the_contract_are_named(run, tmp_path, fn, words):
    out = tmp_path / "run"
    proc = run("train_ppo.py", *TINY, "--epochs", "1", "--reward", f"tests.helpers:{fn}", "--output-dir", out, check=False)
    fails(proc, f"--reward tests.helpers:{fn}", *words)
    assert not out.exists()  # the base model's scores come first: nothing was written


def test_an_eval_reward_that_breaks_the_contract_is_named_by_its_flag(run, tmp_path):
    out = tmp_path / "run"
    proc = run("train_ppo.py", *TINY, "--epochs", "1", "--eval-reward", "tests.helpers:two_columns", "--output-dir", out,
               check=False)
    fails(proc, "--eval-reward tests.helpers:two_columns", "shape (4, 2)")
    assert not out.exists()
    fails(run("train_ppo.py", *TINY, "--eval-reward", "nosuchmodule:f", check=False), "--eval-reward", "PYTHONPATH")


def test_malformed_files_are_named(run, tmp_path):
    ds, rm = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "3", "--num-tasks", "4", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    rankings = (ds / "rankings.jsonl").read_text()
    (tmp_path / "cut.jsonl").write_text(rankings[:len(rankings) - 7])
    fails(run("train_reward.py", "--dataset", ds, "--rankings", tmp_path / "cut.jsonl", "--toy-train-steps", "8",
              "--out", rm, check=False), "cut.jsonl:4")
    run("train_reward.py", "--dataset", ds, "--epochs", "1", "--toy-train-steps", "8", "--out", rm)
    config = (rm / "config.json").read_text()
    common = [*TINY, "--epochs", "1", "--reward", "rm", "--reward-model", rm, "--value-fn", "cnn"]
    for broken in (config[:40], "[1, 2]"):
        (rm / "config.json").write_text(broken)
        fails(run("train_ppo.py", *common, check=False), "config.json")
    from tiny_sd import build_tiny_sd  # a text model, so that the prompts file is read
    (tmp_path / "prompts.txt").write_bytes(bytes(range(256)) * 4)
    fails(run("sample.py", "--pretrained", build_tiny_sd(tmp_path / "tiny-sd"), "--prompts", tmp_path / "prompts.txt",
              "--out", tmp_path / "p", check=False), "--prompts", "prompts.txt", "UTF-8")
    assert not (tmp_path / "p").exists()


def test_a_full_or_read_only_disk_is_one_sentence_and_leaves_the_old_file(tmp_path, capsys, monkeypatch):
    target = tmp_path / "checkpoints" / "epoch_00002"
    files.atomic_write(target, lambda d: (d / "policy.safetensors").write_text("old"), folder=True)

    def full(d):
        (d / "policy.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_safetensors(d):  # safetensors and torch.save report ENOSPC in their own exception types
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1574437888 vs 1574437840")

    for write in (full, full_safetensors):
        with pytest.raises(files.WriteError, match="no space left on device.*--output-dir"):
            files.atomic_write(target, write, folder=True)
        assert (target / "policy.safetensors").read_text() == "old"
        assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_00002"]  # no temporary folder left
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as a disk problem
        files.atomic_write(target, lambda d: 1 / 0, folder=True)
    # a leftover of a killed write is replaced by the next write of the same path
    (tmp_path / ".summary.json.tmp").write_text("{")
    files.write_text(tmp_path / "summary.json", "{}")
    assert not (tmp_path / ".summary.json.tmp").exists() and (tmp_path / "summary.json").read_text() == "{}"
    def read_only():
        files.make_dir(tmp_path / "ro" / "out", "--out")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)  # a read-only mount (even for root)
    with pytest.raises(SystemExit) as stop:  # drlhf.cli.run: one line and exit code 1, no traceback
        cli.run(read_only)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith("error: cannot create the folder") and "--out" in err, err
    assert not (tmp_path / "ro" / "out").exists()
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# the labeler
# ---------------------------------------------------------------------------------------------------------
def test_a_second_session_of_one_annotator_is_refused_and_a_conflicting_log_still_opens(run, tmp_path):
    import subprocess
    import sys
    import time
    from drlhf import labels
    from test_label import make_dataset
    ds = make_dataset(tmp_path / "ds", num_tasks=2, k=5)
    db = ds / "labels.sqlite"
    store = labels.Store(db, quiet=True)
    store.create_project("default", ds, 5, False, False, "")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.'); from drlhf import labels; from drlhf.labels import Store; "
        f"s = Store({str(db)!r}, quiet=True); f = labels.session_lock(s, 'default', 'alice'); "
        "print('locked', flush=True); time.sleep(60)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # reads only
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(run("label.py", "label", ds, "--annotator", "alice", "--auto", "builtin:ink", check=False),
              "'alice' is already labeling", f"pid {holder.pid}")
        run("label.py", "label", ds, "--annotator", "bob", "--auto", "builtin:ink")  # another annotator may
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run("label.py", "label", ds, "--annotator", "alice", "--auto", "builtin:ink")  # a dead session holds no lock
    # a log written by two sessions before the lock existed: both answered the same first pair
    store.append("default", "carol", "decision", 0, a=1, b=0, left=1, right=0, outcome="a", ms=1)
    store.append("default", "carol", "decision", 0, a=1, b=0, left=0, right=1, outcome="b", ms=1)
    state = labels.replay(store.events("default", "carol"), labels.load_tasks(ds), store.project("default"))
    assert len(state.decisions) == 1 and len(state.conflicts) == 1 and state.decisions[0]["outcome"] == "a"
    listed = run("label.py", "list", ds).stdout
    assert "1 conflicting answers" in listed
    assert "carol" in run("label.py", "export", ds).stdout


def test_protocol_flags_keys_and_read_only_export_are_named(run, tmp_path, monkeypatch):
    from test_label import make_dataset
    ds = make_dataset(tmp_path / "ds", num_tasks=2, k=5)
    run("label.py", "label", ds, "--auto", "builtin:ink")  # creates the default project: binary insertion
    before = (ds / "labels.sqlite").read_bytes()
    for flags, word in ((["--all-pairs"], "--all-pairs"), (["--recheck"], "--recheck"), (["--k", "4"], "--k"),
                        (["--instructions", ds / "instructions.md"], "--instructions")):
        fails(run("label.py", "label", ds, "--auto", "builtin:stroke", "--annotator", "x", *flags, check=False),
              word, "only apply when a project is created")
    assert (ds / "labels.sqlite").read_bytes() == before
    for keys in ("left=q", "left=d", "tie=1"):
        fails(run("label.py", "label", ds, "--keys", keys, check=False), "--keys", "two actions")
    from drlhf import labels
    store = labels.Store(ds / "labels.sqlite", quiet=True)
    monkeypatch.setattr(labels.os, "access", lambda path, mode: False)  # tests run as root: simulate read-only
    with pytest.raises(labels.LabelError, match="--out .*read-only.*--out DIR"):
        labels.export(store, store.project("default"), labels.load_tasks(ds), ds, 0.2, 0)


def test_an_image_deleted_during_a_session_ends_it_with_one_line(tmp_path):
    import asyncio
    from test_label import make_dataset, open_app
    ds = make_dataset(tmp_path / "ds", num_tasks=2, k=5)
    app, store, _ = open_app(ds, tmp_path / "labels.sqlite")

    async def drive():
        async with app.run_test(size=(120, 45)) as pilot:
            await pilot.press("escape")
            for p in (ds / "images").glob("task_00000_*.png"):
                p.unlink()
            await pilot.press("a")
            await pilot.pause()
    asyncio.run(drive())
    assert app.return_code == 1
    assert len(store.events("p", "tester")) == 1  # the answer given before the failure is kept


def test_flag_skip_and_undo_say_what_they_did_and_a_finished_task_shows_its_ordering(tmp_path):
    import asyncio
    from test_label import make_dataset, open_app
    ds = make_dataset(tmp_path / "ds", num_tasks=2, k=3)
    app, store, _ = open_app(ds, tmp_path / "labels.sqlite", k=3)
    said = []
    app.notify = lambda message, **kw: said.append(message)

    async def drive():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("escape")
            left, right = app.pair
            await pilot.press("b")
            assert "✗ bad" in str(app.query_one("#left-label").render())
            await pilot.press("u")
            await pilot.press("u")  # nothing left to undo
            await pilot.press("n")
            while app.task_id == 1 and app.pair is not None:  # task 1 first: task 0 was skipped
                await pilot.press("a")
            done = str(app.query_one("#done").render())
            assert done.startswith("Task 1 is ordered: #")
            await pilot.press("a")
            assert str(app.query_one("#done").render()) == ""  # until the next key
            return left, right
    left, right = asyncio.run(drive())
    assert said[:4] == [f"flagged #{left} and #{right} of task 0 as both bad; now choose",
                        "undid the both-bad flag of task 0", "nothing to undo",
                        "skipped task 0: it comes back after the others"]


def test_a_long_prompt_is_cut_on_screen_and_a_failed_save_ends_the_session(tmp_path):
    import asyncio
    import sqlite3
    from test_label import make_dataset, open_app
    ds = make_dataset(tmp_path / "ds", num_tasks=2, k=3)
    lines = [json.loads(line) for line in (ds / "tasks.jsonl").read_text().splitlines()]
    for t in lines:
        t.pop("class_label")
        t["prompt"] = "a photograph of a corgi " * 420  # ~10,000 characters
    (ds / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in lines))
    app, store, _ = open_app(ds, tmp_path / "labels.sqlite", k=3)

    def disk_full(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    async def drive():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("escape")
            prompt = str(app.query_one("#prompt").render())
            assert len(prompt) < 260 and prompt.endswith("…")
            assert app.query_one("#left").size.height >= 8  # the images keep their rows
            await pilot.press("a")
            store.append = disk_full
            await pilot.press("a")
            await pilot.pause()
    asyncio.run(drive())
    assert app.return_code == 1
    assert len(labels_of(store)) == 1  # the answer saved before the failure is kept


def labels_of(store):
    from drlhf.labels import Store
    return Store(store.path, quiet=True).events("p", "tester")


# ---------------------------------------------------------------------------------------------------------
# the reward model we keep
# ---------------------------------------------------------------------------------------------------------
def test_the_kept_reward_model_is_the_best_validation_epoch(run, tmp_path):
    ds, rm = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "3", "--num-tasks", "40", "--k", "5", "--out", ds)
    run("label.py", "--auto", "tests.helpers:noisy_ink", ds)
    run("label.py", "export", ds)
    common = ["train_reward.py", "--dataset", ds, "--toy-train-steps", "8", "--lr", "1e-2"]
    proc = run(*common, "--epochs", "12", "--out", rm)
    config = json.loads((rm / "config.json").read_text())
    history = config["history"]
    best = min(history, key=lambda h: h["val_loss"])
    assert history[-1]["val_loss"] > best["val_loss"]  # the run overfits, so keeping the last would be worse
    assert config["kept_epoch"] == best["epoch"] and config["kept"] == "lowest validation loss"
    assert config["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)  # the saved weights are that epoch's
    assert config["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert f"reward model of epoch {best['epoch']}" in proc.stdout and "val accuracy" in proc.stdout
    assert (rm / "learning_curves.png").stat().st_size > 1000
    last = json.loads((run(*common, "--epochs", "12", "--keep", "last", "--out", tmp_path / "last").stdout and
                       (tmp_path / "last" / "config.json").read_text()))
    assert last["kept_epoch"] == 12 and last["val_loss"] == pytest.approx(history[-1]["val_loss"], abs=1e-5)
    early = run(*common, "--epochs", "12", "--patience", "2", "--out", tmp_path / "early")
    stopped = json.loads((tmp_path / "early" / "config.json").read_text())
    # the same seed gives the same epochs up to the stop: it comes 2 epochs after the best so far, wherever this
    # machine's trajectory first has a 2-epoch plateau (on another CPU that may be before the overall best)
    best_so_far = None
    for h in history:
        if best_so_far is None or h["val_loss"] < best_so_far["val_loss"]:
            best_so_far = h
        if h["epoch"] - best_so_far["epoch"] >= 2:
            break
    assert stopped["epochs_run"] == h["epoch"] and stopped["kept_epoch"] == best_so_far["epoch"], early.stdout
    assert stopped["history"] == history[:h["epoch"]], early.stdout
    run(*common, "--epochs", "2", "--val-fraction", "0", "--out", tmp_path / "all")
    assert json.loads((tmp_path / "all" / "config.json").read_text())["kept"] == "last epoch (no validation split)"


# ---------------------------------------------------------------------------------------------------------
# diversity of the fixed-seed samples
# ---------------------------------------------------------------------------------------------------------
def test_diversity_is_minimal_for_copies_and_higher_for_varied_samples():
    import torch
    from drlhf import models, toys
    from drlhf.evaluation import Diversity, vendi_score
    torch.manual_seed(0)
    unet = toys.toy_unet(3, 16, class_cond=True).eval()
    base = models.BaseModel("toy", "toy", unet, {}, "class", (3, 16, 16), 10)
    diversity = Diversity(base)
    varied = torch.rand(12, 3, 16, 16) * 2 - 1
    groups = [0] * 6 + [1] * 6
    base_value = diversity(varied, groups)  # the first set is the reference (the base model's samples)
    collapsed = varied[:1].repeat(12, 1, 1, 1)
    assert diversity(collapsed, groups) == pytest.approx(1.0, abs=1e-6)  # all copies of one image: minimal
    assert base_value > 2.0 and diversity(varied[:6].repeat(2, 1, 1, 1), groups) == pytest.approx(base_value, rel=0.3)
    assert diversity(varied, [0] * 12) > base_value  # one condition of 12 varied samples: more variety than 2 x 6
    with torch.no_grad():  # the features are the base model's, not the trained U-Net's
        for p in unet.parameters():
            p.add_(1.0)
    assert diversity(varied, groups) == pytest.approx(base_value)
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0) and vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)


def test_train_ppo_and_sample_eval_report_diversity_beside_the_base(run, tmp_path):
    out = tmp_path / "run"
    run("train_ppo.py", *TINY, "--epochs", "2", "--output-dir", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_diversity"] >= 1 and summary["final_diversity"] >= 1
    proc = run("sample.py", "eval", "--toy-train-steps", "8", "--num-steps", "5", "--num-samples", "8",
               "--checkpoints", out, "--out", tmp_path / "eval")
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert set(scores["diversity"]) == {"base", "run"} and "diversity (Vendi score" in proc.stdout


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_worker_ends_without_the_interpreters_teardown(tmp_path, world):
    """drlhf.cli.run ends a torchrun worker (WORLD_SIZE > 1) with os._exit once its output is flushed, so no
    finalization runs in it (where a gloo process can abort after its work is done); a plain process exits as
    usual. Both keep the script's exit code and everything it printed."""
    import os
    import subprocess
    import sys
    script = tmp_path / "script.py"
    script.write_text("import atexit, sys\nfrom drlhf import cli\natexit.register(lambda: print('teardown'))\n"
                      "def main():\n    print('work', end='')\n    sys.stderr.write('note')\n"
                      "    raise ValueError('bad value')\ncli.run(main)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "WORLD_SIZE": world, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("note") and "error: bad value" in proc.stderr
    assert proc.stdout == ("work" if world == "2" else "workteardown\n")  # the atexit handler: finalization
