"""Pictures shared by train_ppo.py and sample.py eval: image grids and reward histograms as PNG files."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from drlhf.files import atomic_write


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', 3) grid with 1-pixel gaps."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 64, dtype=torch.uint8)
    for k in range(n):  # plumbing: a picture, not the training path
        r, col = divmod(k, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[k]
    return grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: Path, scale: int = 4):
    from PIL import Image
    img = Image.fromarray(array)
    big = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: big.save(tmp, format="PNG"))


def histogram_png(before: np.ndarray, after: np.ndarray, path: Path, bins: int = 30):
    """Reward histograms of base (grey) and optimized (orange) fixed-seed samples, standardized to the base."""
    from PIL import Image, ImageDraw
    mu, sd = before.mean(), before.std(ddof=1) + 1e-12  # the same sample std as summary.json
    zb, za = (before - mu) / sd, (after - mu) / sd
    lo, hi = min(zb.min(), za.min()), max(zb.max(), za.max()) + 1e-9
    hb, _ = np.histogram(zb, bins, (lo, hi))
    ha, _ = np.histogram(za, bins, (lo, hi))
    W, H, m = 600, 300, 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    top = max(hb.max(), ha.max())
    bw = (W - 2 * m) / bins
    for k in range(bins):
        for h, col, off in ((hb[k], (150, 150, 150), 0), (ha[k], (230, 120, 20), bw / 2)):
            x0 = m + k * bw + off
            d.rectangle([x0, H - m - (H - 2 * m) * h / top, x0 + bw / 2 - 1, H - m], fill=col)
    d.line([m, H - m, W - m, H - m], fill="black")
    d.text((m, 5), f"reward in base std units: base (grey) mean 0, optimized (orange) mean {za.mean():+.2f}", fill="black")
    d.text((m, H - m + 5), f"{lo:.1f}", fill="black")
    d.text((W - m - 30, H - m + 5), f"{hi:.1f}", fill="black")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def load_grid(path: Path) -> np.ndarray:
    from PIL import Image
    img = Image.open(path)  # saved at 4x by save_png
    return np.asarray(img.resize((img.width // 4, img.height // 4), Image.NEAREST).convert("RGB"))


def learning_curves_png(history: list, kept_epoch: int, path: Path):
    """train_reward.py's curves: train and validation loss (left scale) and validation pairwise accuracy (right
    scale, 0.5 to 1) per epoch, with the kept epoch marked."""
    from PIL import Image, ImageDraw
    W, H, m = 640, 320, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    epochs = [h["epoch"] for h in history]
    losses = [h[k] for h in history for k in ("train_loss", "val_loss") if k in h]
    lo, hi = min(losses), max(losses) + 1e-9
    x = lambda e: m + (W - 2 * m) * (e - epochs[0]) / max(epochs[-1] - epochs[0], 1)  # noqa: E731
    for key, colour, scale in (("train_loss", (60, 60, 200), None), ("val_loss", (220, 90, 20), None),
                               ("val_accuracy", (30, 150, 60), (0.5, 1.0))):
        pts = [(x(h["epoch"]), h[key]) for h in history if key in h]
        a, b = scale or (lo, hi)
        pts = [(px, H - m - (H - 2 * m) * min(max((v - a) / (b - a), 0), 1)) for px, v in pts]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    d.line([x(kept_epoch), m, x(kept_epoch), H - m], fill=(120, 120, 120))
    d.line([m, H - m, W - m, H - m], fill="black")
    d.text((m, 5), f"loss {lo:.3f}-{hi:.3f}: train (blue), validation (orange); validation accuracy 0.5-1 (green)",
           fill="black")
    d.text((m, H - m + 5), f"epoch {epochs[0]}", fill="black")
    d.text((W - m - 60, H - m + 5), f"epoch {epochs[-1]}", fill="black")
    d.text((min(x(kept_epoch) + 3, W - m - 80), m), f"kept: {kept_epoch}", fill="black")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def overoptimization_png(curve: list, path: Path):
    """The over-optimization curve of a run (drlhf.evaluation): proxy and gold gains in base standard deviations
    against sqrt(KL from the base policy) (left, as in Gao et al. 2022) and against epochs (right); the gold peak
    marked. curve: dicts with epoch, kl, proxy_gain, gold_gain."""
    from PIL import Image, ImageDraw
    W, H, m = 480, 320, 40
    img = Image.new("RGB", (2 * W, H), "white")
    d = ImageDraw.Draw(img)
    gains = [p[k] for p in curve for k in ("proxy_gain", "gold_gain")]
    lo, hi = min(gains + [0.0]), max(gains + [0.0]) + 1e-9
    peak = max(curve, key=lambda p: p["gold_gain"])
    for panel, (xkey, label) in enumerate((("sqrt_kl", "sqrt(KL from base)"), ("epoch", "epoch"))):
        xs = [max(p["kl"], 0.0) ** 0.5 if xkey == "sqrt_kl" else p["epoch"] for p in curve]
        x0, x1 = min(xs), max(xs) + 1e-9
        X = lambda v: panel * W + m + (W - 2 * m) * (v - x0) / (x1 - x0)  # noqa: E731
        Y = lambda v: H - m - (H - 2 * m) * (v - lo) / (hi - lo)  # noqa: E731
        d.line([X(x0), Y(0), X(x1), Y(0)], fill=(200, 200, 200))
        for key, colour in (("proxy_gain", (60, 60, 200)), ("gold_gain", (220, 90, 20))):
            pts = [(X(x), Y(p[key])) for x, p in zip(xs, curve)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for px, py in pts:
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        px = X(xs[curve.index(peak)])
        d.line([px, m, px, H - m], fill=(120, 120, 120))
        d.line([panel * W + m, H - m, panel * W + W - m, H - m], fill="black")
        d.text((panel * W + m, H - m + 5), f"{label} {x0:.3g} .. {x1:.3g}", fill="black")
    d.text((m, 5), f"gain in base std {lo:.2f} .. {hi:.2f}: proxy reward (blue), gold --eval-reward (orange); "
                   f"gold peak {peak['gold_gain']:+.2f} at epoch {peak['epoch']} (grey)", fill="black")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
