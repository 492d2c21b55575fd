"""The contract every model family's adapter keeps (drlhf/families), one test per clause, parametrized over the
families at tiny random weights built here (offline): the toys (DDPM and flow), Stable Diffusion v1.5, OpenAI's
guided-diffusion U-Net (ADM), SD3, FLUX.1 (dev, with its guidance input, and schnell) and Qwen-Image.

1. the rollout at noise level 0 is the family's own diffusers loop (its pipeline where it has one);
2. one PPO epoch with the critic and the per-step KL (the PPO ratio exactly 1 at the start of the update, the KL to the
   frozen base exactly 0 in the first epoch) and one with --advantage group;
3. one reward-model training step, saved and loaded back; a reward model of another family is refused;
4. the policy saved as the family's pipeline loads as that pipeline and as a base model, with the same weights.

A new family passes by adding its adapter (drlhf/families) and one line to MODELS below: how to build a tiny
model, and the diffusers loop it must reproduce.
"""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.architectures import build_flux, build_guided, build_qwen_image, build_sd35
from drlhf import models
from drlhf.families.base import pack_patches
from drlhf.sampler import DiffusionSchedule, FlowSchedule, SamplerConfig, rollout, schedule_for_model
from helpers import passes_reproduce_bits
from tiny_sd import build_tiny_sd


def _adm(folder: Path) -> str:
    return f"guided-diffusion:{build_guided(folder, 'tiny', 'cpu') / '64x64_diffusion.pt'}"


# name -> (build(folder) -> --pretrained, resolution of the runs, the family's diffusers pipeline class or None,
#          guidance scale of the loop and the runs)
MODELS = {
    "toy DDPM": (lambda folder: "toy:digit4", 16, "DDPMPipeline", 1.0),
    "toy flow": (lambda folder: "toy:digit4-flow", 16, "DDPMPipeline", 1.0),
    "SD1.5": (lambda folder: str(build_tiny_sd(folder)), 32, "StableDiffusionPipeline", 7.5),
    "ADM": (_adm, 64, None, 1.0),
    "SD3": (lambda folder: str(build_sd35(folder, "tiny", "cpu")), 32, "StableDiffusion3Pipeline", 4.5),
    "FLUX.1": (lambda folder: str(build_flux(folder, "tiny", "cpu")), 32, "FluxPipeline", 3.5),
    "FLUX.1-schnell": (lambda folder: str(build_flux(folder, "tiny", "cpu", "schnell")), 32, "FluxPipeline", 1.0),
    "Qwen-Image": (lambda folder: str(build_qwen_image(folder, "tiny", "cpu")), 32, "QwenImagePipeline", 4.0),
}
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory, cache_dir):
    """--pretrained of each family's tiny model, built once (the toys train for 8 steps into the test cache)."""
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name.replace(" ", "-").replace(".", "")) for name, (build, *_) in MODELS.items()}


def _load(specs, cache_dir, name):
    base = models.load_base_model(specs[name], cache_dir=cache_dir, toy_train_steps=8)
    base.expect(resolution=MODELS[name][1])
    return base


def _conditions(base, n):
    if base.conditioning == "text":
        return base.encode_prompts((PROMPTS * n)[:n])
    if base.conditioning == "class":
        return torch.arange(n) % base.num_classes
    return None


# ---------------------------------------------------------------------------------------------------------
# 1. noise level 0 is the family's own loop
def _reference(name, base, spec, x, cond, steps, guidance):
    """The family's own diffusers sampling loop from x (deterministic: DDIM with eta 0, or the flow's Euler steps)."""
    import diffusers
    pipeline = MODELS[name][2]
    if name in ("SD3", "FLUX.1", "FLUX.1-schnell", "Qwen-Image"):  # the pipeline itself, from the same latents
        pipe = getattr(diffusers, pipeline).from_pretrained(spec)
        size = dict(height=x.shape[2] * 8, width=x.shape[3] * 8)
        kwargs = dict(SD3=dict(guidance_scale=guidance, negative_prompt=""), **{
            "FLUX.1": dict(guidance_scale=guidance), "FLUX.1-schnell": dict(guidance_scale=0.0),
            "Qwen-Image": dict(true_cfg_scale=guidance, negative_prompt=base.family.negative_prompt)})[name]
        latents = x if name == "SD3" else pack_patches(x)
        out = pipe(prompt=PROMPTS[0], num_inference_steps=steps, latents=latents.clone(), output_type="latent",
                   **size, **kwargs).images
        return out  # FLUX.1 and Qwen-Image: packed tokens (compared packed)
    if name == "SD1.5":
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(spec, safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe(prompt=PROMPTS[0], num_inference_steps=steps, latents=x.clone(), guidance_scale=guidance, eta=0.0,
                    output_type="latent", height=x.shape[2] * 8, width=x.shape[3] * 8).images
    # the U-Nets without a pipeline of their own for this loop: the scheduler's loop, as the pipelines write it
    flow = name == "toy flow"
    scheduler = (diffusers.FlowMatchEulerDiscreteScheduler if flow else diffusers.DDIMScheduler).from_config(
        base.scheduler_config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = models.make_denoiser(base, guidance)(x, t.expand(len(x)), cond)[:, :x.shape[1]]
            x = scheduler.step(out, t, x).prev_sample if flow else \
                scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.parametrize("name", list(MODELS))
def test_noise_level_0_rollout_is_the_familys_own_loop(specs, cache_dir, name):
    base, guidance, steps = _load(specs, cache_dir, name), MODELS[name][3], 3
    x = torch.randn(1, *base.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = _conditions(base, 1)
    schedule = schedule_for_model(base.scheduler_config, base.is_latent, None, steps, eta=0.7, guidance_scale=guidance,
                                  flow_timesteps=base.flow_timesteps(steps))
    if isinstance(schedule, FlowSchedule):  # the same sigmas at noise level 0: the Euler step of the flow's ODE
        schedule = FlowSchedule(schedule.sigmas, schedule.cfg, schedule.num_train_timesteps, noise_level=0.0)
    else:  # DDIM with eta 0 (a deterministic step is not a policy: built here, refused by SamplerConfig)
        cfg = SamplerConfig(**{**schedule.cfg.__dict__, "sampler": "ddim", "eta": 1.0})
        cfg.eta = 0.0
        schedule = DiffusionSchedule.from_config(base.scheduler_config, cfg)
    with torch.no_grad():
        got = rollout(models.make_denoiser(base, guidance), schedule, x, cond).samples
    want = _reference(name, base, specs[name], x, cond, steps, guidance)
    if got.shape != want.shape:  # the pipeline's packed tokens
        got = pack_patches(got)
    assert torch.isfinite(got).all() and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 2. one PPO epoch with the critic, one with group advantages
def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _ppo_flags(specs, name, tmp_path):
    _, resolution, _, guidance = MODELS[name]
    flags = ["--pretrained", specs[name], "--toy-train-steps", "8", "--resolution", resolution, "--guidance-scale",
             guidance, "--reward", "tests.helpers:mean_brightness", "--num-envs", "4", "--group-size", "2",
             "--num-steps", "2", "--minibatch-size", "4", "--eval-samples", "2", "--eval-every", "1",
             "--policy-warmup-steps", "0", "--vf-warmup-steps", "0", "--epochs", "1", "--logprob-reduction", "mean"]
    if name in ("SD1.5", "SD3", "FLUX.1", "FLUX.1-schnell", "Qwen-Image"):
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        flags += ["--prompts", prompts, "--lora-rank", "2"]
    if name == "ADM":
        flags += ["--class-labels", "1,2"]
    return flags


@pytest.mark.parametrize("name", list(MODELS))
def test_one_ppo_epoch_with_the_critic_and_one_with_group_advantages(run, specs, tmp_path, name):
    flags = _ppo_flags(specs, name, tmp_path)
    critic, group = tmp_path / "critic", tmp_path / "group"
    critic_flags = ["--value-fn", "unet"]  # the critic on the base network's encoder half (thesis 5.2)
    if name == "ADM":  # thesis 6.5: OpenAI's noisy-image classifier
        critic_flags = ["--value-fn", "classifier", "--classifier", specs[name].replace("diffusion.pt", "classifier.pt")]
    run("train_ppo.py", *flags, *critic_flags, "--kl-coef", "0.01", "--output-dir", critic)
    exact = passes_reproduce_bits()
    dev = _scalars(critic, "losses/ratio_dev_at_start")
    assert dev and (dev == [0.0] if exact else max(dev) < 1e-3), dev  # the ratio is 1 at the start
    kl = _scalars(critic, "objective/kl")  # pi_base (a LoRA run: the policy with its adapters off) is the policy
    assert kl and (kl == [0.0] if exact else abs(kl[0]) < 1e-3), kl  # in the first epoch
    assert _scalars(critic, "losses/value_loss")
    run("train_ppo.py", *flags, "--value-fn", "none", "--advantage", "group", "--output-dir", group)
    assert _scalars(group, "losses/ratio_dev_at_start")
    summary = json.loads((group / "summary.json").read_text())
    assert summary


# ---------------------------------------------------------------------------------------------------------
# 3. a reward-model step; another family's reward model is refused
@pytest.mark.parametrize("name", list(MODELS))
def test_reward_model_step_round_trip_and_another_familys_refused(specs, cache_dir, tmp_path, name):
    from drlhf.reward_model import RewardModel, RewardModelError, load_reward_model
    base = _load(specs, cache_dir, name)
    null = base.encode_prompts([""]) if base.conditioning == "text" else None
    if not base.family.reward_model:  # OpenAI's U-Net: its reward model is the noisy-image classifier's
        with pytest.raises(ValueError, match="classifier"):
            RewardModel(base.net, base.conditioning, null, base.num_classes)
        return
    rm = RewardModel(base.net, base.conditioning, null, base.num_classes, trainable="mid")
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(4, *base.sample_shape, generator=g), torch.zeros(4, dtype=torch.long), _conditions(base, 4)
    before = {k: v.clone() for k, v in rm.trainable_state().items()}
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-3)
    r = rm(x, t, cond)
    loss = -torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).mean()  # Bradley-Terry: the even ones preferred
    loss.backward()
    opt.step()
    after = rm.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before) and torch.isfinite(r).all()
    rm.save(tmp_path / "rm", dict(base_model=specs[name], input_shape=list(base.sample_shape)))
    loaded, config = load_reward_model(tmp_path / "rm", base)
    assert config["family"] == base.family.name
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, t, cond), rm.eval()(x, t, cond))
    other = _load(specs, cache_dir, "toy DDPM" if name in ("SD3", "FLUX.1", "FLUX.1-schnell", "Qwen-Image") else "SD3")
    assert other.family is not base.family
    with pytest.raises(RewardModelError, match=f"is built on a {base.family.name}"):
        load_reward_model(tmp_path / "rm", other)


# ---------------------------------------------------------------------------------------------------------
# 4. save -> load as the family's own pipeline
@pytest.mark.parametrize("name", list(MODELS))
def test_policy_saves_as_the_familys_pipeline(specs, cache_dir, tmp_path, name):
    import diffusers
    base = _load(specs, cache_dir, name)
    with torch.no_grad():
        next(iter(base.net.parameters())).add_(0.5)  # a "trained" policy: not the base's weights
    models.save_pipeline(base.net, base, tmp_path / "policy")
    want = base.net.state_dict()
    pipeline = MODELS[name][2]
    if pipeline is None:  # OpenAI's U-Net: its own key names in guided_unet.safetensors
        from safetensors.torch import load_file
        got = load_file(tmp_path / "policy" / "guided_unet.safetensors")
    else:
        pipe = getattr(diffusers, pipeline).from_pretrained(tmp_path / "policy")
        got = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).state_dict()
        again = models.load_base_model(str(tmp_path / "policy"))
        assert again.family is base.family and again.conditioning == base.conditioning
        assert models.base_fingerprint(again.net) == models.base_fingerprint(base.net)
    assert got.keys() == want.keys() and all(torch.equal(got[k].float(), want[k].float()) for k in want)
