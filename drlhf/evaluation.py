"""How a policy's fixed-seed samples compare with the base model's: the scores shared by train_ppo.py and
sample.py eval, and train_ppo.py's fixed-seed evaluations with their pictures.

Scores are compared in units of the base model's standard deviation (the thesis's Figures 6.6 and 6.33
standardize reward histograms to the base distribution): gain = (mean_policy - mean_base) / std_base.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from drlhf import pictures
from drlhf.distributed import autocast
from drlhf.families import family_of
from drlhf.prompts import sample_conditions
from drlhf.sampler import action_logprob, rollout


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


def vendi_score(features: torch.Tensor) -> float:
    """The Vendi score (Friedman & Dieng 2022) of n samples: the exponential of the Shannon entropy of the
    eigenvalues of K / n, K the cosine similarities of their features. 1 when all samples are the same, n when
    they are all orthogonal: the effective number of distinct samples."""
    x = features.double().flatten(1)
    if len(x) < 2:
        return 1.0
    scale = x.norm(dim=1).mean().clamp(min=1e-12)
    x = torch.cat([x, torch.full((len(x), 1), 1e-3, dtype=x.dtype) * scale], 1)  # zero rows: alike, not undefined
    x = x / x.norm(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / len(x)).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def frozen_encoder(net: nn.Module) -> nn.Module:
    """A frozen copy of a denoiser's encoder half (its family's encoder_copy, drlhf.families)."""
    return family_of(net).encoder_copy(net).requires_grad_(False).eval()


class Diversity:
    """How varied a set of samples is, for any base model offline: the Vendi score of the base model's own U-Net
    encoder features (mid-block, at t = 0, no condition; the reward model's backbone) of the samples of each
    prompt or class, averaged over the conditions weighted by their sample counts. Features are centred on the
    base model's samples (the first set scored), so that samples that share what every sample has still count
    as alike; all copies of one sample score 1."""

    def __init__(self, base, chunk: int = 16, dtype=torch.float32):
        self.chunk, self.reference = chunk, None
        self.null_text = base.encode_prompts([""]) if base.conditioning == "text" else None
        self.encoder = frozen_encoder(base.net).to(dtype)  # the base weights, whatever training does later
        self.family, self.conditioning = base.family, base.conditioning

    @torch.no_grad()
    def features(self, samples: torch.Tensor) -> torch.Tensor:
        half = self.encoder
        out = []
        for s in range(0, len(samples), self.chunk):
            x = samples[s:s + self.chunk].to(next(half.parameters()).device, next(half.parameters()).dtype)
            t = torch.zeros(len(x), dtype=torch.long, device=x.device)
            h = self.family.features(half, x, t, self.conditioning, null=self.null_text)  # no condition
            out.append(h.flatten(1).float().cpu())
        return torch.cat(out)

    def __call__(self, samples: torch.Tensor, groups: list) -> float:
        """samples (N, C, H, W) in the model's input space; groups: N hashable conditions (prompts or classes)."""
        f = self.features(samples)
        if self.reference is None:
            self.reference = f.mean(0)
        f = f - self.reference
        keys = list(dict.fromkeys(groups))
        scores = [(vendi_score(f[[i for i, g in enumerate(groups) if g == k]]), groups.count(k)) for k in keys]
        return sum(v * n for v, n in scores) / len(groups)


@torch.no_grad()
def kl_from_reference(ref: nn.Module, schedule, buf) -> float:
    """KL(pi_theta || pi_base) of a rollout's trajectories: the k3 estimate of each step's KL (as in the PPO
    reward), summed over the steps, averaged over the samples. One reference pass per step at the rollout's batch."""
    T, n = buf.logprobs.shape
    ref_lp = torch.stack([action_logprob(ref, schedule, buf.latents[i], torch.full((n,), i, device=buf.latents.device),
                                         buf.cond, buf.latents[i + 1]) for i in range(T)])
    log_ratio = ref_lp.double() - buf.logprobs.double()
    return (torch.expm1(log_ratio) - log_ratio).sum(0).mean().item()


class FixedSeedEval:
    """The fixed-seed samples of a train_ppo.py run (the same initial noise, step noise and conditions every
    time), scored by the optimized reward and by --eval-reward: before training (RUN/samples_base.png), every
    --eval-every epochs (TensorBoard eval/, RUN/samples/epoch_NNNNN.png) and at the end (before/after grid,
    standardized reward histogram, the scores of summary.json); each time also their diversity per prompt or
    class (Diversity), beside the base model's."""

    def __init__(self, policy, schedule, base, reward_fns: list, n: int, seed: int, precision: str, device,
                 class_labels: str | None = None, prompts=None, prompt_embeds=None, ref=None):
        self.policy, self.schedule, self.base, self.reward_fns = policy, schedule, base, reward_fns
        self.ref, self.kl = ref, float("nan")  # ref: the frozen base policy, for the samples' KL from it
        self.last = None  # (epoch, evaluation) of the last log(), which finish() reuses for that epoch
        self.n, self.seed, self.precision, self.device = n, seed, precision, device
        cond, self.prompts = sample_conditions(base, class_labels, n, torch.Generator().manual_seed(seed + 54321),
                                               prompts, prompt_embeds)  # drawn once: the same conditions every time
        self.cond = None if cond is None else cond.to(device)
        self.groups = self.prompts or (cond.tolist() if cond is not None else [None] * n)
        self.diversity = Diversity(base, dtype=torch.float16 if device.type == "cuda" and precision != "fp32"
                                   else torch.float32)

    def variety(self, samples, state: dict) -> float:
        """The samples' diversity; the base model's features (kept in the run state) are the reference."""
        if "diversity_reference" in state:
            self.diversity.reference = state["diversity_reference"]
        value = self.diversity(samples, self.groups)
        state["diversity_reference"] = self.diversity.reference
        return value

    @torch.no_grad()
    def __call__(self):
        """Fixed-seed samples -> decoded images, the scores of each reward function (each (N,) on the CPU) and
        the samples themselves (N, C, H, W)."""
        g = torch.Generator(self.device).manual_seed(self.seed + 12345)  # the same seeds every time
        x_T = torch.randn((self.n, *self.base.sample_shape), generator=g, device=self.device)
        with autocast(self.precision, self.device):
            buf = rollout(self.policy, self.schedule, x_T, self.cond, generator=g)
            if self.ref is not None:
                self.kl = kl_from_reference(self.ref, self.schedule, buf)
        return self.base.decode(buf.samples), [torch.as_tensor(fn(buf.samples, self.cond, self.prompts)).float()
                                               .flatten().cpu() for fn in self.reward_fns], buf.samples

    def record_base(self, out: Path, state: dict, evaluated=None):
        """The base model's scores into the run state (once per run; a resumed run keeps them) and its grid.
        evaluated: this evaluator's output for the base model, when it was already computed."""
        images, (base_rewards, *gold), samples = evaluated or self()
        state["base_rewards"] = base_rewards
        if gold:
            state["base_eval_reward"] = gold[0]
        state["base_diversity"] = self.variety(samples, state)
        if gold:  # the over-optimization curve starts at the base model: KL 0
            state["overoptimization"] = [dict(epoch=0, kl=0.0, proxy_gain=0.0, gold_gain=0.0,
                                              proxy=base_rewards.mean().item(), gold=gold[0].mean().item())]
        pictures.save_png(pictures.image_grid(images), out / "samples_base.png")
        print(f"[drlhf] base model, {self.n} fixed-seed samples: reward {base_rewards.mean():.4f} "
              f"+- {base_rewards.std():.4f}, diversity {state['base_diversity']:.2f} (Vendi score per condition)")

    def log(self, writer, out: Path, epoch: int, state: dict):
        """Scores against the base model's, in TensorBoard, and the image grid of epoch + 1."""
        self.last = (epoch, self())
        images, (ev, *gold), samples = self.last[1]
        writer.add_scalar("eval/reward_mean", ev.mean().item(), epoch)
        writer.add_scalar("eval/diversity", self.variety(samples, state), epoch)  # Vendi score per condition
        writer.add_scalar("eval/diversity_base", state.get("base_diversity", float("nan")), epoch)
        if gold:
            writer.add_scalar("eval/eval_reward_gain_in_base_std", gain_in_base_std(state["base_eval_reward"], gold[0]),
                              epoch)
            self.overoptimization(writer, out, epoch, state, ev, gold[0])
        writer.add_scalar("eval/reward_gain_in_base_std", gain_in_base_std(state["base_rewards"], ev), epoch)
        grid = pictures.image_grid(images)
        writer.add_image("eval/samples", grid, epoch, dataformats="HWC")
        (out / "samples").mkdir(exist_ok=True)
        pictures.save_png(grid, out / "samples" / f"epoch_{epoch + 1:05d}.png")
        state["last_eval"] = ev

    def overoptimization(self, writer, out: Path, epoch: int, state: dict, proxy, gold):
        """Gold (--eval-reward) and proxy (the optimized reward) of the fixed-seed samples against their KL from
        the base policy, the x axis sqrt(KL) as in Gao et al. 2022 ("Scaling Laws for Reward Model
        Overoptimization"): TensorBoard, RUN/overoptimization.png, and the points in the run state."""
        point = dict(epoch=epoch + 1, kl=self.kl, proxy_gain=gain_in_base_std(state["base_rewards"], proxy),
                     gold_gain=gain_in_base_std(state["base_eval_reward"], gold), proxy=proxy.mean().item(),
                     gold=gold.mean().item())
        curve = [p for p in state.setdefault("overoptimization", []) if p["epoch"] < point["epoch"]] + [point]
        state["overoptimization"] = curve  # (a resumed run drops the points after its checkpoint)
        writer.add_scalar("eval/kl_from_base", self.kl, epoch)
        writer.add_scalar("eval/sqrt_kl_from_base", max(self.kl, 0.0) ** 0.5, epoch)
        pictures.overoptimization_png(curve, out / "overoptimization.png")

    def finish(self, out: Path, state: dict, eval_reward: str | None) -> dict:
        """The before/after grid and reward histogram; returns summary.json's score fields (and prints them)."""
        reuse = self.last is not None and self.last[0] + 1 == state["epoch"]
        images, (ev, *gold), samples = self.last[1] if reuse else self()
        if (out / "samples_base.png").exists():
            before = pictures.load_grid(out / "samples_base.png")
            gap = np.full((before.shape[0], 4, 3), 255, np.uint8)
            pictures.save_png(np.concatenate([before, gap, pictures.image_grid(images)], 1), out / "samples_before_after.png")
        br = state["base_rewards"]
        pictures.histogram_png(br.numpy(), ev.numpy(), out / "reward_histogram.png")
        summary = before_after(br, ev)
        summary.update(base_diversity=state.get("base_diversity"), final_diversity=self.variety(samples, state))
        print(f"[drlhf] diversity of the fixed-seed samples (Vendi score per condition): {summary['base_diversity'] or 0:.2f}"
              f" -> {summary['final_diversity']:.2f}")
        if gold:  # the extra score, never optimized (e.g. the gold labeler behind a reward model)
            summary.update(eval_reward=eval_reward, **before_after(state["base_eval_reward"], gold[0], "eval_reward"))
            curve = state.get("overoptimization", [])
            peak = max(curve, key=lambda p: p["gold_gain"], default=None)
            summary.update(gold_peak_epoch=peak and peak["epoch"], gold_peak_gain_in_base_std=peak and peak["gold_gain"],
                           gold_peak_mean=peak and peak["gold"], final_kl_from_base=self.kl, overoptimization=curve)
            print(f"[drlhf] {eval_reward} of the fixed-seed samples: {describe(state['base_eval_reward'], gold[0])}")
        print(f"[drlhf] fixed-seed reward {describe(br, ev)}")
        return summary
