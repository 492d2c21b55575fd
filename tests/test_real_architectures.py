"""The real architectures at random weights on the CPU: Stable Diffusion v1.5's U-Net (Pink, PickScore) and
OpenAI's ImageNet 64x64 U-Net and classifier (Colorfulness, Aesthetic Score, Macaw): one rollout step and one
optimizer step each, through the same functions train_ppo.py uses. Slow (minutes, ~15 GB for SD's AdamW state):
run them with `python -m pytest -m slow tests`."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.architectures import SD15_UNET
from drlhf import models
from drlhf.value import ClassifierValue
from drlhf.sampler import DiffusionSchedule, ReparameterizedChain, action_logprob, rollout

pytestmark = pytest.mark.slow

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json (the fields that are not defaults)
SD15_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                      prediction_type="epsilon", clip_sample=False, steps_offset=1)


def one_ppo_step(base, guidance, cond, num_steps, lr=1e-6, **schedule_kwargs):
    """One batched rollout of all steps without gradients, then one clipped-surrogate step on its first state
    with AdamW, as train_ppo.ppo_update does. Returns (ratio before the step, ratio after it)."""
    policy = models.make_denoiser(base, guidance)
    schedule = DiffusionSchedule.for_model(base.scheduler_config, base.is_latent, num_steps=num_steps,
                                           guidance_scale=guidance, **schedule_kwargs)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((len(cond), *base.sample_shape), generator=g)
    with torch.no_grad():
        buf = rollout(policy, schedule, x_T, cond, generator=g)
    assert buf.latents.shape == (num_steps + 1, len(cond), *base.sample_shape) and torch.isfinite(buf.latents).all()
    base.net.requires_grad_(True).train()
    opt = torch.optim.AdamW(base.net.parameters(), lr=lr, foreach=False)
    idx = torch.zeros(len(cond), dtype=torch.long)
    new = action_logprob(policy, schedule, buf.latents[0], idx, cond, buf.latents[1])
    ratio = (new - buf.logprobs[0]).exp()
    advantages = torch.tensor([1.0] + [-1.0] * (len(cond) - 1))
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    loss.backward()
    grads = [p.grad for p in base.net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    opt.step()
    with torch.no_grad():
        after = (action_logprob(policy, schedule, buf.latents[0], idx, cond, buf.latents[1]) - buf.logprobs[0]).exp()
    return ratio.detach(), after


def test_stable_diffusion_v15_unet_rollout_and_update():
    """SD v1.5's U-Net (859.5 M parameters) at 512x512 (64x64 latents), CFG 7.5 as one batch of 2, 2 of 16 DDPM
    steps, gradient checkpointing as --gradient-checkpointing; a tiny text encoder of width 768 stands in for CLIP."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    unet.enable_gradient_checkpointing()
    base = models.BaseModel("sd15-random", "", unet, dict(SD15_SCHEDULER), "text", (4, 64, 64))
    cond = torch.randn(1, 77, 768) * 0.1                 # text-encoder states of one prompt
    null = torch.zeros(1, 77, 768)                       # the empty prompt
    base.encode_prompts = lambda prompts: null           # what make_denoiser asks for the unconditional branch
    before, after = one_ppo_step(base, 7.5, cond, num_steps=16)
    assert torch.equal(before, torch.ones_like(before))  # on-policy: exactly 1 before any step
    assert not torch.equal(after, before)                # and the step moved the policy


def test_openai_64x64_unet_and_classifier_rollout_and_update():
    """OpenAI's 64x64 class-conditional U-Net (learned range, guided respacing, 32 steps as Colorfulness) for
    one PPO step, the classifier + a linear layer as value function for one regression step, and one step of
    Macaw without RL back-propagated through 2 chain steps with checkpointing."""
    from drlhf.guided_diffusion import GuidedClassifier, GuidedUNet
    keys = json.loads((Path(__file__).parent / "fixtures" / "guided_diffusion" / "architecture_and_keys.json").read_text())
    torch.manual_seed(0)
    unet = GuidedUNet(**{**models.GUIDED_64X64, "attention_resolutions": (32, 16, 8), "channel_mult": (1, 2, 3, 4)})
    assert sum(p.numel() for p in unet.parameters()) == keys["real_unet_64x64"]["num_parameters"]
    base = models.BaseModel("guided-random", "", unet, dict(models.GUIDED_SCHEDULER), "class", (3, 64, 64), 1000)
    cond = torch.tensor([88, 7])
    before, after = one_ppo_step(base, 1.0, cond, num_steps=32, spacing="guided", variance_type="learned_range")
    assert torch.equal(before, torch.ones_like(before)) and not torch.equal(after, before)
    clf = GuidedClassifier(**{**models.GUIDED_CLASSIFIER_64X64, "attention_resolutions": (32, 16, 8),
                              "channel_mult": (1, 2, 3, 4)})
    assert sum(p.numel() for p in clf.parameters()) == keys["real_classifier_64x64"]["num_parameters"]
    value = ClassifierValue(clf)
    opt = torch.optim.AdamW(value.parameters(), lr=1e-5, foreach=False)
    x_t, t = torch.randn(2, 3, 64, 64), torch.tensor([999, 500])
    v_loss = 0.5 * (value(x_t, t) - torch.tensor([1.0, -1.0])).pow(2).mean()
    v_loss.backward()
    opt.step()
    assert torch.isfinite(v_loss) and all(p.grad is not None for p in value.parameters())
    schedule = DiffusionSchedule.for_model(base.scheduler_config, False, num_steps=2, spacing="guided",
                                           variance_type="learned_range")
    chain = ReparameterizedChain(models.make_denoiser(base), schedule, checkpoint_steps=True)
    x_0 = chain(torch.randn(1, 3, 64, 64), torch.tensor([88]), torch.randn(2, 1, 3, 64, 64))
    (-value(x_0, torch.zeros(1, dtype=torch.long)).mean()).backward()
    assert all(p.grad is not None for p in unet.parameters())
