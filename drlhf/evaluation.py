"""How a policy's fixed-seed samples compare with the base model's: the scores shared by train_ppo.py and
sample.py eval, and train_ppo.py's fixed-seed evaluations with their pictures.

Scores are compared in units of the base model's standard deviation (the thesis's Figures 6.6 and 6.33
standardize reward histograms to the base distribution): gain = (mean_policy - mean_base) / std_base.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drlhf import pictures


def gain_in_base_std(base: torch.Tensor, scores: torch.Tensor) -> float:
    """(mean(scores) - mean(base)) / std(base), with the sample standard deviation."""
    return ((scores.float().mean() - base.float().mean()) / (base.float().std() + 1e-12)).item()


def score_stats(base: torch.Tensor, scores: torch.Tensor) -> dict:
    """{"mean", "std", "gain_in_base_std"} of one model's scores against the base model's (same seeds)."""
    return dict(mean=scores.float().mean().item(), std=scores.float().std().item(),
                gain_in_base_std=gain_in_base_std(base, scores))


def before_after(base: torch.Tensor, final: torch.Tensor, name: str = "reward") -> dict:
    """summary.json's fields of one score: base_NAME_mean/std, final_NAME_mean/std and the gain, named
    gain_in_base_std for the optimized reward and NAME_gain_in_base_std for any other score."""
    b, f = score_stats(base, base), score_stats(base, final)
    return {f"base_{name}_mean": b["mean"], f"base_{name}_std": b["std"], f"final_{name}_mean": f["mean"],
            f"final_{name}_std": f["std"],
            ("gain_in_base_std" if name == "reward" else f"{name}_gain_in_base_std"): f["gain_in_base_std"]}


def describe(base: torch.Tensor, final: torch.Tensor) -> str:
    """'mean +- std -> mean +- std (+gain base std)' for the logs."""
    return (f"{base.mean():.4f} +- {base.std():.4f} -> {final.mean():.4f} +- {final.std():.4f} "
            f"({gain_in_base_std(base, final):+.2f} base std)")


class FixedSeedEval:
    """The fixed-seed samples of a train_ppo.py run (the same initial noise, step noise and conditions every
    time), scored by the optimized reward and by --eval-reward: before training (RUN/samples_base.png), every
    --eval-every epochs (TensorBoard eval/, RUN/samples/epoch_NNNNN.png) and at the end (before/after grid,
    standardized reward histogram, the scores of summary.json)."""

    def __init__(self, policy, schedule, base, reward_fns: list, n: int, seed: int, precision: str, device,
                 class_labels: str | None = None, prompts=None, prompt_embeds=None):
        from drlhf.prompts import sample_conditions
        self.policy, self.schedule, self.base, self.reward_fns = policy, schedule, base, reward_fns
        self.n, self.seed, self.precision, self.device = n, seed, precision, device
        cond, self.prompts = sample_conditions(base, class_labels, n, torch.Generator().manual_seed(seed + 54321),
                                               prompts, prompt_embeds)  # drawn once: the same conditions every time
        self.cond = None if cond is None else cond.to(device)

    @torch.no_grad()
    def __call__(self):
        """Fixed-seed samples -> decoded images and the scores of each reward function (each (N,) on the CPU)."""
        from drlhf.hardware import autocast
        from drlhf.sampler import rollout
        g = torch.Generator(self.device).manual_seed(self.seed + 12345)  # the same seeds every time
        x_T = torch.randn((self.n, *self.base.sample_shape), generator=g, device=self.device)
        with autocast(self.precision, self.device):
            buf = rollout(self.policy, self.schedule, x_T, self.cond, generator=g)
        return self.base.decode(buf.samples), [torch.as_tensor(fn(buf.samples, self.cond, self.prompts)).float()
                                               .flatten().cpu() for fn in self.reward_fns]

    def record_base(self, out: Path, state: dict, evaluated=None):
        """The base model's scores into the run state (once per run; a resumed run keeps them) and its grid.
        evaluated: this evaluator's output for the base model, when it was already computed."""
        images, (base_rewards, *gold) = evaluated or self()
        state["base_rewards"] = base_rewards
        if gold:
            state["base_eval_reward"] = gold[0]
        pictures.save_png(pictures.image_grid(images), out / "samples_base.png")
        print(f"[drlhf] base model, {self.n} fixed-seed samples: reward {base_rewards.mean():.4f} "
              f"+- {base_rewards.std():.4f}")

    def log(self, writer, out: Path, epoch: int, state: dict):
        """Scores against the base model's, in TensorBoard, and the image grid of epoch + 1."""
        images, (ev, *gold) = self()
        writer.add_scalar("eval/reward_mean", ev.mean().item(), epoch)
        if gold:
            writer.add_scalar("eval/eval_reward_gain_in_base_std", gain_in_base_std(state["base_eval_reward"], gold[0]),
                              epoch)
        writer.add_scalar("eval/reward_gain_in_base_std", gain_in_base_std(state["base_rewards"], ev), epoch)
        grid = pictures.image_grid(images)
        writer.add_image("eval/samples", grid, epoch, dataformats="HWC")
        (out / "samples").mkdir(exist_ok=True)
        pictures.save_png(grid, out / "samples" / f"epoch_{epoch + 1:05d}.png")
        state["last_eval"] = ev

    def finish(self, out: Path, state: dict, eval_reward: str | None) -> dict:
        """The before/after grid and reward histogram; returns summary.json's score fields (and prints them)."""
        images, (ev, *gold) = self()
        if (out / "samples_base.png").exists():
            before = pictures.load_grid(out / "samples_base.png")
            gap = np.full((before.shape[0], 4, 3), 255, np.uint8)
            pictures.save_png(np.concatenate([before, gap, pictures.image_grid(images)], 1), out / "samples_before_after.png")
        br = state["base_rewards"]
        pictures.histogram_png(br.numpy(), ev.numpy(), out / "reward_histogram.png")
        summary = before_after(br, ev)
        if gold:  # the extra score, never optimized (e.g. the gold labeler behind a reward model)
            summary.update(eval_reward=eval_reward, **before_after(state["base_eval_reward"], gold[0], "eval_reward"))
            print(f"[drlhf] {eval_reward} of the fixed-seed samples: {describe(state['base_eval_reward'], gold[0])}")
        print(f"[drlhf] fixed-seed reward {describe(br, ev)}")
        return summary
