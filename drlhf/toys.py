"""Offline toy models, trained here on scikit-learn's bundled digits on first use and cached (no download).

    toy:digit4       unconditional 16x16 grey "4"s (Experiment 1's setting, thesis 6.4, at 16x16)
    toy:digit4-32    the same at 32x32, the thesis's resolution
    toy:digit4-flow  toy:digit4 as a rectified-flow model (velocity prediction, FlowMatchEulerDiscreteScheduler):
                     the offline stand-in for SD3-class models (--sampler flow)
    toy:digits-rgb   class-conditional 16x16 digits 0-9 drawn in random colours (a stand-in for the
                     class-conditional ImageNet model of Experiments 2-5 that has colour to optimize)
    toy classifier   OpenAI's noisy-image classifier architecture on the colour digits (stand-in for
                     64x64_classifier.pt as value function and reward-model backbone)
    critic classifier  appendix B's value CNN pre-trained as a noisy-digit classifier (thesis 6.4)

All three are trained by `train_toy`, one AdamW loop around a per-model loss. A loader that trains says so with
a progress bar naming the model and "first use, cached"; an existing cache is never retrained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from drlhf.cli import ModelLoadError

from drlhf.files import atomic_write, cache_lock, default_cache_dir
from drlhf.guided_diffusion import GuidedClassifier

TOY_MODELS = {
    "digit4": dict(digits=[4], rgb=False, resolution=16, class_cond=False),
    "digit4-32": dict(digits=[4], rgb=False, resolution=32, class_cond=False),
    "digits-rgb": dict(digits=list(range(10)), rgb=True, resolution=16, class_cond=True),
    "digit4-flow": dict(digits=[4], rgb=False, resolution=16, class_cond=False, flow=True),
}
TOY_TRAIN_STEPS = 500  # clean, varied digits after ~500 AdamW steps at batch 64 (~80 s on 2 CPU cores)
# Denoising steps of the offline defaults (sample.py, sample.py eval, train_ppo.py). Table 6.2's Target Image uses
# 25 (`--exp target` keeps them); the toy's 10-step samples look the same and score alike (target reward of the
# 64 fixed-seed samples -5.43 +- 0.82 at 10 steps, -5.57 +- 0.80 at 25), and an epoch of the offline default does
# 0.4 of the work, which brings it under 3 minutes on 2 CPU cores, first use included (docs/performance.md)
TOY_SAMPLING_STEPS = 10
# OpenAI's classifier architecture at toy size, for the 16x16 colour digits (10 classes)
TOY_CLASSIFIER = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                      attention_resolutions=[4], channel_mult=[1, 2, 2], num_head_channels=32)


def toy_digits(digits, resolution: int, rgb: bool, seed: int = 0):
    """scikit-learn's 1797 8x8 digits as white-on-black (or random-hue-on-black) images in [-1, 1]."""
    from sklearn.datasets import load_digits
    data = load_digits()
    keep = np.isin(data.target, digits)
    x = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8) ink in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(data.target[keep], dtype=torch.long)
    if rgb:  # ink colour: a random fully saturated hue per image
        g = torch.Generator().manual_seed(seed)
        hue = torch.rand(len(x), generator=g)[:, None] * 6
        k = (torch.tensor([5.0, 3.0, 1.0]) + hue) % 6
        colour = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)  # HSV -> RGB with S = V = 1
        x = x * colour[:, :, None, None]
    return x * 2 - 1, labels


def toy_unet(channels: int, resolution: int, class_cond: bool):
    """A ~1.1M-parameter diffusers UNet2DModel (class 10 = "no class" for classifier-free guidance)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                       block_out_channels=(32, 64, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       num_class_embeds=11 if class_cond else None)


def cosine_noise_schedule():
    """The training noise schedule of every toy (cosine, Nichol & Dhariwal 2021)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def train_toy(net: nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float, seed: int,
              desc: str) -> torch.Tensor:
    """The one training loop of the toys: AdamW on loss_fn(g), where g is the loop's seeded generator that
    draws every minibatch, noise and timestep. Returns the last loss."""
    from tqdm.auto import tqdm
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss


# ---------------------------------------------------------------------------------------------------------
# Toy base models (diffusers DDPM pipelines)
# ---------------------------------------------------------------------------------------------------------
def flow_scheduler():
    """The scheduler of the rectified-flow toy: SD3's, without its timestep shift (16x16 pixels, not 128x128 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def train_toy_model(name: str, out_dir: Path, steps: int = TOY_TRAIN_STEPS, seed: int = 0, batch_size: int = 64,
                    lr: float = 1e-3, cond_drop: float = 0.1):
    """Train a toy DDPM (cosine schedule, epsilon prediction) or rectified flow (velocity prediction) and save it as
    a diffusers DDPMPipeline folder with its scheduler. Runs on the GPU when there is one (the result then differs
    in the last bits from a CPU-trained model)."""
    from diffusers import DDPMPipeline
    spec = TOY_MODELS[name]
    torch.manual_seed(seed)
    x, labels = toy_digits(spec["digits"], spec["resolution"], spec["rgb"], seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = toy_unet(x.shape[1], spec["resolution"], spec["class_cond"]).to(device)
    x, labels = x.to(device), labels.to(device)
    sched = flow_scheduler() if spec.get("flow") else cosine_noise_schedule()

    def loss_fn(g):
        i = torch.randint(len(x), (batch_size,), generator=g).to(device)
        x0, y = x[i], labels[i]
        x0 = torch.roll(x0, shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
        noise = torch.randn(x0.shape, generator=g).to(device)
        if spec.get("flow"):  # rectified flow: x = (1 - s) x0 + s eps, target v = eps - x0 (Liu et al. 2023)
            s = torch.rand(batch_size, generator=g).to(device)[:, None, None, None]
            return F.mse_loss(unet((1 - s) * x0 + s * noise, s.flatten() * 1000).sample, noise - x0)
        t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
        kwargs = {}
        if spec["class_cond"]:  # class 10 = "no class" with probability cond_drop, for classifier-free guidance
            kwargs["class_labels"] = torch.where(torch.rand(batch_size, generator=g).to(device) < cond_drop, 10, y)
        return F.mse_loss(unet(sched.add_noise(x0, noise, t), t, **kwargs).sample, noise)

    loss = train_toy(unet, loss_fn, steps, lr, seed, f"training base model toy:{name} (first use, cached)")
    unet = unet.cpu()
    info = dict(name=name, steps=steps, seed=seed, final_loss=loss.item(),
                num_classes=10 if spec["class_cond"] else 0, **spec)
    atomic_write(out_dir, lambda d: (DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(d),
                                     (Path(d) / "drlhf_toy.json").write_text(json.dumps(info, indent=1))), folder=True)


# toy:digit4 and toy:digit4-flow at their default steps ship with the project (4.4 MB each), built by
# `python -m drlhf.toys digit4 digit4-flow` (on one CPU
# thread, seed 0): the offline default then needs no training on first use. tests/test_sample.py retrains it with
# this module's code and checks that the result is a model of the same quality.
SHIPPED = {"digit4": Path(__file__).parent / "assets" / "toy-digit4",
           "digit4-flow": Path(__file__).parent / "assets" / "toy-digit4-flow"}


def toy_model_dir(name: str, cache_dir: Path | None = None, steps: int = TOY_TRAIN_STEPS) -> Path:
    """The toy model's folder: the shipped one, or the cached one, trained on first use."""
    if name not in TOY_MODELS:
        raise ModelLoadError(f"unknown toy model 'toy:{name}'; choose one of "
                             + ", ".join(f"toy:{k}" for k in TOY_MODELS))
    if steps == TOY_TRAIN_STEPS and name in SHIPPED and (SHIPPED[name] / "model_index.json").exists():
        return SHIPPED[name]
    path = Path(cache_dir or default_cache_dir()) / f"toy-{name}-s{steps}-b64"
    with cache_lock(path):
        if not (path / "model_index.json").exists():
            train_toy_model(name, path, steps)
    return path


# ---------------------------------------------------------------------------------------------------------
# Toy classifiers: value-function initialization and reward-model backbone
# ---------------------------------------------------------------------------------------------------------
def toy_guided_classifier(cache_dir=None, steps: int = 300, seed: int = 0):
    """OpenAI's noisy-image classifier architecture trained on noisy toy:digits-rgb images (cosine schedule, as
    the toy base model), cached; the offline stand-in of 64x64_classifier.pt for value functions and reward models."""
    clf = GuidedClassifier(**{**TOY_CLASSIFIER, "attention_resolutions": (4,), "channel_mult": (1, 2, 2)})
    path = Path(cache_dir or default_cache_dir()) / f"toy-classifier-digits-rgb-s{steps}.safetensors"
    with cache_lock(path):
        if not path.exists():
            _train_toy_guided_classifier(path, clf, steps, seed)
    clf.load_state_dict(load_file(path))
    return clf


def _train_toy_guided_classifier(path: Path, clf: nn.Module, steps: int, seed: int):
    torch.manual_seed(seed)
    spec = TOY_MODELS["digits-rgb"]
    x, y = toy_digits(spec["digits"], spec["resolution"], spec["rgb"], seed)
    sched = cosine_noise_schedule()

    def loss_fn(g):
        i = torch.randint(len(x), (64,), generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        return F.cross_entropy(clf(sched.add_noise(x[i], torch.randn(x[i].shape, generator=g), t), t), y[i])

    train_toy(clf, loss_fn, steps, 1e-3, seed, "training the toy noisy-image classifier (first use, cached)")
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


if __name__ == "__main__":  # rebuild a shipped toy model: python -m drlhf.toys digit4
    import sys
    torch.set_num_threads(1)  # the shipped weights are one thread's arithmetic
    for toy in sys.argv[1:] or list(SHIPPED):
        train_toy_model(toy, SHIPPED[toy])
        print("wrote", SHIPPED[toy])
