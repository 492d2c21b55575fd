"""Speed and memory machinery, decided once at set-up and never part of the method (not in the thesis).

    setup_cpu(device, threads)          # CPU: subnormals flushed, freed memory kept, a fixed thread count
    compile_module(unet, cache, scope)  # --compile: torch.compile, whole or block by block
    hold_frozen_in_compute_dtype(...)   # GPU fp16/bf16: frozen weights stored in the compute dtype
    peak_rss_gb(), peak_gpu_gb(device)  # memory, for the logs

Measurements behind each choice: docs/performance.md. The method's modules (sampler, reward model, value,
rewards) never import this one; drlhf/plan.py decides how one PPO epoch uses it.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import os
import resource
import sys
import time

import torch

from drlhf.distributed import AUTOCAST_DTYPES
from drlhf.families import repeated_blocks
from drlhf.files import default_cache_dir


# ---- CPU: subnormal numbers flushed to zero, freed memory kept (both set by setup_cpu) ----------------
def flush_denormals() -> bool:
    """Treat subnormal floats (|x| < 1.2e-38 in fp32) as zero: the FTZ/DAZ bits of x86 CPUs. Arithmetic on
    subnormals takes a slow microcode path, and training makes them: the offline default's PPO update took
    1.12-2.5 s per epoch, the slow epochs the same in two runs (the values, not the machine), and 1.14-1.21 s in
    every epoch with them flushed, with the same epoch rewards to 4 decimals over 12 epochs (docs/performance.md).
    The bits belong to the calling thread; OpenMP's worker threads copy them when they start, so this must run
    before torch's first parallel operation (setup_cpu, called right after the process is set up, does it: a
    pool started earlier keeps flushing only on the main thread). Returns False where the CPU has no such mode."""
    return torch.set_flush_denormal(True)


# bytes, for mallopt's M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1)
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, 256 << 20


def keep_freed_memory() -> bool:
    """glibc: serve allocations under 32 MiB from the heap and keep up to 256 MiB of freed heap instead of
    handing it back to the OS. By default a CPU step's activations (MiB each) are mapped fresh and unmapped
    again, and the kernel zero-fills every page on the next touch: a toy U-Net training step at batch 20 had
    800-5,100 page faults (0-320 with this; both vary per process) and took 70-76 ms against 62-65 ms with this
    (3 runs each of 80 steps). Memory use grows by at most the retained 256 MiB; numbers are unchanged.
    Returns False (and does nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(-3, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(-1, MALLOC_TRIM_THRESHOLD))


def _cpu_seconds() -> tuple[float, float, int] | None:
    """(busy seconds of this process's allowed cores since boot, of this process, number of those cores); None
    where /proc/stat is missing (not Linux)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    busy = 0  # user nice system idle iowait irq softirq steal: all but idle and iowait
    for fields in lines:
        if int(fields[0][3:]) in cpus:
            v = [int(x) for x in fields[1:9]]
            busy += sum(v) - v[3] - v[4]
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), len(cpus)


# ---- CPU threads: fixed for the whole run ----------------------------------------------------------------
# Parallel reductions split their work by the thread count, so a run's numbers depend on it: it is chosen once,
# at start-up, from the cores this process may use (never from the machine's load), and saved with the run.
# An OpenMP thread that waits for a core another process holds stalls every operation of the others: the offline
# default's epoch (25 steps then) took 3.4 s on 2 idle cores at 2 threads, 5.3 s at 1 thread, and over 75 s at 2
# threads beside one busy process (at 1 thread: 5.2 s; docs/performance.md). So a busy machine at start-up is
# reported with the flag that sets the count, and the count is kept: the same command and seed repeat.
def default_threads() -> int:
    """$OMP_NUM_THREADS when set (torchrun sets 1 per process), else the cores this process may use divided among
    torchrun's local processes (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def usable_cores() -> int:
    """The cores this process may run on (its affinity set; all of the machine's where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(window: float = 0.2) -> float | None:
    """Cores of this process's allowed set that other processes kept busy over `window` seconds; None where
    /proc/stat is missing (not Linux)."""
    first, t0 = _cpu_seconds(), time.perf_counter()
    time.sleep(window)
    last = _cpu_seconds()
    if first is None or last is None:
        return None
    return max(0.0, (last[0] - first[0]) - (last[1] - first[1])) / max(time.perf_counter() - t0, 1e-3)


def setup_cpu(device: torch.device, threads: int | None, flag: str = "--threads") -> int:
    """At start-up, before torch's first parallel operation: on a CPU device, subnormals flushed and freed memory
    kept; torch's intra-op threads set to `threads` (None: default_threads()) for the whole run (on any device:
    the CPU work of a GPU run uses them too). Returns the thread count. More threads than the cores this process
    may use are refused (given by `flag`) or capped (from $OMP_NUM_THREADS), with one line: each extra thread
    waits for a core another one holds (1,000 threads made a 0.3 s toy epoch take 157 s). Where other processes
    already keep cores busy and fewer threads would help, one line says so and names `flag`."""
    cores = usable_cores()
    if threads is not None and threads > cores:
        raise ValueError(f"{flag} {threads}: this process may use {cores} CPU core(s); pass {flag} {cores} or fewer "
                         "(or leave it unset for the default)")
    if threads is None and (threads := default_threads()) > cores:
        print(f"[drlhf] CPU: $OMP_NUM_THREADS={threads} is more than the {cores} core(s) this process may use: {cores} "
              f"thread(s) instead ({flag} sets the count)", file=sys.stderr)
        threads = cores
    if device.type == "cpu":
        flush_denormals()
        keep_freed_memory()
    torch.set_num_threads(threads)
    alone = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1  # torchrun's other local processes are no other load
    others = busy_cores() if device.type == "cpu" and alone else None
    n_cpus = _cpu_seconds()[2] if others is not None else None
    if others is not None and threads + others > n_cpus + 0.4 and max(1, int(n_cpus - others + 0.4)) < threads:
        print(f"[drlhf] CPU: other processes keep {others:.1f} of {n_cpus} cores busy and this run uses {threads} "
              f"thread(s); fewer ({flag} {max(1, int(n_cpus - others + 0.4))}) run faster on a busy machine with "
              "other numbers (docs/performance.md); the count stays fixed for the whole run", file=sys.stderr)
    return threads


def hold_frozen_in_compute_dtype(module: torch.nn.Module, precision: str, device: torch.device) -> int:
    """Store the weights of frozen Linear and Conv layers (no parameter that trains) in the autocast dtype on a
    GPU, instead of letting autocast cast them from fp32 at every forward: the same fp16/bf16 values reach the
    same kernels, so outputs are unchanged, for half the memory and no cast per forward. Norms, embeddings and
    everything that trains stay fp32 (autocast runs norms in fp32 from the fp32 weights). Only for modules that
    are always called under `autocast`. Returns the number of parameters converted (0 on CPU or in fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None or device.type != "cuda":
        return 0
    n = 0
    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and params and \
                not any(p.requires_grad for p in params):
            m.to(dtype)
            n += sum(p.numel() for p in params)
    return n


# the blocks the networks repeat, compiled one at a time by --compile-scope blocks: each family names its own
# (drlhf.families: diffusers' transformer and ResNet blocks, guided-diffusion's ResBlock and AttentionBlock, SD3's
# joint blocks)
REPEATED_BLOCKS = repeated_blocks()


def compile_module(module: torch.nn.Module, cache_dir: str | None = None, scope: str = "model") -> torch.nn.Module:
    """torch.compile at static shapes: every batch size a run uses (rollout, update) gets its own graph once, in
    the first epoch, instead of a dynamic-shape recompile and slower kernels. Inductor's compiled kernels and
    graphs are cached on disk ($TORCHINDUCTOR_CACHE_DIR, default <cache_dir>/torchinductor), so a second run with
    the same shapes loads them instead of compiling again.

    scope "model": the whole forward as one graph (returns a wrapper around `module`). scope "blocks" (regional
    compilation, https://docs.pytorch.org/tutorials/recipes/regional_compilation.html): each block of
    REPEATED_BLOCKS compiled on its own, so that blocks of the same class and shapes share one graph and the rest
    of the forward runs eagerly; it returns a view of `module` that shares its parameters and buffers (training
    either trains `module`), while `module` itself stays uncompiled for what copies or evaluates it. A module
    without such blocks is compiled whole."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _torch_inductor_default()):  # not the user's choice
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir or default_cache_dir(), "torchinductor")
    if scope == "blocks" and any(type(m).__name__ in REPEATED_BLOCKS for m in module.modules()):
        shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
        view = copy.deepcopy(module, memo=shared)  # the module tree copied, every tensor shared
        # one compiled entry per block class, shape and grad mode, all on the code of nn.Module's call: Pink on SD
        # v1.5 compiles 30 ResNet-block and 8 transformer-block graphs, where dynamo's default limit of 8 would
        # leave most blocks eager
        config = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):  # the newer name and the older one
            if hasattr(config, limit):
                setattr(config, limit, max(getattr(config, limit), 256))
        for m in view.modules():
            if type(m).__name__ in REPEATED_BLOCKS:
                m.compile(dynamic=False)
        return view
    return torch.compile(module, dynamic=False)


def _torch_inductor_default() -> str | None:
    """The cache folder inductor falls back to, which it also writes into $TORCHINDUCTOR_CACHE_DIR when it first
    looks (so a value there may be torch's own default rather than the user's)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default
        return os.path.abspath(inductor_default())
    except ImportError:  # a torch without that module: only an unset variable counts as no choice
        return None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter); a count that still grows
    after the first epoch means recompilation (TORCH_LOGS=recompiles says why)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_gpu_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
