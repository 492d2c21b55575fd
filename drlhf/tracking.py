"""What the training scripts record: TensorBoard (namespaces charts/, losses/, objective/, eval/), the resolved
flags, train_ppo.py's run start and summary.json. Rank 0 alone writes."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import time

import torch

from drlhf import checkpoint, distributed, speed
from drlhf.files import make_dir, write_json


def open_run(out: Path, args, purge_step: int | None = None, args_json: bool = True):
    """The output folder and its TensorBoard writer, with the resolved flags as a text table (and args.json).
    purge_step: a resumed run drops the events logged after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter
    make_dir(out)
    writer = SummaryWriter(out / "tb", purge_step=purge_step)
    flags = dataclasses.asdict(args)
    writer.add_text("args", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
    if args_json:
        write_json(out / "args.json", flags)
    return writer


def start_run(out: Path, args, base, schedule, evaluator, state: dict, sizes: tuple, world: int):
    """train_ppo.py, rank 0: the base model's scores (once per run, first: a failing reward writes nothing), the
    run folder, TensorBoard, the batch sizes."""
    base_eval = evaluator() if "base_rewards" not in state else None
    writer = open_run(out, args, purge_step=state["epoch"] if args.resume else None)
    B, n_states, n_minibatches = sizes
    step = f"flow (noise level {args.eta})" if args.sampler == "flow" else f"{args.sampler}/{schedule.cfg.variance_type}"
    print(f"[drlhf] base {args.pretrained} ({base.conditioning}, {'latent' if base.is_latent else 'pixel'} "
          f"{tuple(base.sample_shape)}), {args.num_steps} steps {step}; "
          f"{world} process(es) x {B} environments = {B * world}; {n_states} states per process -> {n_minibatches} "
          f"minibatches of {args.minibatch_size}"
          + (f" ({args.fused_minibatches} per forward pass)" if args.fused_minibatches > 1 else "")
          + f" -> {n_minibatches // args.grad_accum_steps} optimizer steps per epoch")
    if base_eval is not None:
        evaluator.record_base(out, state, base_eval)
    elif not (out / "samples_base.png").exists():  # resumed into a new --output-dir: the base grid comes along
        if (src := checkpoint.find_checkpoint(args.resume).parent.parent / "samples_base.png").exists():
            shutil.copy2(src, out)
    return writer


def pool_rewards(scores, kl, kl_coef: float, n: int) -> dict:
    """Means over all processes' n samples (every rank calls it), the KL summed over the steps of each sample:
    reward, reward_sq (the mean squared reward), kl_penalty (beta x KL), magnitude (|reward| + penalty)."""
    sums = distributed.all_reduce_sum(torch.stack([scores.sum(), (scores ** 2).sum(), kl.sum(0).sum() * kl_coef,
                                                   (scores.abs() + kl.sum(0) * kl_coef).sum()]).double())
    return dict(zip(("reward", "reward_sq", "kl_penalty", "magnitude"), (sums.cpu() / n).tolist()))


class PhaseTimer:
    """Seconds of an epoch's phases: `lap(name)` records the time since the last lap (GPU work waited for)."""

    def __init__(self, device):
        self.device, self.times, self.t = device, {}, time.perf_counter()

    def lap(self, name: str):
        distributed.sync_device(self.device)
        now = time.perf_counter()
        self.times[name], self.t = now - self.t, now


def log_ppo_epoch(writer, bar, epoch: int, algo: str, pooled, scores, kl, stats: dict, state: dict, opt_pi, opt_vf,
                  times: dict, seconds: float, n_images: int, device) -> dict:
    """One epoch of train_ppo.py: pooled rewards (objective/), the update's statistics (losses/), learning rates,
    speed and memory (charts/), and the progress bar. pooled = pool_rewards(...). Returns the logged values."""
    r_mean = pooled["reward"]
    bmu, bsd = state["base_rewards"].mean().item(), state["base_rewards"].std().item() + 1e-12
    global_step = state["global_step"]
    lrs = {"policy": opt_pi.param_groups[0]["lr"]} | ({"vf": opt_vf.param_groups[0]["lr"]} if opt_vf else {})
    logs = {"objective/reward_mean": r_mean, "objective/reward_std": math.sqrt(max(pooled["reward_sq"] - r_mean ** 2, 0.0)),
            "objective/reward_mean_std_units": (r_mean - bmu) / bsd, "charts/images_per_s": n_images / seconds,
            "charts/global_step": global_step,
            "charts/seconds_update": seconds - times.get("rollout", 0.0) - times.get("scoring", 0.0)}
    logs.update({f"charts/{name}_lr": lr for name, lr in lrs.items()})
    if algo == "backprop":
        logs.update({"losses/loss": stats["loss"], "losses/grad_norm": stats["grad_norm"]})
    else:
        logs.update({
            "objective/kl": kl.sum(0).mean().item(), "objective/kl_penalty": pooled["kl_penalty"],
            "objective/kl_coef": stats["kl_coef"],  # beta of this epoch (--kl-target moves it)
            **({"objective/ensemble_disagreement": stats["ensemble_disagreement"]}
               if stats.get("ensemble_disagreement") is not None else {}),
            "objective/kl_share": pooled["kl_penalty"] / max(pooled["magnitude"], 1e-12),
            "losses/policy_loss": stats["pg_loss"], "losses/value_loss": stats["v_loss"],
            "losses/log_value_loss": math.log10(max(stats["v_loss"], 1e-12)), "losses/approx_kl": stats["approx_kl"],
            "losses/clipfrac": stats["clipfrac"], "losses/ratio": stats["ratio"],
            "losses/ratio_dev_at_start": stats["ratio_dev_at_start"],
            "losses/explained_variance": stats["explained_variance"],
            **({"losses/ptx_loss": stats["ptx_loss"]} if "ptx_loss" in stats else {}),
            "charts/seconds_rollout": times["rollout"],
            "charts/seconds_scoring": times["scoring"]})  # rewards, values, pi_base and a recomputed pi_old
    logs["charts/peak_rss_gb"] = speed.peak_rss_gb()
    if device.type == "cuda":
        logs["charts/peak_memory_gb"] = speed.peak_gpu_gb(device)
    for k, v in logs.items():
        writer.add_scalar(k, v, epoch)
    writer.add_histogram("objective/rewards", scores.cpu(), epoch)
    bar.set_postfix(reward=f"{r_mean:.3f}", **({"loss": f"{stats['loss']:.3g}"} if algo == "backprop" else
                                              {"kl": f"{logs['objective/kl']:.3g}", "clipfrac": f"{stats['clipfrac']:.2f}"}))
    return logs


def write_summary(out: Path, scores: dict, epochs: int, epoch_times: list, n_images: int, device) -> dict:
    """summary.json: the fixed-seed scores (drlhf.evaluation), epochs, seconds per epoch, images/s, peak memory."""
    seconds = sum(epoch_times) / len(epoch_times) if epoch_times else None
    summary = dict(scores, epochs=epochs, seconds_per_epoch=seconds, images_per_second=n_images / seconds if seconds else None,
                   peak_gpu_memory_gb=speed.peak_gpu_gb(device), peak_rss_gb=speed.peak_rss_gb())
    write_json(out / "summary.json", summary)
    return summary


class CompileLog:
    """--compile: the graphs each epoch compiled, printed and logged (charts/graphs_compiled). The first epoch
    compiles one graph per shape (the warm-up); a graph in a later epoch is a recompilation."""

    def __init__(self):
        self.seen, self.warm = speed.compiled_graphs(), False

    def epoch(self, writer, epoch: int, seconds: float) -> int:
        """Count the graphs compiled since the last call; with a writer (rank 0) also log and report them."""
        now = speed.compiled_graphs()
        new, self.seen = now - self.seen, now
        if writer is not None:
            writer.add_scalar("charts/graphs_compiled", new, epoch)
            if new and not self.warm:
                print(f"[drlhf] --compile warm-up: {new} graph(s) compiled in epoch {epoch + 1} ({seconds:.1f} s with "
                      f"it); cached in {os.environ.get('TORCHINDUCTOR_CACHE_DIR')} for the next run")
            elif new:
                print(f"[drlhf] warning: --compile recompiled {new} graph(s) in epoch {epoch + 1}; TORCH_LOGS=recompiles "
                      "says why")
        self.warm = True
        return new

