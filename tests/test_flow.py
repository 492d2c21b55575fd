"""Rectified-flow models: the flow MDP against diffusers and against its own derivation, SD3-class pipelines (tiny,
random weights, built here) through loading, prompts, rollouts, reward models, LoRA training and saving, and the
four steps on the offline flow toy."""
import json
import math

import pytest
import torch

from benchmarks.architectures import build_sd35
from conftest import TINY
from drlhf import models
from drlhf.families import sd3
from drlhf.sampler import (FlowSchedule, SamplerConfig, action_logprob, flow_sigmas, policy_step, rollout,
                           schedule_for_model)
from helpers import passes_reproduce_bits

FLOW = SamplerConfig(sampler="flow", num_steps=4, eta=0.7, prediction_type="flow", clip_sample=None)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_sd35(tmp_path_factory.mktemp("sd3") / "tiny-sd3", "tiny", "cpu")


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


# ---------------------------------------------------------------------------------------------------------
# the MDP
@pytest.mark.parametrize("shift,steps", [(1.0, 10), (3.0, 10), (3.0, 4), (3.0, 1)])
def test_noise_level_0_is_the_diffusers_euler_step_with_its_shift(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    sched = FlowSchedule(flow_sigmas(steps, 1000, shift), SamplerConfig(**{**FLOW.__dict__, "num_steps": steps}),
                         noise_level=0.0)
    torch.testing.assert_close(sched.sigmas.float(), ref.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps, ref.timesteps, rtol=0, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        ref._step_index = None  # each step on its own
        mean, std = sched.distribution(v, x, torch.full((3,), i))
        torch.testing.assert_close(mean, ref.step(v, t, x).prev_sample, rtol=0, atol=1e-5)
        assert std.abs().max() == 0


def test_flow_logprob_is_the_gaussian_density_of_the_sde_step():
    """log pi(a|s) against torch.distributions.Normal with the SDE step written out here from its definition:
    g^2 = a^2 sigma / (1 - sigma) (at sigma = 1 the next sigma's 1 - sigma'), drift v + g^2/(2 sigma) (x + (1 - sigma) v)
    (the score of x = (1 - sigma) x0 + sigma eps is -(x + (1 - sigma) v) / sigma), step dt < 0, std g sqrt(-dt)."""
    sigmas = flow_sigmas(5, 1000, 3.0)
    sched = FlowSchedule(sigmas, SamplerConfig(**{**FLOW.__dict__, "num_steps": 5}))
    v = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = lambda x, t, c: v  # noqa: E731 - a fixed velocity field
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for i in range(5):
        idx = torch.full((2,), i)
        out = policy_step(model, sched, x, idx, None, generator=torch.Generator().manual_seed(i))
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        dt = s_next - s
        g2 = 0.7 ** 2 * s / (1 - (s_next if s == 1 else s))
        mean = x.double() + (v.double() + g2 / (2 * s) * (x.double() + (1 - s) * v.double())) * dt
        normal = torch.distributions.Normal(mean, math.sqrt(g2 * -dt))
        torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logprob.double(), normal.log_prob(out.action.double()).flatten(1).sum(1),
                                   rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(action_logprob(model, sched, x, idx, None, out.action), out.logprob)
        x = out.action


@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_the_sde_keeps_the_flows_marginals(noise_level):
    """For data x0 ~ N(0, c^2) the flow's velocity is known in closed form, v = (sigma - (1 - sigma) c^2) x / var(x);
    the stochastic steps from pure noise must end with the data's spread c at every noise level (the marginals
    are the ODE's), here to within 3 % with 200 steps."""
    c, n, steps = 0.5, 20000, 200

    def velocity(x, t, cond):
        s = (t.float() / 1000).view(-1, 1)
        return (s - (1 - s) * c ** 2) * x / ((1 - s) ** 2 * c ** 2 + s ** 2)

    cfg = SamplerConfig(**{**FLOW.__dict__, "num_steps": steps, "eta": max(noise_level, 0.1)})
    sched = FlowSchedule(flow_sigmas(steps), cfg, noise_level=noise_level)
    g = torch.Generator().manual_seed(0)
    buf = rollout(velocity, sched, torch.randn(n, 1, generator=g), generator=g)
    assert abs(buf.samples.std().item() - c) < 0.03 * c, buf.samples.std().item()


def test_the_sampler_must_match_the_model():
    with pytest.raises(ValueError, match="--sampler flow"):
        schedule_for_model({"_class_name": "FlowMatchEulerDiscreteScheduler"}, False, "ddpm", 4)
    with pytest.raises(ValueError, match="ddpm or ddim"):
        schedule_for_model({"_class_name": "DDPMScheduler"}, False, "flow", 4)
    with pytest.raises(ValueError, match="--eta must be > 0"):
        schedule_for_model({"_class_name": "FlowMatchEulerDiscreteScheduler"}, False, "flow", 4, eta=0.0)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):  # a resolution-dependent shift needs its family's mu
        schedule_for_model({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, False,
                           "flow", 4)


# FLUX.1-dev's, FLUX.1-schnell's and Qwen-Image's published scheduler configs, and the linear time shift
DYNAMIC = {"FLUX.1-dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
           "FLUX.1-schnell": dict(shift=1.0, use_dynamic_shifting=False),
           "Qwen-Image": dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                              max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
           "linear": dict(use_dynamic_shifting=True, time_shift_type="linear")}


@pytest.mark.parametrize("name", list(DYNAMIC))
@pytest.mark.parametrize("tokens,steps,pipeline_sigmas", [(4, 3, True), (1024, 10, True), (4096, 28, True),
                                                          (1024, 10, False)])
def test_resolution_dependent_shift_is_the_schedulers(name, tokens, steps, pipeline_sigmas):
    """scheduler_sigmas with the pipelines' sigmas (1 .. 1/T) and mu from the image's token count, or the scheduler's
    own spacing, against FlowMatchEulerDiscreteScheduler.set_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from drlhf.sampler import calculate_shift, scheduler_sigmas
    config = dict(DYNAMIC[name], num_train_timesteps=1000)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(tokens, config)
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist() if pipeline_sigmas else None
    ref.set_timesteps(steps, sigmas=sigmas, mu=mu)
    ours = scheduler_sigmas(config, steps, sigmas, mu)
    torch.testing.assert_close(ours.float(), ref.sigmas, rtol=0, atol=2e-6)
    if config.get("use_dynamic_shifting"):  # the shift grows with the image: more steps at high noise (the first
        larger = scheduler_sigmas(config, steps, sigmas, calculate_shift(4 * tokens, config))  # is 1, a terminal fixed)
        assert (larger[1:-2] > ours[1:-2]).all() and (larger >= ours - 1e-12).all()


# ---------------------------------------------------------------------------------------------------------
# SD3-class pipelines
def test_sd3_prompts_and_noise_level_0_reproduce_the_diffusers_pipeline(tiny_sd3):
    """Our packed conditioning holds exactly the pipeline's prompt embeddings and pooled projection, and our rollout
    at noise level 0 with CFG is StableDiffusion3Pipeline's own sampling loop."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a red cat", None, None, do_classifier_free_guidance=True,
                                                         negative_prompt="")
    base = models.load_base_model(str(tiny_sd3))
    cond = base.encode_prompts(["a red cat", ""])
    ours, ours_pooled = sd3.unpack(cond, base.net.config.pooled_projection_dim)
    torch.testing.assert_close(ours, torch.cat([embeds, neg]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_pooled, torch.cat([pooled, neg_pooled]), rtol=1e-4, atol=1e-4)
    x = torch.randn(1, *base.sample_shape, generator=torch.Generator().manual_seed(0))
    want = pipe(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=x.clone(),
                output_type="latent", height=64, width=64).images
    sched = FlowSchedule(flow_sigmas(4, 1000, base.scheduler_config["shift"]),
                         SamplerConfig(**{**FLOW.__dict__, "guidance_scale": 4.5}), noise_level=0.0)
    got = rollout(models.make_denoiser(base, 4.5), sched, x, cond[:1]).samples
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_transformer_reward_model_is_its_first_half_and_knows_its_base(tiny_sd3, tmp_path):
    from drlhf.reward_model import RewardModel, RewardModelError, load_reward_model
    base = models.load_base_model(str(tiny_sd3))
    n_blocks = len(base.net.transformer_blocks)
    rm = RewardModel(base.net, "text", base.encode_prompts([""]), trainable="mid")
    assert len(rm.encoder.transformer_blocks) == n_blocks // 2 and len(base.net.transformer_blocks) == n_blocks
    assert rm.encoder.proj_out is None and base.net.proj_out is not None
    trained = {n.split(".")[0] + "." + n.split(".")[1] for n, p in rm.named_parameters() if p.requires_grad}
    assert trained == {"head.query", "head.img_proj", "head.cond_proj", "head.null_cond", "head.attn", "head.norm",
                       "head.out", "encoder.transformer_blocks"}
    x, cond = torch.randn(3, *base.sample_shape), base.encode_prompts(["a red cat", "a blue dog", "a cat"])
    r = rm(x, None, cond)
    assert r.shape == (3,) and torch.isfinite(r).all()
    r.sum().backward()
    assert rm.encoder.transformer_blocks[-1].attn.to_q.weight.grad is not None
    rm.save(tmp_path / "rm", dict(base_model=str(tiny_sd3), input_shape=list(base.sample_shape)))
    loaded, config = load_reward_model(tmp_path / "rm", base)
    torch.testing.assert_close(loaded(x, None, cond), rm(x, None, cond).detach())
    assert config["encoder_blocks"][-1] == f"transformer_blocks[:{n_blocks // 2}]"
    other = build_sd35(tmp_path / "other", "tiny", "cpu")  # same architecture, other weights: refused
    torch.manual_seed(1)
    other_base = models.load_base_model(str(other))
    with torch.no_grad():
        other_base.net.pos_embed.proj.weight.add_(1.0)
    with pytest.raises(RewardModelError, match="not the base model loaded now"):
        load_reward_model(tmp_path / "rm", other_base)


def test_sd3_lora_run_critic_from_the_transformer_and_pipeline_round_trip(run, tiny_sd3, tmp_path):
    """train_ppo.py on a tiny SD3.5-shaped pipeline: LoRA on the joint attention, a value function from the
    transformer's first half, gradient checkpointing, fp32; the ratio starts at 1, --advantage group runs on the same
    path, and the final policy is a StableDiffusion3Pipeline whose transformer differs from the base only in the
    adapted projections."""
    from diffusers import StableDiffusion3Pipeline

    SD3_ATTENTION = sd3.SD3Family.lora_targets  # the default for SD3: the joint attention's projections
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    common = ["--pretrained", tiny_sd3, "--sampler", "flow", "--eta", "0.7", "--prompts", prompts, "--guidance-scale",
              "4.5", "--latent", "true", "--conditioning", "text", "--resolution", "32", "--reward",
              "tests.helpers:mean_brightness", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", SD3_ATTENTION,
              "--num-envs", "4", "--group-size", "2", "--num-steps", "3", "--minibatch-size", "4", "--eval-samples", "2",
              "--eval-every", "1", "--policy-warmup-steps", "0", "--policy-lr", "1e-2", "--epochs", "2",
              "--gradient-checkpointing", "true", "--logprob-reduction", "mean"]
    out = tmp_path / "gae"
    proc = run("train_ppo.py", *common, "--value-fn", "unet", "--output-dir", out)
    assert "text, latent (16, 4, 4)), 3 steps flow (noise level 0.7)" in proc.stdout
    dev = _scalars(out, "losses/ratio_dev_at_start")
    assert dev == [0.0, 0.0] if passes_reproduce_bits() else max(dev) < 1e-3, dev
    assert _scalars(out, "losses/value_loss")
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "final_policy")
    tuned, base = pipe.transformer.state_dict(), StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer.state_dict()
    assert tuned.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(any(t in k for t in SD3_ATTENTION.split(",")) for k in changed)
    again = models.load_base_model(str(out / "final_policy"))  # and our loader reads it as a base model
    assert again.family.name == "SD3 transformer" and again.any_size and again.lineage["root"]["base_model"] == str(tiny_sd3)
    group = tmp_path / "group"
    run("train_ppo.py", *common, "--advantage", "group", "--value-fn", "none", "--epochs", "1", "--output-dir", group)
    assert _scalars(group, "losses/ratio_dev_at_start")


# ---------------------------------------------------------------------------------------------------------
# the offline flow toy: the four steps
def test_target_flow_four_steps_offline(run, tmp_path):
    """sample.py, label.py --auto, train_reward.py and train_ppo.py --reward rm on the rectified-flow toy (its shipped
    weights), with --exp target-flow's sampler: the dataset records the flow sampler, the reward model trains on it,
    and PPO runs on it with a value function."""
    ds, rm_dir, out = tmp_path / "ds", tmp_path / "rm", tmp_path / "ppo"
    run("sample.py", "--exp", "target-flow", "--num-steps", "5", "--num-tasks", "12", "--k", "4", "--out", ds)
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["sampler"]["sampler"] == "flow" and meta["sampler"]["eta"] == 0.7
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--exp", "target-flow", "--dataset", ds, "--out", rm_dir, "--epochs", "3",
        "--batch-tasks", "4", "--val-fraction", "0.25")
    run("train_ppo.py", "--exp", "target-flow", *TINY[2:], "--epochs", "2", "--reward", "rm", "--reward-model", rm_dir,
        "--value-fn", "reward", "--output-dir", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and math.isfinite(summary["final_reward_mean"])


def test_benchmark_tiny_pickscore_sd3_builds_a_loadable_pipeline(run, tmp_path):
    """benchmarks/epoch.py --exp pickscore-sd3 at toy widths: SD3.5-Medium's classes and a PickScore-shaped CLIP built
    at random weights, one timed epoch of critic + GAE and of the group baseline; the saved folder is an ordinary
    StableDiffusion3Pipeline (what a peer trainer loads for a side-by-side)."""
    from diffusers import StableDiffusion3Pipeline
    small = ["--size", "tiny", "--device", "cpu", "--num-envs", "4", "--group-size", "2", "--num-steps", "3",
             "--minibatch-size", "4", "--grad-accum-steps", "3", "--bench-epochs", "1", "--no-flops",
             "--models-dir", tmp_path / "models"]
    for name, extra in (("gae", []), ("group", ["--advantage", "group", "--value-fn", "none"])):
        run("benchmarks/epoch.py", "--exp", "pickscore-sd3", *small, *extra, "--json", tmp_path / f"{name}.json")
        r = json.loads((tmp_path / f"{name}.json").read_text())
        assert r["images_per_epoch"] == 4 and r["states_per_epoch"] == 12 and r["epochs"][0]["update"] > 0
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "models" / "sd35m-tiny")
    assert pipe.transformer.config.dual_attention_layers == [0] and pipe.scheduler.config.shift == 3.0


def test_sd3_dataset_at_another_resolution_trains_a_transformer_reward_model(run, tiny_sd3, tmp_path):
    """sample.py --resolution on an SD3 pipeline records the size it sampled at; train_reward.py rebuilds the base
    model at that size and trains the transformer-half reward model; train_ppo.py scores with it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    ds, rm_dir = tmp_path / "ds", tmp_path / "rm"
    run("sample.py", "--pretrained", tiny_sd3, "--sampler", "flow", "--eta", "0.7", "--num-steps", "2", "--prompts",
        prompts, "--guidance-scale", "4.5", "--resolution", "32", "--num-tasks", "8", "--k", "2", "--out", ds,
        "--instructions", "builtin:digits")
    assert json.loads((ds / "dataset.json").read_text())["sample_shape"] == [16, 4, 4]
    run("label.py", "--auto", "builtin:ink", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--dataset", ds, "--out", rm_dir, "--epochs", "2", "--batch-tasks", "2",
        "--val-fraction", "0.25")
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["input_shape"] == [16, 4, 4] and config["encoder_blocks"][-1] == "transformer_blocks[:1]"
    run("train_ppo.py", "--pretrained", tiny_sd3, "--sampler", "flow", "--eta", "0.7", "--prompts", prompts,
        "--latent", "true", "--conditioning", "text", "--resolution", "32", "--reward", "rm", "--reward-model", rm_dir,
        "--value-fn", "reward", "--num-envs", "2", "--num-steps", "2", "--minibatch-size", "2", "--eval-samples", "2",
        "--eval-every", "1", "--epochs", "1", "--output-dir", tmp_path / "ppo")
