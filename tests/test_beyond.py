"""Past the thesis (its chapter 8.1): adaptive KL, the critic-free group baseline, and the over-optimization curve
of gold against proxy reward over the KL from the base policy."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_ppo
from conftest import TINY


def scalars(run_dir, tag):
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def test_kl_controller_moves_beta_towards_the_target_both_ways():
    def step(beta, kl):
        ctl = train_ppo.KLController(beta, target=6.0, horizon=1000.0)
        ctl.update(kl, 100)
        return ctl.beta
    assert step(0.1, 12.0) == pytest.approx(0.1 * (1 + 0.2 * 0.1))   # too far: up
    assert step(0.1, 3.0) == pytest.approx(0.1 * (1 - 0.2 * 0.1))    # too close: down
    assert step(0.1, 6.6) == pytest.approx(0.1 * (1 + 0.1 * 0.1))    # proportional
    assert step(0.1, 6.0) == pytest.approx(0.1)                      # on target
    for start in (0.01, 1.0):  # closed loop: a KL that falls as beta rises settles near the target from either side
        ctl = train_ppo.KLController(start, target=6.0, horizon=1000.0)
        for _ in range(300):
            ctl.update(0.6 / ctl.beta, 100)  # KL = 0.6 / beta -> target at beta = 0.1
        assert ctl.beta == pytest.approx(0.1, rel=0.05), start
        assert ctl.state() == {"kl_coef": ctl.beta}  # an adaptive beta is resumable state
    fixed = train_ppo.KLController(0.02)  # Table 6.2's fixed beta: nothing moves it, nothing to save
    fixed.update(100.0, 100)
    assert fixed.beta == 0.02 and fixed.state() == {}


def test_group_advantages_have_zero_mean_per_prompt_and_carry_the_kl_to_go():
    g = torch.Generator().manual_seed(0)
    scores, groups = torch.randn(12, generator=g) * 3 + 1, torch.tensor([0, 1, 2] * 4)
    adv, returns = train_ppo.group_advantages(scores, groups, torch.zeros(5, 12), 0.0)
    assert adv.shape == (5, 12) and torch.equal(adv, returns)
    for k in range(3):
        a = adv[:, groups == k]
        assert a.mean().abs() < 1e-6 and a[0].std(correction=0) == pytest.approx(1.0, abs=1e-4)
        assert torch.equal(a[0], a[-1])  # no KL: every step has the terminal advantage
    kl = torch.rand(5, 12, generator=g)
    with_kl, _ = train_ppo.group_advantages(scores, groups, kl, 0.5)
    torch.testing.assert_close(with_kl[0] - adv[0], -0.5 * kl.sum(0))       # the whole trajectory's penalty
    torch.testing.assert_close(with_kl[-1] - adv[-1], -0.5 * kl[-1])        # only the last step's


def test_group_and_adaptive_kl_runs_log_beta_and_refuse_what_does_not_fit(run, tmp_path):
    out = tmp_path / "group"
    run("train_ppo.py", *TINY, "--epochs", "3", "--advantage", "group", "--value-fn", "none", "--kl-coef", "0.01",
        "--kl-target", "1.0", "--kl-horizon", "100", "--output-dir", out)
    beta = scalars(out, "objective/kl_coef")
    kl = scalars(out, "objective/kl")
    assert beta[0] == pytest.approx(0.01) and len(beta) == 3
    for b0, b1, k in zip(beta, beta[1:], kl):  # each epoch's KL against the target decides the next beta
        assert (b1 > b0) == (k > 1.0) and b1 != b0
    assert scalars(out, "losses/value_loss") == [0.0, 0.0, 0.0]  # no critic
    proc = run("train_ppo.py", *TINY, "--advantage", "group", "--output-dir", tmp_path / "x", check=False)
    assert proc.returncode != 0 and "--value-fn none" in proc.stderr
    proc = run("train_ppo.py", *TINY, "--kl-target", "1", "--output-dir", tmp_path / "y", check=False)
    assert proc.returncode != 0 and "--kl-coef" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_overoptimization_curve_and_gold_peak_are_written(run, tmp_path):
    out = tmp_path / "oo"
    run("train_ppo.py", *TINY, "--epochs", "3", "--eval-reward", "label:ink_score", "--checkpoint-every", "2",
        "--output-dir", out)
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["overoptimization"]
    assert [p["epoch"] for p in curve] == [0, 1, 2, 3] and curve[0]["kl"] == 0.0
    assert all(p["kl"] > 0 for p in curve[1:])  # the policy moved away from the base policy
    peak = max(curve, key=lambda p: p["gold_gain"])
    assert summary["gold_peak_epoch"] == peak["epoch"] and summary["gold_peak_gain_in_base_std"] == peak["gold_gain"]
    assert summary["eval_reward_gain_in_base_std"] == pytest.approx(curve[-1]["gold_gain"], abs=1e-6)
    assert summary["gain_in_base_std"] == pytest.approx(curve[-1]["proxy_gain"], abs=1e-6)
    assert (out / "overoptimization.png").stat().st_size > 1000
    sqrt_kl = scalars(out, "eval/sqrt_kl_from_base")
    assert sqrt_kl == pytest.approx([p["kl"] ** 0.5 for p in curve[1:]], rel=1e-5)
    # a resumed run keeps the curve up to its checkpoint and continues it
    run("train_ppo.py", "--resume", out, "--epochs", "4")
    resumed = json.loads((out / "summary.json").read_text())["overoptimization"]
    assert [p["epoch"] for p in resumed] == [0, 1, 2, 3, 4]
    assert resumed[:3] == curve[:3]


def test_ensemble_heads_differ_and_score_mean_minus_k_std(run, tmp_path):
    """train_reward.py --ensemble 3: one folder, three heads on one encoder (own inits, own bootstrap resamples),
    each head's validation accuracy; train_ppo.py scores mean - k std (or the worst head) and logs the spread."""
    from safetensors.torch import load_file

    from drlhf import models, rewards
    from drlhf.reward_model import load_reward_model
    ds, rm_dir = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "5", "--num-tasks", "12", "--k", "4", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--dataset", ds, "--out", rm_dir, "--epochs", "3", "--batch-tasks", "4",
        "--toy-train-steps", "8", "--val-fraction", "0.25", "--ensemble", "3")
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["ensemble"] == 3 and len(config["head_val_accuracy"]) == 3 and len(config["reward_mean"]) == 3
    state = load_file(rm_dir / "model.safetensors")
    heads = [{k.split(".", 1 if k.startswith("head.") else 2)[-1]: v for k, v in state.items()
              if k.startswith(prefix)} for prefix in ("head.", "extra_heads.0.", "extra_heads.1.")]
    assert heads[0].keys() == heads[1].keys() == heads[2].keys()
    assert not torch.equal(heads[0]["out.weight"], heads[1]["out.weight"])
    assert not torch.equal(heads[1]["out.weight"], heads[2]["out.weight"])

    base = models.load_base_model("toy:digit4", toy_train_steps=8, cache_dir=run.cache_dir)
    rm, _ = load_reward_model(rm_dir, base)
    x = torch.randn(6, *base.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_head = rm(x)  # standardized, (6, 3)
    assert per_head.shape == (6, 3) and not torch.allclose(per_head[:, 0], per_head[:, 1])
    for penalty in (0.0, 0.5, 2.0):
        fn = rewards.build("rm", base, reward_model=str(rm_dir), ensemble_penalty=penalty)
        torch.testing.assert_close(fn(x, None), per_head.mean(1) - penalty * per_head.std(1))
        assert fn.ensemble["disagreement"] == pytest.approx(per_head.std(1).mean().item(), rel=1e-5)
    worst = rewards.build("rm", base, reward_model=str(rm_dir), ensemble_reduce="min")
    torch.testing.assert_close(worst(x, None), per_head.min(1).values)

    out = tmp_path / "ppo"
    run("train_ppo.py", *TINY, "--epochs", "2", "--reward", "rm", "--reward-model", rm_dir, "--value-fn", "reward",
        "--ensemble-penalty", "1.0", "--output-dir", out)
    spread = scalars(out, "objective/ensemble_disagreement")
    assert len(spread) == 2 and all(s > 0 for s in spread)


def test_two_rounds_of_iterated_rlhf_end_to_end(run, tmp_path):
    """Round 1: sample the base model, rank, train a reward model, PPO. Round 2: sample the round-1 policy, rank,
    train a reward model on both rounds' rankings, PPO continuing from the round-1 policy. Each policy folder says
    where it came from, and the round-2 reward model (on the root base model's U-Net) scores the round-1 policy."""
    ds1, ds2, rm1, rm2, ppo1, ppo2 = (tmp_path / n for n in ("ds1", "ds2", "rm1", "rm2", "ppo1", "ppo2"))
    rm_flags = ["--epochs", "2", "--batch-tasks", "4", "--toy-train-steps", "8", "--val-fraction", "0.25"]
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "5", "--num-tasks", "8", "--k", "3", "--out", ds1)
    run("label.py", "--auto", "builtin:ink", ds1)
    run("label.py", "export", ds1)
    run("train_reward.py", "--dataset", ds1, "--out", rm1, *rm_flags)
    run("train_ppo.py", *TINY, "--epochs", "1", "--reward", "rm", "--reward-model", rm1, "--value-fn", "reward",
        "--output-dir", ppo1)
    first = json.loads((ppo1 / "final_policy/drlhf_lineage.json").read_text())
    assert first["root"]["base_model"] == "toy:digit4" and len(first["rounds"]) == 1
    assert first["rounds"][0]["reward_model"] == str(rm1) and first["rounds"][0]["policy_from"] == "toy:digit4"
    assert first["rounds"][0]["reward_model_datasets"][0]["path"] == str(ds1)

    run("sample.py", "--pretrained", ppo1 / "final_policy", "--num-steps", "5", "--num-tasks", "8", "--k", "3",
        "--out", ds2)
    assert json.loads((ds2 / "dataset.json").read_text())["lineage"] == first  # which round's policy sampled it
    run("label.py", "--auto", "builtin:ink", ds2)
    run("label.py", "export", ds2)
    listing = tmp_path / "rounds.txt"
    listing.write_text(f"{ds1}\n{ds2}\n")
    run("train_reward.py", "--dataset", listing, "--out", rm2, *rm_flags)
    config = json.loads((rm2 / "config.json").read_text())
    assert [d["path"] for d in config["datasets"]] == [str(ds1), str(ds2)]
    assert [d["policy_round"] for d in config["datasets"]] == [0, 1]
    assert [d["ranked_tasks"] for d in config["datasets"]] == [8, 8]
    assert config["base_model"] == "toy:digit4"  # the root base model, not the round-1 policy that sampled ds2

    proc = run("train_ppo.py", *TINY, "--pretrained", ppo1 / "final_policy", "--epochs", "1", "--reward", "rm",
               "--reward-model", rm2, "--value-fn", "reward", "--output-dir", ppo2)
    assert "fine-tuned from; its encoder is rebuilt from there" in proc.stdout
    second = json.loads((ppo2 / "final_policy/drlhf_lineage.json").read_text())
    assert second["root"] == first["root"] and len(second["rounds"]) == 2
    assert second["rounds"][0] == first["rounds"][0]
    assert second["rounds"][1]["policy_from"] == str(ppo1 / "final_policy")
    assert [d["path"] for d in second["rounds"][1]["reward_model_datasets"]] == [str(ds1), str(ds2)]
    assert json.loads((ppo2 / "summary.json").read_text())["lineage"] == second


def test_a_reward_model_of_an_unrelated_base_is_still_refused(run, tmp_path):
    """The lineage opens the check to a policy's own root base model only: another base model is refused."""
    ds, rm = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "3", "--num-tasks", "4", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--dataset", ds, "--out", rm, "--epochs", "1", "--toy-train-steps", "8")
    proc = run("train_ppo.py", *TINY, "--toy-train-steps", "9", "--epochs", "1", "--reward", "rm", "--reward-model", rm,
               "--output-dir", tmp_path / "ppo", check=False)
    assert proc.returncode == 1 and "nor the one it was fine-tuned from" in proc.stderr


def test_several_datasets_are_refused_when_they_do_not_fit_together(tmp_path):
    """train_reward.py --dataset A,B: datasets of different base models, --rankings with several datasets and a
    missing list file each stop in one sentence, before any model is loaded."""
    import train_reward
    for name, base_model in (("a", "toy:digit4"), ("b", "toy:digits-rgb")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tasks.jsonl").write_text("")
        (tmp_path / name / "dataset.json").write_text(json.dumps({"base_model": base_model}))
    both = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    with pytest.raises(ValueError, match="do not name one base model"):
        train_reward.load_base(train_reward.Args(dataset=both), set(), "cpu")
    with pytest.raises(ValueError, match="--rankings names one dataset"):
        train_reward.dataset_list(train_reward.Args(dataset=both, rankings=str(tmp_path / "r.jsonl")))
    with pytest.raises(FileNotFoundError, match="no such list"):
        train_reward.dataset_list(train_reward.Args(dataset=str(tmp_path / "rounds.txt")))
    listing = tmp_path / "rounds.txt"
    listing.write_text(f"# round 1\n{tmp_path / 'a'}\n\n{tmp_path / 'b'}\n")
    assert train_reward.dataset_list(train_reward.Args(dataset=str(listing))) == [tmp_path / "a", tmp_path / "b"]
