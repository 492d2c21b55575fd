"""Pictures shared by the scripts, as PNG files: image grids (PIL) and charts (matplotlib, the ecosystem's plotting
library: labelled axes with tick values and legends, so that numbers can be read off them): reward histograms,
reward-model learning curves, the over-optimization curve."""
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


def _figure(width: float = 7.0, height: float = 3.6, ncols: int = 1):
    """A matplotlib figure off screen (the Agg backend: no display needed) with labelled, ticked axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=100, squeeze=False)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return fig, axes[0]


def _save_figure(fig, path: Path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def histogram_png(before: np.ndarray, after: np.ndarray, path: Path, bins: int = 30):
    """Reward histograms of base and optimized fixed-seed samples, standardized to the base (x: base std units,
    y: samples), with both means marked."""
    mu, sd = before.mean(), before.std(ddof=1) + 1e-12  # the same sample std as summary.json
    zb, za = (before - mu) / sd, (after - mu) / sd
    edges = np.histogram_bin_edges(np.concatenate([zb, za]), bins)
    fig, (ax,) = _figure()
    ax.hist(zb, edges, color="0.55", alpha=0.7, label=f"base (mean 0, n = {len(zb)})")
    ax.hist(za, edges, color="tab:orange", alpha=0.7, label=f"optimized (mean {za.mean():+.2f})")
    for value, colour in ((0.0, "0.35"), (za.mean(), "tab:orange")):
        ax.axvline(value, color=colour, linestyle="--", linewidth=1)
    ax.set(xlabel="reward, in standard deviations of the base model's rewards", ylabel="samples",
           title="fixed-seed rewards: base vs optimized")
    ax.legend()
    _save_figure(fig, path)


def load_grid(path: Path) -> np.ndarray:
    from PIL import Image
    img = Image.open(path)  # saved at 4x by save_png
    return np.asarray(img.resize((img.width // 4, img.height // 4), Image.NEAREST).convert("RGB"))


def learning_curves_png(history: list, kept_epoch: int, path: Path):
    """train_reward.py's curves: train and validation loss (left axis) and validation pairwise accuracy (right
    axis) per epoch, with the kept epoch marked."""
    fig, (ax,) = _figure()
    epochs = [h["epoch"] for h in history]
    for key, colour, label in (("train_loss", "tab:blue", "train loss"), ("val_loss", "tab:orange", "validation loss")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), color=colour, marker="." if len(pts) < 30 else None, label=label)
    ax.set(xlabel="epoch", ylabel="loss (Eq. 5.1)", xlim=(min(epochs) - 0.5, max(epochs) + 0.5))
    ax.axvline(kept_epoch, color="0.4", linestyle="--", linewidth=1, label=f"kept: epoch {kept_epoch}")
    handles, labels = ax.get_legend_handles_labels()
    acc = [(h["epoch"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if acc:
        right = ax.twinx()
        right.plot(*zip(*acc), color="tab:green", marker="." if len(acc) < 30 else None, label="validation accuracy")
        right.set(ylabel="validation pairwise accuracy", ylim=(0.0, 1.0))
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_title("reward model: learning curves")
    _save_figure(fig, path)


def overoptimization_png(curve: list, path: Path):
    """The over-optimization curve of a run (drlhf.evaluation): proxy and gold gains in base standard deviations
    against sqrt(KL from the base policy) (left, as in Gao et al. 2022) and against epochs (right); the gold peak
    marked. curve: dicts with epoch, kl, proxy_gain, gold_gain."""
    fig, axes = _figure(width=11.0, ncols=2)
    peak = max(curve, key=lambda p: p["gold_gain"])
    for ax, (xs, label) in zip(axes, (([max(p["kl"], 0.0) ** 0.5 for p in curve], "sqrt(KL from the base policy)"),
                                      ([p["epoch"] for p in curve], "epoch"))):
        for key, colour, name in (("proxy_gain", "tab:blue", "proxy (optimized reward)"),
                                  ("gold_gain", "tab:orange", "gold (--eval-reward)")):
            ax.plot(xs, [p[key] for p in curve], color=colour, marker="o", markersize=3, label=name)
        ax.axhline(0.0, color="0.6", linewidth=1)
        ax.axvline(xs[curve.index(peak)], color="0.4", linestyle="--", linewidth=1,
                   label=f"gold peak {peak['gold_gain']:+.2f} (epoch {peak['epoch']})")
        ax.set(xlabel=label, ylabel="gain, in base standard deviations")
        ax.legend(fontsize="small")
    fig.suptitle("over-optimization: proxy and gold reward against distance from the base policy")
    _save_figure(fig, path)


def win_rate_png(report: dict, path: Path):
    """A blind comparison's win rates of model B over model A (drlhf.comparison): overall and per annotator, each
    with its 95 % interval, and the line of no preference at 0.5."""
    rows = [("all annotators", report["overall"])] + list(report["annotators"].items())
    fig, (ax,) = _figure(height=1.6 + 0.45 * len(rows))
    for y, (name, r) in enumerate(reversed(rows)):
        lo, hi = r["ci95"]
        ax.errorbar(r["win_rate_b"], y, xerr=[[r["win_rate_b"] - lo], [hi - r["win_rate_b"]]], fmt="o", capsize=4,
                    color="tab:blue" if name == "all annotators" else "0.35")
        ax.annotate(f"{r['win_rate_b']:.2f} [{lo:.2f}, {hi:.2f}], n = {r['judgments']}", (r["win_rate_b"], y),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize="small")
    ax.axvline(0.5, color="tab:red", linestyle="--", linewidth=1, label="no preference")
    ax.set(xlim=(0, 1), ylim=(-0.7, len(rows) - 0.3), yticks=range(len(rows)), yticklabels=[n for n, _ in reversed(rows)],
           xlabel=f"win rate of B ({report['model_b']}) over A ({report['model_a']}), ties = 1/2; 95 % interval",
           title="blind comparison")
    ax.legend(loc="lower right", fontsize="small")
    _save_figure(fig, path)
