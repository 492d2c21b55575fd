"""The MDP sampler against independent references: torch.distributions, diffusers' schedulers, and
guided-diffusion's respaced learned-range step (numbers in tests/fixtures/guided_diffusion)."""
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import load_file

from drlhf import models, toys
from drlhf.sampler import (DiffusionSchedule, SamplerConfig, action_logprob, gaussian_logprob, make_betas,
                           policy_step, rollout, space_timesteps)

FIXTURE = Path(__file__).parent / "fixtures" / "guided_diffusion"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_logprob_matches_torch_normal(reduction):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g) + 0.05
    a = mean + std * torch.randn(4, 3, 8, 8, generator=g)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(a.double()).flatten(1)
    ref = ref.sum(1) if reduction == "sum" else ref.mean(1)
    torch.testing.assert_close(gaussian_logprob(a, mean, std, reduction).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2", "scaled_linear"])
def test_betas_match_diffusers(schedule):
    kw = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, **kw).betas.double()
    torch.testing.assert_close(make_betas(schedule, 1000, **kw), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [25, [999, 700, 512, 300, 41, 7, 0]])
def test_respaced_ddpm_matches_diffusers(variance_type, prediction_type, steps):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                        variance_type=variance_type, prediction_type=prediction_type)
    if isinstance(steps, int):
        ref.set_timesteps(steps)
        cfg = SamplerConfig(num_steps=steps, spacing="leading", variance_type=variance_type,
                            prediction_type=prediction_type)
        ours = DiffusionSchedule.from_config(dict(ref.config), cfg)
    else:
        ref.set_timesteps(timesteps=steps)
        cfg = SamplerConfig(num_steps=len(steps), variance_type=variance_type, prediction_type=prediction_type)
        ours = DiffusionSchedule(make_betas("squaredcos_cap_v2"), steps, cfg)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps.tolist()[:-1]):  # the last step is checked separately below
        mean, std = ours.distribution(eps, x, torch.full((3,), i))
        torch.testing.assert_close(mean, _ref_mean(ref, eps, t, x), rtol=1e-4, atol=1e-4)
        # diffusers keeps its schedule in float32, ours is float64: agreement to ~1e-4 relative
        torch.testing.assert_close(std, ref._get_variance(t).sqrt().float().expand_as(std), rtol=1e-3, atol=1e-7)


def _ref_mean(ref, model_output, t, x):
    """diffusers' posterior mean: DDPMScheduler.step with its noise draw replaced by zeros."""
    import diffusers.schedulers.scheduling_ddpm as m
    real_randn = m.randn_tensor
    m.randn_tensor = lambda shape, **kw: torch.zeros(shape)
    try:
        return ref.step(model_output, t, x).prev_sample
    finally:
        m.randn_tensor = real_randn


def test_last_step_uses_the_previous_posterior_variance():
    sched = DiffusionSchedule(make_betas("squaredcos_cap_v2"), space_timesteps(1000, 25), SamplerConfig(num_steps=25))
    assert torch.isfinite(sched.log_var_min).all()
    assert sched.log_var_min[-1] == sched.log_var_min[-2]
    assert sched.abar_prev[-1] == 1.0


def test_ddim_matches_diffusers():
    eta = 0.7
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                        set_alpha_to_one=True)
    ref.set_timesteps(20)
    ours = DiffusionSchedule.from_config(dict(ref.config), SamplerConfig(sampler="ddim", num_steps=20, eta=eta))
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps.tolist()[:-1]):
        mean, std = ours.distribution(eps, x, torch.full((2,), i))
        # eps re-derived from the clipped x0, as guided-diffusion does (diffusers: use_clipped_model_output)
        ref_mean = ref.step(eps, t, x, eta=eta, use_clipped_model_output=True,
                            variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = t - 1000 // 20
        ref_std = eta * ref._get_variance(t, prev_t).sqrt()
        torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, ref_std.float().expand_as(std), rtol=1e-3, atol=1e-7)


def test_guided_diffusion_respacing_and_learned_range_step():
    """guided-diffusion's space_timesteps(1000, '25') and p_mean_variance (learned range, clipped x0)."""
    io = load_file(FIXTURE / "io.safetensors")
    kept = space_timesteps(1000, "25", "guided")
    assert sorted(kept) == io["respaced_timestep_map"].tolist()  # includes round-half-to-even (166.5 -> 166)
    cfg = SamplerConfig(num_steps="25", spacing="guided", variance_type="learned_range")
    sched = DiffusionSchedule(io["base_betas"], kept, cfg)
    torch.testing.assert_close(sched.beta.flip(0), io["respaced_betas"], rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.abar.flip(0), io["respaced_alphas_cumprod"], rtol=0, atol=1e-12)
    idx = 24 - io["respaced_t"]  # respaced index 24 = our first step, 0 = our last
    assert sched.timesteps[idx].tolist() == io["respaced_t_model"].tolist()
    mean, std = sched.distribution(io["respaced_unet_out"], io["x"], idx)
    assert (mean - io["respaced_mean"]).abs().max() <= 1e-5
    assert ((2 * std.log()) - io["respaced_log_variance"]).abs().max() <= 2e-5


def test_toy_unet_rollout_records_everything_and_ratio_is_one():
    torch.manual_seed(0)
    unet = toys.toy_unet(1, 16, class_cond=False).eval()
    policy = models.Denoiser(unet, "none")
    sched = DiffusionSchedule(make_betas("squaredcos_cap_v2"), space_timesteps(1000, 6), SamplerConfig(num_steps=6))
    x_T = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    buf = rollout(policy, sched, x_T, None, generator=torch.Generator().manual_seed(4))
    assert buf.latents.shape == (7, 5, 1, 16, 16) and buf.logprobs.shape == (6, 5)
    assert torch.equal(buf.latents[0], x_T) and torch.equal(buf.samples, buf.latents[-1])
    again = rollout(policy, sched, x_T, None, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again.latents, buf.latents)  # deterministic from the seed
    # recompute log pi(a|s) for a shuffled minibatch of (state, action) pairs from all steps: an un-updated policy
    # gives ratio 1. Bit for bit when the minibatch has the rollout's batch size; MKL's CPU gemm may round other
    # batch sizes differently (on AVX-512, 6 or more rows here), which --old-logprobs recompute sidesteps
    states, actions = buf.latents[:-1].flatten(0, 1), buf.latents[1:].flatten(0, 1)
    idx = torch.arange(6).repeat_interleave(5)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(5))[:5]
    with torch.no_grad():
        lp = action_logprob(policy, sched, states[perm], idx[perm], None, actions[perm])
    ratio = torch.exp(lp - buf.logprobs.flatten()[perm])
    assert torch.equal(ratio, torch.ones_like(ratio))
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(5))[:13]
    with torch.no_grad():
        lp = action_logprob(policy, sched, states[perm], idx[perm], None, actions[perm])
    assert (lp - buf.logprobs.flatten()[perm]).abs().max() < 1e-3  # another batch size: rounding only


def test_classifier_free_guidance_is_one_batched_forward():
    torch.manual_seed(0)
    unet = toys.toy_unet(3, 16, class_cond=True).eval()
    calls = []
    unet.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    policy = models.Denoiser(unet, "class", guidance_scale=3.0, null_cond=torch.tensor([10]))
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([999, 500, 20, 0]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        out = policy(x, t, y)
        assert calls == [8]  # cond + uncond in one forward of 2B
        eps_c = unet(x, t, class_labels=y).sample
        eps_u = unet(x, t, class_labels=torch.full((4,), 10)).sample
    torch.testing.assert_close(out, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_text_conditioned_latent_policy_step():
    """A tiny UNet2DConditionModel on 4-channel latents with text embeddings and CFG 7.5."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    null = torch.randn(1, 7, 32)
    policy = models.Denoiser(unet, "text", guidance_scale=7.5, null_cond=null)
    cfg = SamplerConfig(num_steps=4, clip_sample=None, guidance_scale=7.5)
    sched = DiffusionSchedule(make_betas("scaled_linear", 1000, 0.00085, 0.012), space_timesteps(1000, 4), cfg)
    cond = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = policy_step(policy, sched, torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), cond,
                          torch.Generator().manual_seed(0))
        lp = action_logprob(policy, sched, torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), cond, out.action)
    assert out.action.shape == (2, 4, 8, 8) and out.logprob.shape == (2,) and torch.isfinite(lp).all()


def test_bad_sampler_settings_are_named():
    with pytest.raises(ValueError, match="--eta"):
        SamplerConfig(sampler="ddim", eta=0.0)
    with pytest.raises(ValueError, match="--variance-type"):
        SamplerConfig(variance_type="nope")
    sched = DiffusionSchedule(make_betas("linear"), space_timesteps(1000, 3), SamplerConfig(num_steps=3))
    with pytest.raises(ValueError, match="learned_range"):
        sched.distribution(torch.zeros(1, 6, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_rollout_in_passes_gives_each_state_the_numbers_of_any_pass(conditioning):
    """rollout(..., step=chunked_policy_step(K)) (drlhf/plan.py): the model and the log-likelihood see batches of exactly K states (the last padded with
    copies of its first state), so a state's log-probability is what any pass of K states gives it, here in random
    passes over all steps' states; the noise is the same draw as without chunks, so the chain differs by rounding
    only. Padded (6 environments, passes of 8) and split (8 environments, passes of 4), with CFG conditions."""
    from diffusers import UNet2DConditionModel

    from drlhf.plan import chunked_policy_step
    from helpers import passes_reproduce_bits
    torch.manual_seed(0)
    if conditioning == "class":
        unet, shape = toys.toy_unet(3, 16, class_cond=True).eval(), (3, 16, 16)
        policy = models.Denoiser(unet, "class", guidance_scale=3.0, null_cond=torch.tensor([10]))
        make_cond = lambda B, g: torch.randint(0, 10, (B,), generator=g)  # noqa: E731
    else:
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
        policy, shape = models.Denoiser(unet, "text", guidance_scale=7.5, null_cond=torch.randn(1, 7, 32)), (4, 8, 8)
        make_cond = lambda B, g: torch.randn(B, 7, 32, generator=g)  # noqa: E731
    sched = DiffusionSchedule(make_betas("squaredcos_cap_v2"), space_timesteps(1000, 4), SamplerConfig(num_steps=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: where CPU kernels round by batch size most (docs/performance.md)
    try:
        for B, chunk in ((6, 8), (8, 4)):
            g = torch.Generator().manual_seed(B)
            x_T, cond = torch.randn(B, *shape, generator=g), make_cond(B, g)
            buf = rollout(policy, sched, x_T, cond, generator=torch.Generator().manual_seed(1),
                          step=chunked_policy_step(chunk))
            plain = rollout(policy, sched, x_T, cond, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(buf.latents, plain.latents, rtol=0, atol=1e-4)
            states, actions = buf.latents[:-1].flatten(0, 1), buf.latents[1:].flatten(0, 1)
            idx, flat_cond = torch.arange(4).repeat_interleave(B), cond.repeat(4, *([1] * (cond.ndim - 1)))
            order = torch.randperm(4 * B, generator=g)
            lp = torch.empty(4 * B)
            with torch.no_grad():
                for s in range(0, 4 * B, chunk):
                    i = order[s:s + chunk]
                    lp[i] = action_logprob(policy, sched, states[i], idx[i], flat_cond[i], actions[i])
            # bit for bit where this CPU's kernels give a state the same bits whatever shares its batch (AVX-512
            # here); elsewhere (MKL's AVX2 path) up to rounding: 1.5e-3 in log-probabilities of ~2800 seen
            exact = passes_reproduce_bits()
            diff = (lp.view(4, B) - buf.logprobs).abs().max()
            assert torch.equal(lp.view(4, B), buf.logprobs) if exact else \
                torch.allclose(lp.view(4, B), buf.logprobs, rtol=1e-5), (B, chunk, exact, diff)
    finally:
        torch.set_num_threads(threads)
