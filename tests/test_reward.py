"""The reward model (thesis 5.2) and train_reward.py: Eq. 5.1 against a naive loop, invariances, standardization,
reward guidance, base-model checks, and the four-step loop offline at toy size."""
import json
from itertools import permutations

import pytest
import torch
import torch.nn.functional as F

import train_reward
from conftest import TINY
from drlhf import models, toys
from drlhf.reward_model import RewardModel, RewardModelError, base_fingerprint, load_reward_model


def test_ranking_loss_equals_a_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    rankings = [[[2], [0, 4], [1], [3]], [[4], [3], [2], [1], [0]]]
    rewards = torch.randn(2, 5, generator=g)
    win = torch.stack([train_reward.pair_matrices(r, [], 5)[0] for r in rankings])
    tie = torch.stack([train_reward.pair_matrices(r, [], 5)[1] for r in rankings])
    for ties in ("exclude", "half"):
        per_task = []
        for b, ranking in enumerate(rankings):
            rank = {i: n for n, grp in enumerate(ranking) for i in grp}
            total, count = 0.0, 0
            for i in range(5):
                for j in range(i + 1, 5):
                    d = (rewards[b, i] - rewards[b, j]).item()
                    if rank[i] == rank[j]:
                        if ties == "half":  # cross-entropy toward 0.5
                            total += -0.5 * F.logsigmoid(torch.tensor(d)) - 0.5 * F.logsigmoid(torch.tensor(-d))
                            count += 1
                        continue
                    w, lo = (i, j) if rank[i] < rank[j] else (j, i)
                    total += -F.logsigmoid(rewards[b, w] - rewards[b, lo]).item()  # Eq. 5.1
                    count += 1
            per_task.append(float(total) / count)
        ours = train_reward.ranking_loss(rewards, win, tie, ties).item()
        assert ours == pytest.approx(sum(per_task) / 2, rel=1e-6)


def test_loss_is_invariant_to_the_order_of_images_in_a_task():
    g = torch.Generator().manual_seed(1)
    ranking = [[3], [1, 0], [4], [2]]
    r = torch.randn(5, generator=g)
    win, tie = train_reward.pair_matrices(ranking, [], 5)
    ref = train_reward.ranking_loss(r[None], win[None], tie[None], "half")
    for perm in list(permutations(range(5)))[::17]:
        p = torch.tensor(perm)  # image p[n] is shown at position n
        inv = {old: new for new, old in enumerate(perm)}
        ranking_p = [[inv[i] for i in grp] for grp in ranking]
        wp, tp = train_reward.pair_matrices(ranking_p, [], 5)
        assert train_reward.ranking_loss(r[p][None], wp[None], tp[None], "half").item() == pytest.approx(ref.item())


def test_both_bad_images_rank_last():
    win, _ = train_reward.pair_matrices([[0], [1], [2]], both_bad=[0], k=3)
    assert win[1, 0] == 1 and win[2, 0] == 1 and win[1, 2] == 1 and win[0].sum() == 0


def _class_unet():
    torch.manual_seed(0)
    return toys.toy_unet(3, 16, class_cond=True).eval()


def test_reward_model_guidance_fingerprint_and_frozen_encoder():
    unet = _class_unet()
    rm = RewardModel(unet, "class", num_classes=10).eval()
    assert all(not p.requires_grad for p in rm.encoder.parameters())
    assert all(p.requires_grad for p in rm.head.parameters())
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    with torch.no_grad():
        r_c = rm.raw(x, None, y)
        r_u = rm.raw(x, None, y, torch.ones(3, dtype=torch.bool))
        torch.testing.assert_close(rm(x, None, y, guidance=3.0, standardize=False), r_u + 3.0 * (r_c - r_u),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(r_c, r_u)  # the condition matters
        t = torch.tensor([0, 500, 999])
        assert not torch.allclose(rm.raw(x, t, y), r_c)  # the timestep input matters (value function use)
    other = _class_unet()
    with torch.no_grad():
        other.conv_in.weight.add_(0.01)
    assert base_fingerprint(other) != base_fingerprint(unet)


def test_unconditional_and_text_reward_models_run():
    torch.manual_seed(0)
    rm = RewardModel(toys.toy_unet(1, 16, class_cond=False), "none")
    assert rm(torch.randn(2, 1, 16, 16)).shape == (2,)
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8)
    rm = RewardModel(unet, "text", null_text=torch.randn(1, 7, 32))
    out = rm(torch.randn(2, 4, 8, 8), None, torch.randn(2, 7, 32), guidance=2.0)
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_four_step_loop_offline(run, tmp_path):
    """sample.py -> label.py --auto (gold: mean brightness) -> train_reward.py -> train_ppo.py --reward rm, at toy
    size: every file contract holds, the stored standardization gives mean 0 / std 1 on the training images, and
    a reward model on another base model is refused."""
    ds, rm_dir = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "5", "--num-tasks", "12", "--k", "4", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--dataset", ds, "--out", rm_dir, "--epochs", "3", "--batch-tasks", "4",
        "--toy-train-steps", "8", "--val-fraction", "0.25")
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["base_model"] == "toy:digit4" and 0 <= config["val_accuracy"] <= 1
    assert (rm_dir / "model.safetensors").exists() and list((rm_dir / "tb").glob("events.*"))
    # Eq. 5.2 on the training images, recomputed from the saved folder
    base = models.load_base_model("toy:digit4", toy_train_steps=8, cache_dir=run.cache_dir)
    rm, _ = load_reward_model(rm_dir, base)
    args = train_reward.Args(dataset=str(ds), toy_train_steps=8, val_fraction=0.25)
    data = train_reward.load_tasks(args, base, "cpu")
    train = [i for i, s in enumerate(data["split"]) if s == "train"]
    with torch.no_grad():
        z = rm(data["x"][train].flatten(0, 1)).double()
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-4
    out = tmp_path / "ppo"
    run("train_ppo.py", *TINY, "--reward", "rm", "--reward-model", rm_dir, "--value-fn", "reward",
        "--eval-reward", "label:ink_score", "--epochs", "2", "--output-dir", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward"] == "label:ink_score" and "eval_reward_gain_in_base_std" in summary
    other = run("train_ppo.py", *TINY, "--pretrained", "toy:digits-rgb", "--reward", "rm", "--reward-model", rm_dir,
                "--value-fn", "encoder", "--output-dir", tmp_path / "x", check=False)
    assert other.returncode == 1 and "not the base model loaded now" in other.stderr
    with pytest.raises(RewardModelError, match="expected config.json"):
        load_reward_model(tmp_path, base)


def test_frozen_blocks_get_no_gradient_and_save_reload_is_identical(tmp_path):
    unet = _class_unet()
    rm = RewardModel(unet, "class", num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    rm(x, None, y, standardize=False).sum().backward()
    assert all(p.grad is None for p in rm.encoder.parameters())  # frozen: not even a zero gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in rm.head.named_parameters()
               if n != "null_cond")
    rm.reward_mean.fill_(0.3)
    rm.reward_std.fill_(2.0)
    rm.save(tmp_path / "rm", dict(base_model="toy"))
    base = models.BaseModel("toy", "toy", unet, {}, "class", (3, 16, 16), 10)
    again, config = load_reward_model(tmp_path / "rm", base)
    rm.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(rm(x, None, y, guidance=2.0), again(x, None, y, guidance=2.0))
    assert config["reward_std"] == 2.0 and config["trainable"] == "head"


def test_bad_rankings_are_named(run, tmp_path):
    ds = tmp_path / "ds"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "3", "--num-tasks", "4", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    good = (ds / "rankings.jsonl").read_text()
    common = ["train_reward.py", "--dataset", ds, "--epochs", "1", "--toy-train-steps", "8", "--out", tmp_path / "rm"]

    def fails_with(text, rankings):
        (tmp_path / "r.jsonl").write_text(rankings)
        proc = run(*common, "--rankings", tmp_path / "r.jsonl", check=False)
        assert proc.returncode == 1 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    rows = [json.loads(line) for line in good.splitlines()]
    fails_with("does not have", json.dumps({**rows[0], "task_id": 99}) + "\n")              # unknown task
    fails_with("does not cover images", json.dumps({**rows[0], "ranking": [[0], [7]]}) + "\n")  # unknown image
    fails_with("another labeling dataset", json.dumps({**rows[0], "dataset": "0" * 16}) + "\n")
    fails_with("no training tasks", "".join(json.dumps({**r, "split": "val"}) + "\n" for r in rows))
    lines = (ds / "tasks.jsonl").read_text().splitlines()
    one = json.loads(lines[0])
    one["images"] = one["images"][:1]
    (ds / "tasks.jsonl").write_text("\n".join([json.dumps(one)] + lines[1:]) + "\n")
    fails_with(">= 2", good)


def test_train_reward_under_torchrun(run, tmp_path):
    ds = tmp_path / "ds"
    run("sample.py", "--toy-train-steps", "8", "--num-steps", "3", "--num-tasks", "8", "--k", "3", "--out", ds)
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_reward.py", "--dataset", ds,
        "--epochs", "2", "--batch-tasks", "4", "--toy-train-steps", "8", "--device", "cpu", "--out", tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["reward_std"] > 0 and "train_accuracy" in config
