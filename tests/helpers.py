"""Scoring functions used by the tests through `--reward module:function`, and the fixture's OpenAI-format
checkpoints."""
import functools
import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "guided_diffusion"


def nan_for_second_sample(images, cond=None):
    scores = images.float().mean((1, 2, 3))
    scores[1] = float("nan")
    return scores


def mean_brightness(images, cond=None):
    return images.float().mean((1, 2, 3))


def write_openai_checkpoints(folder: Path):
    """The fixture's reduced U-Net and classifier as OpenAI-style .pt state dicts, each with a sidecar .json of the
    constructor kwargs that differ from the real 64x64 models. Returns (unet.pt, classifier.pt)."""
    import torch
    from safetensors.torch import load_file
    readme = json.loads((FIXTURE / "README.json").read_text())
    out = []
    for name, model, kwargs_key in (("unet", "unet_small", "resulting_UNetModel_kwargs"),
                                    ("classifier", "classifier_small", "EncoderUNetModel_kwargs")):
        k = readme["models"][model][kwargs_key]
        torch.save({n: v.float() for n, v in load_file(FIXTURE / f"{model}.safetensors").items()}, folder / f"{name}.pt")
        (folder / f"{name}.json").write_text(json.dumps({key: k[key] for key in
                                                         ("model_channels", "num_res_blocks", "num_head_channels")}))
        out.append(folder / f"{name}.pt")
    return out


# reward functions that break the contract (one number per sample), for the failure tests
def one_scalar(images, cond=None):
    return images.float().mean()


def two_columns(images, cond=None):
    return images.float().mean((2, 3)).repeat(1, 2)[:, :2]


def one_short(images, cond=None):
    return images.float().mean((1, 2, 3))[:-1]


def strings(images, cond=None):
    return ["good"] * len(images)


def raises(images, cond=None):
    raise ZeroDivisionError("the scorer divided by zero")


def noisy_ink(images, prompts=None):
    """Mean brightness plus noise that depends only on the image (a labeler the reward model can overfit)."""
    import torch
    ink = images.float().mean((1, 2, 3))
    seeds = (images.float().abs().sum((1, 2, 3)) * 1e4).long() % 100_003
    return ink + torch.stack([torch.randn((), generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * ink.std()


@functools.lru_cache(maxsize=None)
def passes_reproduce_bits() -> bool:
    """Whether this CPU's kernels give a state the same log-probability in any pass of the same size, whatever
    other states share it: the reference is the toy colour U-Net under CFG, its rollout evaluated in passes of 4
    and of 8 states (drlhf/plan.py's chunked_policy_step) against the same states recomputed in shuffled passes, on
    one thread as the tests' runs are. Where it holds (AVX-512 oneDNN and MKL here), the project's bit-for-bit
    claims about passes hold and the tests assert them; where it does not (MKL's AVX2 path: 1.5e-3 in a
    log-probability of ~2800), they hold up to rounding and the tests assert that."""
    import torch

    from drlhf import models, toys
    from drlhf.plan import chunked_policy_step
    from drlhf.sampler import DiffusionSchedule, SamplerConfig, action_logprob, make_betas, rollout, space_timesteps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        policy = models.Denoiser(toys.toy_unet(3, 16, class_cond=True).eval(), "class", guidance_scale=3.0,
                                 null_cond=torch.tensor([10]))
        sched = DiffusionSchedule(make_betas("squaredcos_cap_v2"), space_timesteps(1000, 4), SamplerConfig(num_steps=4))
        for B, chunk in ((6, 8), (8, 4)):
            g = torch.Generator().manual_seed(B)
            x_T, cond = torch.randn(B, 3, 16, 16, generator=g), torch.randint(0, 10, (B,), generator=g)
            buf = rollout(policy, sched, x_T, cond, generator=g, step=chunked_policy_step(chunk))
            states, actions = buf.latents[:-1].flatten(0, 1), buf.latents[1:].flatten(0, 1)
            idx, flat_cond, order = torch.arange(4).repeat_interleave(B), cond.repeat(4), torch.randperm(4 * B, generator=g)
            with torch.no_grad():
                for s in range(0, 4 * B, chunk):
                    i = order[s:s + chunk]
                    lp = action_logprob(policy, sched, states[i], idx[i], flat_cond[i], actions[i])
                    if not torch.equal(lp, buf.logprobs.flatten()[i]):
                        return False
        return True
    finally:
        torch.set_num_threads(threads)


def brighter_judge(seed: int, p: float):
    """A judge without a human that prefers the brighter of two images with probability p (its own seeded coin per
    comparison), else the darker: against a model whose images are always brighter, it prefers that model with
    probability p."""
    import random
    rng = random.Random(seed)

    def judge(images, prompts=None):
        ink = images.float().mean((1, 2, 3))
        return ink if rng.random() < p else -ink
    return judge


prefers_brighter_70 = brighter_judge(1, 0.7)
cannot_tell = brighter_judge(2, 0.5)
