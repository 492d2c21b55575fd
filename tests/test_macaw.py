"""Macaw (thesis 6.7) and Macaw without RL (thesis 6.8) offline: the classifier-based reward model, PPO with the
classifier value function, and the reward back-propagated through the sampling chain, on the colour digits."""
import json

import pytest
import torch

from conftest import TINY
from drlhf import models, toys
from drlhf.reward_model import ClassifierRewardModel, RewardModelError, load_reward_model
from drlhf.sampler import DiffusionSchedule, ReparameterizedChain, policy_step


def tiny_policy():
    torch.manual_seed(0)
    unet = toys.toy_unet(3, 8, class_cond=True)
    base = models.BaseModel("toy", "", unet, {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True}, "class",
                            (3, 8, 8), 10)
    schedule = DiffusionSchedule.for_model(base.scheduler_config, False, num_steps=4)
    return base, models.make_denoiser(base), schedule


def test_chain_is_the_policy_and_checkpointing_changes_nothing():
    """The reparameterized chain takes exactly the policy's steps (same noise -> same x_0 as policy_step), and
    per-step checkpointing gives the same x_0 and the same gradients as keeping every activation."""
    base, policy, schedule = tiny_policy()
    g = torch.Generator().manual_seed(1)
    x_T, cond = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([1, 4, 7])
    noise = torch.randn(4, 3, 3, 8, 8, generator=g)
    with torch.no_grad():  # policy_step with its noise drawn from a generator replaying the same draws
        x = x_T
        for i in range(4):
            gi = torch.Generator().manual_seed(100 + i)
            z = torch.randn(x.shape, generator=gi)
            out = policy_step(policy, schedule, x, torch.full((3,), i), cond, generator=torch.Generator().manual_seed(100 + i))
            noise[i] = z
            x = out.action
    grads = []
    for ckpt in (False, True):
        base.net.zero_grad(set_to_none=True)
        x_0 = ReparameterizedChain(policy, schedule, checkpoint_steps=ckpt)(x_T, cond, noise)
        torch.testing.assert_close(x_0, x, rtol=0, atol=1e-5)
        x_0.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in base.net.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and len(grads[0]) == sum(p.numel() for p in base.net.parameters())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_policy_only(tmp_path, run):
    """loss = -reward through a frozen classifier reward model: every policy weight gets a gradient, no reward-model
    weight does (thesis 6.8: the reward model's parameters were frozen)."""
    from drlhf import rewards
    base, policy, schedule = tiny_policy()
    clf = models.load_guided_classifier("toy:digits-rgb", run.cache_dir)
    rm = ClassifierRewardModel(clf, "toy:digits-rgb", trainable="encoder")  # trainable in training, frozen in use
    base.sample_shape = (3, 16, 16)
    base.net = toys.toy_unet(3, 16, class_cond=True)
    policy = models.make_denoiser(base)
    rm.save(tmp_path / "rm", dict(input_shape=[3, 16, 16]))
    reward = rewards.build("rm", base, reward_model=tmp_path / "rm", cache_dir=run.cache_dir)
    x_0 = ReparameterizedChain(policy, schedule)(torch.randn(2, 3, 16, 16), torch.tensor([4, 4]),
                                                 torch.randn(4, 2, 3, 16, 16))
    (-reward(x_0, torch.tensor([4, 4])).mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in base.net.parameters())
    assert reward.model.classifier.input_blocks[0][0].weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in reward.model.parameters())
    base.sample_shape = (3, 8, 8)  # a reward model for 16x16 inputs does not fit an 8x8 base model
    with pytest.raises(RewardModelError, match="scores inputs of shape"):
        load_reward_model(tmp_path / "rm", base, cache_dir=run.cache_dir)


def test_macaw_stand_in_end_to_end(run, tmp_path):
    """Steps 1-4 of Macaw on class 4 of the colour digits: sample.py --exp digits-macaw, label.py --auto,
    train_reward.py --exp digits-macaw (toy classifier + linear layer, not standardized), train_ppo.py --exp
    digits-macaw (PPO, classifier value function) and --exp digits-macaw-norl (reward back-propagation: the
    fixed-seed reward rises)."""
    ds, rm_dir = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--exp", "digits-macaw", "--toy-train-steps", "8", "--num-steps", "5", "--num-tasks", "16",
        "--out", ds)
    assert {json.loads(line)["class_label"] for line in (ds / "tasks.jsonl").read_text().splitlines()} == {4}
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--exp", "digits-macaw", "--dataset", ds, "--out", rm_dir, "--epochs", "3",
        "--toy-train-steps", "8", "--val-fraction", "0.25")
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["backbone"] == "classifier" and config["classifier"] == "toy:digits-rgb"
    assert config["reward_mean"] == 0 and config["reward_std"] == 1  # thesis 6.7: outputs not standardized
    out = tmp_path / "ppo"
    proc = run("train_ppo.py", "--exp", "digits-macaw", *TINY, "--reward-model", rm_dir, "--epochs", "1",
               "--output-dir", out)
    assert "class, pixel (3, 16, 16)" in proc.stdout and (out / "checkpoints" / "latest").exists()
    out = tmp_path / "norl"
    proc = run("train_ppo.py", "--exp", "digits-macaw-norl", "--toy-train-steps", "8", "--reward-model", rm_dir,
               "--num-steps", "5", "--num-envs", "8", "--minibatch-size", "10", "--grad-accum-steps", "4",
               "--epochs", "4", "--policy-lr", "1e-3", "--policy-warmup-steps", "1", "--eval-samples", "16",
               "--eval-every", "2", "--checkpoint-every", "2", "--output-dir", out)
    assert "4 minibatches of 10 -> 1 optimizer steps per epoch" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gain_in_base_std"] > 0.5, summary
    state = torch.load(out / "checkpoints" / "epoch_00004" / "state.pt", weights_only=True)
    assert state["state"]["global_step"] == 4 and state["opt_vf"] is None
    assert not (out / "checkpoints" / "epoch_00004" / "value.safetensors").exists()
    bad = run("train_ppo.py", "--exp", "digits-macaw-norl", "--reward-model", rm_dir, "--value-fn", "encoder",
              "--output-dir", tmp_path / "x", check=False)
    assert bad.returncode != 0 and "--value-fn none" in bad.stderr


def test_chain_checkpointing_bounds_memory(run, tmp_path):
    """32 images x 25 steps in one minibatch with gradients through the whole chain: keeping every step's U-Net
    activations costs far more resident memory than keeping only x_t of each step (measured in-process)."""
    rss = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        run("train_ppo.py", "--algo", "backprop", "--value-fn", "none", "--toy-train-steps", "8", "--num-envs", "32",
            "--num-steps", "25", "--minibatch-size", "800", "--epochs", "1", "--eval-samples", "4",
            "--chain-checkpointing", flag,
            "--output-dir", out)
        rss[flag] = json.loads((out / "summary.json").read_text())["peak_rss_gb"]
    assert rss["false"] > rss["true"] + 0.5, rss


# ---------------------------------------------------------------------------------------------------------
# Aesthetic Score (thesis 6.6): the LAION Aesthetics Predictor V2 on a tiny random CLIP
# ---------------------------------------------------------------------------------------------------------
def tiny_aesthetic(tmp_path):
    from tiny_sd import build_tiny_clip
    clip_dir, processor_dir = build_tiny_clip(tmp_path / "clip")
    torch.manual_seed(0)
    dims = [16, 1024, 128, 64, 16, 1]  # the predictor's layout at the tiny CLIP's projection size (768 for ViT-L/14)
    state = {}
    for i, n in zip((0, 2, 4, 6, 7), range(5)):  # layers.1/3/5 are dropouts
        lin = torch.nn.Linear(dims[n], dims[n + 1])
        state.update({f"layers.{i}.weight": lin.weight.detach(), f"layers.{i}.bias": lin.bias.detach()})
    torch.save(state, tmp_path / "mlp.pth")
    return clip_dir, processor_dir, tmp_path / "mlp.pth", state


def test_aesthetic_predictor_matches_the_upstream_recipe(tmp_path):
    """Score = MLP(normalized CLIP image embedding), checked against CLIP's own image processor (PIL, bicubic)
    and CLIPModel.get_image_features with the MLP as plain matmuls; the score is differentiable; bad weights and an
    offline URL are named."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel
    from drlhf.rewards import AestheticReward
    clip_dir, processor_dir, mlp, state = tiny_aesthetic(tmp_path)
    reward = AestheticReward(str(clip_dir), str(mlp))
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1  # upscaled to 32 for CLIP
    pil = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in images]
    pixels = CLIPImageProcessor.from_pretrained(processor_dir)(images=pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = CLIPModel.from_pretrained(clip_dir).get_image_features(pixel_values=pixels)
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output  # transformers 5: an output object
        emb = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            emb = emb @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        ours = reward(images)
    torch.testing.assert_close(ours, emb[:, 0], rtol=0, atol=2e-3)
    x = images.clone().requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad.abs().sum() > 0
    torch.save({"layers.0.weight": torch.zeros(4, 7), "layers.0.bias": torch.zeros(4)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="takes 7-dimensional embeddings"):
        AestheticReward(str(clip_dir), str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="--aesthetic-mlp"):
        from drlhf.rewards import fetch
        fetch("https://127.0.0.1:9/none.pth", tmp_path / "cache")


def test_aesthetic_stand_in_runs_with_the_early_learning_rate(run, tmp_path):
    """--exp digits-aesthetic (Table 6.2 "Aesthetic Score" on the colour digits): the predictor as reward, the toy
    classifier + a linear layer as value function, and the lower policy LR for the first epochs."""
    from test_ppo import _scalars
    clip_dir, _, mlp, _ = tiny_aesthetic(tmp_path)
    out = tmp_path / "run"
    run("train_ppo.py", "--exp", "digits-aesthetic", *TINY, "--aesthetic-clip", clip_dir, "--aesthetic-mlp", mlp,
        "--epochs", "2", "--policy-lr-early-epochs", "1", "--policy-lr-early", "1e-6", "--policy-lr", "3e-6",
        "--policy-warmup-steps", "1", "--output-dir", out)
    assert _scalars(out, "charts/policy_lr") == pytest.approx([1e-6, 3e-6])
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["base_reward_std"] and summary["epochs"] == 2


OPENAI_SIZES = ["--num-envs", "4", "--num-steps", "5", "--epochs", "1", "--eval-samples", "4",
                "--policy-warmup-steps", "1", "--vf-warmup-steps", "1"]


def openai_fixture_flags(tmp_path):
    from helpers import write_openai_checkpoints
    unet, clf = write_openai_checkpoints(tmp_path)
    return ["--pretrained", f"guided-diffusion:{unet}"], ["--classifier", f"guided-diffusion:{clf}"]


def test_imagenet_presets_as_written_on_the_fixture_weights(run, tmp_path):
    """--exp macaw (all four steps) and macaw-norl as the presets stand, on the fixture's reduced OpenAI U-Net and
    classifier saved in the real files' format (read with weights_only=True); only sizes are shrunk."""
    base, classifier = openai_fixture_flags(tmp_path)
    ds, rm = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--exp", "macaw", *base, "--num-tasks", "4", "--num-steps", "5", "--out", ds)
    assert "macaw" in (ds / "instructions.md").read_text().lower()
    run("label.py", "--auto", "builtin:colorfulness", ds)
    run("label.py", "export", ds, "--val-fraction", "0")
    run("train_reward.py", "--exp", "macaw", "--dataset", ds, *classifier, "--epochs", "2", "--out", rm)
    assert json.loads((rm / "config.json").read_text())["input_shape"] == [3, 64, 64]
    proc = run("train_ppo.py", "--exp", "macaw", *base, *classifier, "--reward-model", rm, *OPENAI_SIZES,
               "--minibatch-size", "5", "--output-dir", tmp_path / "macaw")
    assert "class, pixel (3, 64, 64)), 5 steps ddpm/learned_range" in proc.stdout
    proc = run("train_ppo.py", "--exp", "macaw-norl", *base, "--reward-model", rm, *OPENAI_SIZES, "--minibatch-size",
               "10", "--grad-accum-steps", "2", "--output-dir", tmp_path / "norl")
    assert "2 minibatches of 10 -> 1 optimizer steps" in proc.stdout
    for name in ("macaw", "norl"):
        assert (tmp_path / name / "final_policy" / "guided_unet.safetensors").exists(), name


def test_aesthetic_preset_as_written_on_the_fixture_weights(run, tmp_path):
    """--exp aesthetic as the preset stands, on the same fixture weights and a tiny CLIP + predictor MLP."""
    base, classifier = openai_fixture_flags(tmp_path)
    clip_dir, _, mlp, _ = tiny_aesthetic(tmp_path)
    run("train_ppo.py", "--exp", "aesthetic", *base, *classifier, "--aesthetic-clip", clip_dir, "--aesthetic-mlp", mlp,
        *OPENAI_SIZES, "--minibatch-size", "5", "--output-dir", tmp_path / "aesthetic")
    assert (tmp_path / "aesthetic" / "final_policy" / "guided_unet.safetensors").exists()
