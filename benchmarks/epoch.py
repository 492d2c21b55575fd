"""Epoch benchmark: N epochs of any train_ppo.py preset, timed phase by phase, to size a run before launching it.

The real architectures are built at random weights from their configs (no download; seconds on a GPU) into
--models-dir and loaded through train_ppo.py's own loaders; the epochs run through train_ppo.py's own functions
(`setup`, `train_epoch`), so what is timed is what a run does, minus evaluation, logging and checkpoints.

    python benchmarks/epoch.py --exp pink --num-envs 8                         # SD v1.5 U-Net/VAE/CLIP-L, Pink RM
    python benchmarks/epoch.py --exp pink --num-envs 8 --lora-rank 4 --gradient-checkpointing true
    python benchmarks/epoch.py --exp colorfulness                              # OpenAI 64x64 U-Net + classifier
    python benchmarks/epoch.py --exp pickscore-sd3                             # SD3.5-Medium, critic + GAE, LoRA
    python benchmarks/epoch.py --exp pickscore-sd3 --advantage group --value-fn none   # the critic-free baseline
    python benchmarks/epoch.py --exp pickscore-flux                            # FLUX.1-dev (11.9 B), the same method
    python benchmarks/epoch.py --exp pickscore-qwen-image                      # Qwen-Image (20.4 B), the same method
    python benchmarks/epoch.py --exp pink --num-envs 8 --compile true --bench-epochs 8
    python benchmarks/epoch.py                                                 # the offline default (toy model)
    python benchmarks/epoch.py --exp pink --size tiny --device cpu --num-envs 2 --bench-epochs 3   # a CPU smoke run
    python benchmarks/epoch.py --exp pickscore-flux --size tiny --device cpu --num-envs 2 --group-size 2 \
        --num-steps 2 --minibatch-size 2 --grad-accum-steps 1 --precision fp32 --bench-epochs 2   # FLUX's, on CPU

Every flag that is not the benchmark's own (below) is train_ppo.py's. It prints a table and writes JSON
(--json): seconds per epoch, images/s, the phases (rollout; scoring = rewards, values, pi_base and a recomputed
pi_old; update), peak memory, FLOPs per epoch (counted by torch.utils.flop_counter on one extra eager epoch:
matmuls, convolutions and attention, forward and backward, gradient-checkpointing recomputes included) and the
achieved TFLOP/s against a matmul peak measured on the same device in the run's number format; the first epoch
(compilation, allocator and kernel warm-up) apart from the steady state (the mean of the later epochs).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_ppo  # noqa: E402
from benchmarks.architectures import (build_classifier_reward_model, build_flux, build_guided,  # noqa: E402
                                      build_pickscore, build_qwen_image, build_reward_model, build_sd15, build_sd35)
from drlhf import cli, distributed, plan, presets, speed, tracking  # noqa: E402
from drlhf.files import default_cache_dir  # noqa: E402

# ======== the benchmark: time the epochs, count their FLOPs, measure the device's matmul peak ===============
def benchmark(argv: list[str], epochs: int, count_flops: bool, profile_top: int = 0,
              channels_last: bool = False, rollout_in_one_batch: bool = False) -> dict:
    args, _ = train_ppo.parse_args(argv)
    train_ppo.check_requirements(args)
    rank, world, device = distributed.setup_distributed(args.device)
    args.threads = speed.setup_cpu(device, args.threads)
    base, nets, epoch_plan, _, prompts, prompt_embeds, gens, (B, n_states, n_minibatches) = train_ppo.setup(
        args, rank, world, device)
    if rollout_in_one_batch:  # the rollout as before it ran in the update's passes (an A/B measurement)
        epoch_plan = plan.EpochPlan(args, B, nets, one_batch_rollout=True)
    kl_ctl = train_ppo.KLController(args.kl_coef, args.kl_target, args.kl_horizon)
    if channels_last:  # a measurement before any train_ppo.py flag: every network's 4-D weights in NHWC order
        for module in (base.net, nets.ref_net, nets.value_net, base.vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    state = {"epoch": 0, "global_step": 0}
    train_ppo.set_lrs(nets.opt_pi, nets.opt_vf, args, state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_log, rows = tracking.CompileLog(), []
    for epoch in range(epochs):
        state["epoch"] = epoch
        distributed.sync_device(device)
        t0 = time.perf_counter()
        _, _, _, times = train_ppo.train_epoch(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds,
                                               B, rank, device)
        distributed.sync_device(device)
        seconds = time.perf_counter() - t0
        rows.append(dict(seconds=seconds, rollout=times.get("rollout"), scoring=times.get("scoring"),
                         update=seconds - times.get("rollout", 0.0) - times.get("scoring", 0.0),
                         graphs_compiled=compile_log.epoch(None, epoch, seconds)))
        print(f"[bench] epoch {epoch + 1}/{epochs}: {seconds:.3f} s ({', '.join(f'{k} {v:.3f}' for k, v in rows[-1].items() if k in ('rollout', 'scoring', 'update') and v is not None)})"
              + (f", {rows[-1]['graphs_compiled']} graph(s) compiled" if args.compile else ""), flush=True)
    result = summarize(rows, B * world, args, device)
    if args.compile:
        result.update(compile_seconds=compile_seconds())
    if count_flops:
        state["epoch"] = epochs
        flops = count_epoch_flops(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B, rank,
                                  device)
        peak = matmul_peak_tflops(args, device)
        steady = result["steady_seconds_per_epoch"] or result["first_epoch_seconds"]
        result.update(flops_per_epoch=flops, achieved_tflops=flops / steady / 1e12, matmul_peak_tflops=peak,
                      fraction_of_peak=flops / steady / 1e12 / peak)
    if profile_top:
        state["epoch"] = epochs + (1 if count_flops else 0)
        result.update(profile_epoch(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B, rank,
                                    device, profile_top))
    result.update(states_per_epoch=n_states, minibatches_per_epoch=n_minibatches,
                  rollout_notes=epoch_plan.notes())  # its graph; the pi_old recompute
    return result


def summarize(rows: list[dict], n_images: int, args, device) -> dict:
    """First epoch apart; the steady state is the mean of the later epochs (None with a single epoch)."""
    steady = rows[1:]
    mean = (lambda k: sum(r[k] for r in steady) / len(steady) if steady and steady[0][k] is not None else None)
    s = mean("seconds")
    return dict(epochs=rows, images_per_epoch=n_images, first_epoch_seconds=rows[0]["seconds"],
                steady_seconds_per_epoch=s, images_per_second=n_images / (s or rows[0]["seconds"]),
                steady_phases={k: mean(k) for k in ("rollout", "scoring", "update")},
                graphs_compiled_first_epoch=rows[0]["graphs_compiled"],
                recompiles_after_first_epoch=sum(r["graphs_compiled"] for r in steady),
                peak_gpu_allocated_gb=speed.peak_gpu_gb(device),
                peak_gpu_reserved_gb=torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None,
                peak_rss_gb=speed.peak_rss_gb())


# torch.compile's warm-up phases worth reading first (dynamo's timer names -> what they are)
COMPILE_PHASES = {"bytecode_tracing": "dynamo tracing", "aot_trace_joint_graph": "joint fw+bw trace",
                  "_recursive_joint_graph_passes": "joint-graph passes",
                  "min_cut_rematerialization_partition": "fw/bw partition",
                  "compile_fx.<locals>.fw_compiler_base": "inductor fw",
                  "compile_fx.<locals>.bw_compiler": "inductor bw",
                  "async_compile.wait": "waiting for the kernel compile pool"}


def compile_seconds() -> dict:
    """Seconds torch.compile spent in each timed phase of this process so far, summed over its graphs (dynamo's
    compile_times; the phases nest, so they do not add up to the warm-up)."""
    from torch._dynamo.utils import compile_times
    names, values = compile_times(repr="csv", aggregate=True)
    return {name: float(v) for name, v in zip(names, values)}


def count_epoch_flops(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B, rank, device) -> int:
    """FLOPs of one more epoch, counted eagerly (compiled forwards are swapped for the plain modules meanwhile)."""
    from torch.utils.flop_counter import FlopCounterMode
    compiled, nets.policy_net.net = nets.policy_net.net, base.net
    compiled_ref, epoch_plan.reference = epoch_plan.reference, nets.ref_net
    try:
        with FlopCounterMode(display=False) as counter:
            train_ppo.train_epoch(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B, rank,
                                  device)
    finally:
        nets.policy_net.net, epoch_plan.reference = compiled, compiled_ref
    return counter.get_total_flops()


def profile_epoch(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B, rank, device,
                  top: int) -> dict:
    """One more epoch under torch.profiler: the `top` operators by self time (their GPU kernels' time on a GPU,
    CPU time otherwise) and how much of the epoch's wall time that time fills. On a GPU, a busy share well below 1
    means the GPU waits for the CPU (Python, kernel launches, syncs); the profiler's own overhead lowers it too."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device.type == "cuda"
    distributed.sync_device(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        train_ppo.train_epoch(nets, epoch_plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B, rank, device)
        distributed.sync_device(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    self_s = (lambda e: (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e6)  # microseconds
    busy = sum(self_s(e) for e in events)
    ops = [dict(name=e.key, calls=e.count, self_seconds=self_s(e), share=self_s(e) / busy if busy else 0.0)
           for e in sorted(events, key=self_s, reverse=True)[:top]]
    return dict(profile=dict(clock="gpu" if on_gpu else "cpu", wall_seconds=wall, busy_seconds=busy, top_ops=ops))


def matmul_peak_tflops(args, device) -> float:
    """The best of a few large square matmuls in the run's number format (fp16/bf16 under autocast; fp32 with
    or without TF32), i.e. what this device reaches on the operation that dominates a U-Net."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    with distributed.autocast(args.precision, device):
        for _ in range(3):
            distributed.sync_device(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            distributed.sync_device(device)
            best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best / 1e12


# ======== the models: real architectures at random weights, built once into --models-dir ==================
def model_flags(argv: list[str], models_dir: Path, size: str, device) -> list[str]:
    """The flags that point the preset at random-weight models of its architecture (built on first use)."""
    args, given = train_ppo.parse_args(argv)
    flags = []
    if args.pretrained == train_ppo.presets.SD15 and "pretrained" not in given:
        sd = build_sd15(models_dir / f"sd15-{size}", size, device)
        flags += ["--pretrained", str(sd)] + (["--resolution", "64"] if size == "tiny" else [])
        if (args.reward == "rm" or "reward" in (args.value_fn, args.value_init)) and "reward_model" not in given:
            flags += ["--reward-model", str(build_reward_model(sd, models_dir / f"rm-sd15-{size}", device))]
    elif args.pretrained == train_ppo.presets.SD35M and "pretrained" not in given:
        sd = build_sd35(models_dir / f"sd35m-{size}", size, device)
        flags += ["--pretrained", str(sd)] + (["--resolution", "64"] if size == "tiny" else [])
    elif args.pretrained == train_ppo.presets.FLUX1_DEV and "pretrained" not in given:
        flux = build_flux(models_dir / f"flux1-dev-{size}", size, device, "dev")
        flags += ["--pretrained", str(flux)] + (["--resolution", "32"] if size == "tiny" else [])  # 4 image tokens
    elif args.pretrained == train_ppo.presets.QWEN_IMAGE and "pretrained" not in given:
        qwen = build_qwen_image(models_dir / f"qwen-image-{size}", size, device)
        flags += ["--pretrained", str(qwen)] + (["--resolution", "32"] if size == "tiny" else [])  # 4 image tokens
    elif args.pretrained.startswith("guided-diffusion:") and "pretrained" not in given:
        folder = build_guided(models_dir / f"guided-{size}", size, device)
        flags += ["--pretrained", f"guided-diffusion:{folder / '64x64_diffusion.pt'}"]
        if args.classifier and "classifier" not in given:
            flags += ["--classifier", f"guided-diffusion:{folder / '64x64_classifier.pt'}"]
        if args.reward == "rm" and "reward_model" not in given:
            flags += ["--reward-model", str(build_classifier_reward_model(folder, args.class_labels))]
    if args.reward == "pickscore" and not {"reward", "pickscore_model"} & set(given):
        clip = build_pickscore(models_dir / f"pickscore-{size}", size, device)
        flags += ["--pickscore-model", str(clip / "model"), "--pickscore-processor", str(clip / "processor")]
    return flags


# ======== command line ====================================================================================
def table(result: dict, args_line: str) -> str:
    f = (lambda v, fmt=".3f": "-" if v is None else format(v, fmt))
    ph = result["steady_phases"]
    lines = [f"| {args_line} | {result['device']} |", "|---|---|",
             f"| s/epoch (steady / first) | {f(result['steady_seconds_per_epoch'])} / {f(result['first_epoch_seconds'])} |",
             f"| images/s | {f(result['images_per_second'])} |",
             f"| rollout / scoring / update (s) | {f(ph['rollout'])} / {f(ph['scoring'])} / {f(ph['update'])} |",
             f"| peak GB (GPU allocated / reserved; RSS) | {f(result['peak_gpu_allocated_gb'], '.1f')} / "
             f"{f(result['peak_gpu_reserved_gb'], '.1f')}; {f(result['peak_rss_gb'], '.1f')} |",
             f"| graphs compiled (epoch 1 / later) | {result['graphs_compiled_first_epoch']} / "
             f"{result['recompiles_after_first_epoch']} |"]
    if "flops_per_epoch" in result:
        lines.append(f"| TFLOP per epoch; achieved / matmul peak TFLOP/s | {result['flops_per_epoch'] / 1e12:.2f}; "
                     f"{result['achieved_tflops']:.1f} / {result['matmul_peak_tflops']:.1f} "
                     f"({100 * result['fraction_of_peak']:.0f} %) |")
    if result.get("compile_seconds"):
        phases = [f"{label} {result['compile_seconds'][k]:.1f}" for k, label in COMPILE_PHASES.items()
                  if k in result["compile_seconds"]]
        lines.append(f"| compile phases (s) | {', '.join(phases) or 'see compile_seconds in the JSON'} |")
    if "profile" in result:
        prof = result["profile"]
        lines.append(f"| profiled epoch: {prof['clock'].upper()} busy / wall (s) | {prof['busy_seconds']:.3f} / "
                     f"{prof['wall_seconds']:.3f} ({100 * prof['busy_seconds'] / prof['wall_seconds']:.0f} %) |")
        lines += [f"| {op['name'][:60]} ({op['calls']} calls) | {op['self_seconds']:.3f} s ({100 * op['share']:.1f} %) |"
                  for op in prof["top_ops"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag is train_ppo.py's (python train_ppo.py --help), e.g. --exp pink "
                                "--num-envs 8 --compile true.\n\n" + cli.presets_epilog(presets.for_script("train_ppo")))
    p.add_argument("--bench-epochs", type=int, default=5, help="epochs to time: the first apart, the mean of the rest "
                   "is the steady state (default 5)")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="full: the real architectures; tiny: "
                   "the same classes at toy widths (a CPU smoke run)")
    p.add_argument("--models-dir", default=None, help="where the random-weight models are built once "
                   "(default $DRLHF_CACHE/bench-models)")
    p.add_argument("--json", default=None, help="write the result here (default runs/bench/<exp>.json)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting epoch and the matmul peak")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile one more epoch (torch.profiler) and "
                   "list the N operators with the most self time: GPU kernel time on a GPU, else CPU (default 0: off)")
    p.add_argument("--channels-last", action="store_true", help="hold the U-Nets, value function and VAE in the "
                   "channels-last (NHWC) memory format, which convolutions on tensor cores prefer (the issue's list "
                   "of things to measure; not a train_ppo.py flag until it measures faster)")
    p.add_argument("--rollout-in-one-batch", action="store_true", help="A/B: the rollout evaluates all its "
                   "environments in one batch per step, as before it ran in the update's passes with --old-logprobs "
                   "recompute (split or padded, drlhf/plan.py); the recompute pass is then made wherever the batch "
                   "is not one pass")
    ours, rest = p.parse_known_args(argv)
    if ours.bench_epochs < 1:
        p.error("--bench-epochs must be at least 1")
    if ours.profile < 0:
        p.error("--profile N: N operators, 0 or more")
    run_args = train_ppo.parse_args(rest)[0]
    device = distributed.resolve_device(run_args.device)
    models_dir = Path(ours.models_dir or Path(default_cache_dir()) / "bench-models")
    argv_run = rest + model_flags(rest, models_dir, ours.size, device) + ["--checkpoint-every", "0"]
    result = benchmark(argv_run, ours.bench_epochs, not ours.no_flops, ours.profile, ours.channels_last,
                       ours.rollout_in_one_batch)
    result.update(argv=rest, size=ours.size, channels_last=ours.channels_last,
                  rollout_in_one_batch=ours.rollout_in_one_batch, torch=torch.__version__,
                  python=platform.python_version(),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"CPU ({torch.get_num_threads()} threads)")
    out = Path(ours.json or f"runs/bench/{run_args.exp or 'default'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result, " ".join(rest) or "(defaults)"))
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    train_ppo.cli.run(main)
