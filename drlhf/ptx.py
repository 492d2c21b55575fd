"""PPO-ptx (Ouyang et al. 2022, "pretraining mix"; the thesis's future work, 8.1): the base model's own training
objective on images of the base distribution, added to the policy loss with a coefficient (--ptx-coef), so that
the policy keeps what the base model could make while it climbs the reward (a counter to mode collapse).

For a diffusion model that objective is the denoising loss, the simple ELBO surrogate of log-likelihood (Ho et al.
2020): for x_0 from the data, t uniform over the training timesteps and noise e, x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) e, the mean squared error of the model's prediction of e (or of v, or of x_0, as the model was
trained); for a rectified-flow model, x_t = (1 - sigma_t) x_0 + sigma_t e and the prediction of the velocity
e - x_0, sigma_t over the scheduler's (shifted) training sigmas. The data (--ptx-data) is a folder of images, or `base`: --ptx-samples samples of the base model itself,
made once at set-up (from the base weights, before any checkpoint is restored) and cached by the base model's
fingerprint, so that a resumed run uses the very same images.

    ptx = PtxData.build(args, base, schedule, device, generator)  # None with --ptx-coef 0
    loss = ppo_loss + args.ptx_coef * ptx.loss(policy, n)          # through the DDP-wrapped policy
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from drlhf import models
from drlhf.cli import UserError
from drlhf.distributed import autocast
from drlhf.files import cache_lock, default_cache_dir, save_safetensors
from drlhf.prompts import prompt_table, sample_conditions
from drlhf.sampler import is_flow_model, make_betas, rollout

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PtxData:
    """The images x_0 (N, C, H, W) and their conditions (None, class labels or text states), and the denoising loss
    on random minibatches of them (drawn with `generator`, which checkpoints save with the run's other ones)."""

    def __init__(self, x0, cond, scheduler_config: dict, generator: torch.Generator, precision: str):
        self.x0, self.cond, self.generator, self.precision = x0, cond, generator, precision
        self.flow, n_train = is_flow_model(scheduler_config), scheduler_config.get("num_train_timesteps", 1000)
        if self.flow:  # the training sigmas k / N, k = 1..N, shifted as the scheduler does (drlhf.sampler.flow_sigmas)
            shift, k = scheduler_config.get("shift", 1.0), torch.arange(1, n_train + 1, dtype=torch.float64) / n_train
            self.sigma = (shift * k / (1 + (shift - 1) * k)).float().to(x0.device)
        betas = make_betas(scheduler_config.get("beta_schedule", "linear"), scheduler_config.get("num_train_timesteps", 1000),
                           scheduler_config.get("beta_start", 1e-4), scheduler_config.get("beta_end", 0.02))
        self.abar = torch.cumprod(1 - betas, 0).float().to(x0.device)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")

    def loss(self, policy, n: int) -> torch.Tensor:
        """The denoising loss of `policy` (a models.Denoiser, or DDP around one) on n random images, unguided."""
        g, device = self.generator, self.x0.device
        i = torch.randint(len(self.x0), (n,), generator=g).to(device)
        t = torch.randint(len(self.abar), (n,), generator=g).to(device)
        x0 = self.x0[i]
        noise = torch.randn(x0.shape, generator=g).to(device)
        if self.flow:
            s = self.sigma[t].view(-1, *([1] * (x0.ndim - 1)))
            x_t, t, target = (1 - s) * x0 + s * noise, self.sigma[t] * len(self.sigma), noise - x0
        else:
            a = self.abar[t].view(-1, *([1] * (x0.ndim - 1)))
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}.get(self.prediction_type, x0)
        with autocast(self.precision, device):
            out = policy(x_t, t, None if self.cond is None else self.cond[i], guided=False)[:, :x0.shape[1]].float()
        return F.mse_loss(out, target)

    @classmethod
    def build(cls, args, base: models.BaseModel, schedule, device, generator) -> "PtxData | None":
        if not args.ptx_coef:
            return None
        if args.ptx_data == "base":
            x0, cond = base_samples(args, base, schedule, device)
        else:
            x0, cond = folder_images(args.ptx_data, base), None
        return cls(x0.to(device), None if cond is None else cond.to(device), base.scheduler_config, generator,
                   args.precision)


def base_samples(args, base: models.BaseModel, schedule, device, batch: int = 64):
    """--ptx-samples samples of the base model with its conditions, made once per base model and settings."""
    key = f"{models.base_fingerprint(base.net) or Path(base.path).name}"
    path = Path(args.cache_dir or default_cache_dir()) / "ptx" / (
        f"{key}-n{args.ptx_samples}-{schedule.num_steps}{schedule.cfg.sampler}-w{args.guidance_scale}-s{args.seed}"
        ".safetensors")
    with cache_lock(path):
        if not path.exists():
            g = torch.Generator().manual_seed(args.seed + 424242)
            prompts, embeds = prompt_table(args.prompts, base) if base.conditioning == "text" else (None, None)
            cond, _ = sample_conditions(base, args.class_labels, args.ptx_samples, g, prompts, embeds)
            x_T = torch.randn((args.ptx_samples, *base.sample_shape), generator=g)
            policy, out = models.make_denoiser(base, args.guidance_scale).eval(), []
            for s in range(0, args.ptx_samples, batch):
                c = None if cond is None else cond[s:s + batch].to(device)
                with autocast(args.precision, device):
                    out.append(rollout(policy, schedule, x_T[s:s + batch].to(device), c,
                                       generator=torch.Generator(device).manual_seed(args.seed + s)).samples.cpu())
            save_safetensors({"x0": torch.cat(out), **({} if cond is None else {"cond": cond})}, path)
            print(f"[drlhf] --ptx-data base: {args.ptx_samples} samples of the base model cached in {path}")
    saved = load_file(path)
    return saved["x0"], saved.get("cond")


def folder_images(folder: str, base: models.BaseModel) -> torch.Tensor:
    """Every image of a folder, at the base model's resolution and channels, in [-1, 1] (pixel models only)."""
    from PIL import Image, UnidentifiedImageError
    if base.is_latent:
        raise UserError(f"--ptx-data {folder}: a folder of images is for pixel models; a latent model takes "
                        "--ptx-data base (its own samples, in its latent space)")
    files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    if not files:
        raise UserError(f"--ptx-data {folder}: no folder with images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of "
                        "images or base (the base model's own samples)")
    c, h, w = base.sample_shape
    images = []
    for p in files:
        try:
            img = Image.open(p).convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"--ptx-data {folder}: {p.name} is not a readable image ({e})") from None
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1
        images.append(torch.from_numpy(a[None] if c == 1 else a.transpose(2, 0, 1)))
    return torch.stack(images)
