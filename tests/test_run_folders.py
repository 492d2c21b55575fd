"""Nothing a user already has is overwritten: run folders, branches from earlier checkpoints, resumes that would change
the experiment, folders that cannot be written, base models that do not fit a dataset, and the smaller refusals.
Every refusal is one line naming what to fix, exit code 1, no traceback (tests/test_hardening.py's `fails`)."""
import json
import os
import stat

from conftest import TINY
from test_hardening import digest, fails


def test_a_new_run_never_mixes_into_an_existing_run_folder(run, tmp_path):
    out = tmp_path / "K"
    run("train_ppo.py", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--output-dir", out)
    before = digest(out)
    fails(run("train_ppo.py", *TINY, "--epochs", "1", "--output-dir", out, check=False),
          str(out), "already holds a run", "--resume", "--replace-run")
    assert digest(out) == before  # nothing of the first run changed
    proc = run("train_ppo.py", *TINY, "--epochs", "1", "--output-dir", out, "--replace-run", "true")
    aside = tmp_path / "K.old-1"
    assert digest(aside) == before and "K.old-1" in proc.stdout  # the old run, whole, beside the new one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_00001", "latest"]
    assert len(list((out / "tb").iterdir())) == 1  # one TensorBoard event file: no mixing
    run("train_ppo.py", *TINY, "--epochs", "1", "--output-dir", out, "--replace-run", "true")
    assert digest(aside) == before and (tmp_path / "K.old-2" / "summary.json").exists()


def test_resume_of_an_earlier_checkpoint_branches_and_leaves_the_run_as_it_was(run, tmp_path):
    out = tmp_path / "R"
    run("train_ppo.py", *TINY, "--epochs", "4", "--checkpoint-every", "2", "--output-dir", out)
    before = digest(out)
    run("train_ppo.py", "--resume", out / "checkpoints" / "epoch_00002", "--policy-lr", "1e-4")
    assert digest(out) == before
    branch = tmp_path / "R-branch-epoch_00002"
    assert (branch / "checkpoints" / "epoch_00004").exists() and (branch / "final_policy").exists()
    lineage = json.loads((branch / "final_policy" / "drlhf_lineage.json").read_text())
    last = lineage["rounds"][-1]
    assert last["branched_from"]["epoch"] == 2 and last["branched_from"]["checkpoint"].endswith("epoch_00002")
    assert last["resumes"] == [{"from_epoch": 2, "changed": {"policy_lr": [5e-5, 1e-4]}}]
    summary = json.loads((branch / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["lineage"] == lineage


def test_resume_refuses_what_would_change_the_experiment(run, tmp_path):
    out = tmp_path / "R"
    run("train_ppo.py", *TINY, "--epochs", "2", "--output-dir", out)
    before = digest(out)
    for flags, words in ((["--reward", "tests.helpers:mean_brightness"], ["--reward", "target"]),
                         (["--num-steps", "4"], ["--num-steps 4", "5"]),
                         (["--seed", "3", "--kl-coef", "0.1"], ["--seed 3", "--kl-coef 0.1"]),
                         (["--eval-samples", "8"], ["--eval-samples 8"]),
                         (["--epochs", "2"], ["trained 2 epochs", "--epochs"]),
                         (["--epochs", "1"], ["trained 2 epochs"])):
        fails(run("train_ppo.py", "--resume", out, *flags, check=False), *words)
    assert digest(out) == before
    run("train_ppo.py", "--resume", out, "--epochs", "3", "--eval-every", "3")  # what only continues it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["lineage"]["rounds"][-1]["resumes"] == [
        {"from_epoch": 2, "changed": {"epochs": [2, 3], "eval_every": [1, 3]}}]


def test_folders_that_cannot_be_written_are_one_sentence(run, tmp_path):
    """A file where a folder must go (the same path as a read-only mount: drlhf.files.make_dir and check_writable,
    tests/test_hardening.py simulates the read-only case)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fails(run("train_ppo.py", *TINY, "--epochs", "1", "--output-dir", blocker / "run", check=False),
          "--output-dir", str(blocker))
    fails(run("sample.py", "--toy-train-steps", "8", "--num-steps", "2", "--num-tasks", "2", "--k", "2",
              "--out", blocker / "ds", check=False), "--out")
    fails(run("sample.py", "eval", "--toy-train-steps", "8", "--num-samples", "2", "--out", blocker / "ev",
              check=False), "--out")
    fails(run("train_ppo.py", "--toy-train-steps", "9", *TINY[2:], "--epochs", "1", "--cache-dir", blocker / "c",
              "--output-dir", tmp_path / "r", check=False), "--cache-dir")
    assert not (tmp_path / "r").exists()


def test_train_reward_builds_on_the_datasets_base_model_and_refuses_another(run, tmp_path):
    ds = tmp_path / "ds"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "2", "--num-tasks", "6", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    common = ["train_reward.py", "--dataset", ds, "--epochs", "1"]
    run(*common, "--out", tmp_path / "rm")  # no --toy-train-steps: the dataset's (8), not the default
    assert "s8" in json.loads((tmp_path / "rm" / "config.json").read_text())["base_model_path"]
    fails(run(*common, "--toy-train-steps", "9", "--out", tmp_path / "rm9", check=False),
          str(ds), "fingerprint", "toy:digit4", "--toy-train-steps")
    fails(run(*common, "--pretrained", "toy:digits-rgb", "--toy-train-steps", "8", "--out", tmp_path / "rgbrm",
              check=False), "class", "none", "[3, 16, 16]", "[1, 16, 16]")
    assert not (tmp_path / "rm9").exists() and not (tmp_path / "rgbrm").exists()
    # train_ppo.py names what differs between the reward model's base and the policy's
    proc = run("train_ppo.py", *TINY[2:], "--toy-train-steps", "9", "--reward", "rm", "--reward-model",
               tmp_path / "rm", "--epochs", "1", "--output-dir", tmp_path / "p", check=False)
    fails(proc, "toy-digit4-s8-b64", "toy-digit4-s9-b64", "fingerprint")
    fails(run("train_ppo.py", *TINY, "--reward", "rm", "--reward-model", tmp_path / "rm", "--ensemble-penalty", "1",
              "--epochs", "1", "--output-dir", tmp_path / "e", check=False), "one head", "--ensemble-penalty")


def test_smaller_refusals_and_file_modes(run, tmp_path):
    out = tmp_path / "R"
    run("train_ppo.py", *TINY, "--epochs", "1", "--checkpoint-every", "1", "--output-dir", out)
    for weights in (out / "checkpoints" / "epoch_00001" / "policy.safetensors", out / "final_policy" / "unet" /
                    "diffusion_pytorch_model.safetensors", out / "summary.json"):
        assert stat.S_IMODE(os.stat(weights).st_mode) == 0o666 & ~_umask(), weights  # like any new file
    empty = tmp_path / "empty"  # a run folder whose run saved nothing yet
    empty.mkdir()
    (empty / "args.json").write_text("{}")
    fails(run("sample.py", "eval", "--toy-train-steps", "8", "--num-samples", "2", "--checkpoints", empty,
              "--out", tmp_path / "ev", check=False), "--checkpoints", "without checkpoints")
    ds = tmp_path / "ds"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "2", "--num-tasks", "2", "--k", "2", "--out", ds)
    fails(run("label.py", "label", ds, check=False), "terminal", "--auto")  # the tests' stdin is not a tty
    fails(run("label.py", "--auto", "tests.helpers:raises", ds, check=False), "--auto tests.helpers:raises",
          "ZeroDivisionError")
    fails(run("train_ppo.py", *TINY, "--num-envs", "3", "--minibatch-size", "4", "--epochs", "1", "--output-dir",
              tmp_path / "s", check=False), "--minibatch-size")  # a size refusal has the "error:" prefix too


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_reward_model_is_never_overwritten_and_a_read_only_dataset_still_exports(run, tmp_path, monkeypatch, capsys):
    ds, rm = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "2", "--num-tasks", "6", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    common = ["train_reward.py", "--dataset", ds, "--epochs", "1", "--out", rm]
    run(*common)
    before = digest(rm)
    fails(run(*common, check=False), "--out", "already holds a reward model", "--replace-out")
    assert digest(rm) == before
    run(*common, "--replace-out", "true", "--seed", "1")
    assert digest(tmp_path / "rm.old-1") == before and (rm / "model.safetensors").exists()
    # export and list read the labels of a dataset on a read-only mount (simulated: root may write anywhere)
    import label
    from drlhf import labels
    real_access = os.access
    monkeypatch.setattr(labels.os, "access", lambda path, mode: not str(path).startswith(str(ds)) and
                        real_access(path, mode))
    label.main(["list", str(ds)])
    assert "auto: 6 of 6 tasks" in capsys.readouterr().out
    label.main(["export", str(ds), "--out", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "rankings.jsonl").read_text() == (ds / "rankings.jsonl").read_text()
