"""Devices, processes and number formats (Table 6.2, "Hardware"), shared by the four scripts.

    rank, world, device = setup_distributed("auto")   # torchrun's RANK / LOCAL_RANK / WORLD_SIZE; nccl or gloo
    with autocast("fp16", device): ...                # Table 6.2 "Precision"; a no-op for fp32
"""
from __future__ import annotations

import copy
import os
import sys
import time
from typing import Literal

import torch
import torch.distributed as dist

Precision = Literal["fp32", "fp16", "bf16"]
DeviceFlag = Literal["auto", "cpu", "cuda"]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(flag: str) -> torch.device:
    """--device auto|cpu|cuda -> this process's device (auto: cuda when there is one; GPU LOCAL_RANK under torchrun)."""
    use_cuda = flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
    if not use_cuda:
        flush_denormals()
        keep_freed_memory()
        balance_cpu_threads(first=True)
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")


def setup_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; one process per GPU with nccl, or CPU processes with gloo.
    Returns (rank, world size, device); a plain single-process run is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0):
    """End the process with exit status `code` (drlhf.cli.run calls it after a script's main). A torchrun worker
    (WORLD_SIZE > 1) ends with os._exit once stdout and stderr are flushed, so that the interpreter's finalization
    never runs in it: in a gloo process it can abort after all the work is done, when a C++ thread of the process
    group touches a Python object while the interpreter is being torn down (std::terminate, exit code -6). Seen
    once in CI, rank 1 of `torchrun train_reward.py` after the model was saved ("terminate called without an active
    exception"); pytorch/pytorch PR 179291 describes the mechanism for process groups never destroyed. Not
    reproduced here in 112 runs, so this is a guard, not a proven fix. The scripts close what they write before
    main returns. Any other process exits the usual way (a plain return for 0)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


# ---- CPU: subnormal numbers flushed to zero, freed memory kept (both set by resolve_device) ----------------
def flush_denormals() -> bool:
    """Treat subnormal floats (|x| < 1.2e-38 in fp32) as zero: the FTZ/DAZ bits of x86 CPUs. Arithmetic on
    subnormals takes a slow microcode path, and training makes them: the offline default's PPO update took
    1.12-2.5 s per epoch, the slow epochs the same in two runs (the values, not the machine), and 1.14-1.21 s in
    every epoch with them flushed, with the same epoch rewards to 4 decimals over 12 epochs (docs/performance.md).
    The bits belong to the calling thread; OpenMP's worker threads copy them when they start, so this must run
    before torch's first parallel operation (resolve_device, the first thing a script does, calls it: a pool
    started earlier keeps flushing only on the main thread). Returns False where the CPU has no such mode."""
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
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(-3, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(-1, MALLOC_TRIM_THRESHOLD))


# ---- CPU threads that follow the machine's load -----------------------------------------------------------
# An OpenMP thread that waits for a core another process holds stalls every operation of the others: the offline
# default's epoch (25 steps then) took 3.4 s on 2 idle cores at 2 threads, 5.3 s at 1 thread, and over 75 s at 2
# threads beside one busy process (at 1 thread: 5.2 s). So torch gets as many threads as the cores other processes
# leave free.
_balance = {"at": None}


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


def balance_cpu_threads(first: bool = False, window: float = 2.0):
    """Set torch's intra-op threads to the cores that other processes left free over the last `window` seconds
    or more (at least 1; the cores divided among torchrun's local processes at most). Cheap to call often: it
    only acts once a window has passed. first=True starts it with a 0.2 s look at the machine. An explicit
    OMP_NUM_THREADS (torchrun sets 1 per process) or torch.set_num_threads by the caller is left alone."""
    if "OMP_NUM_THREADS" in os.environ or (_balance["at"] is None and not first):
        return
    now = time.perf_counter()
    if first:
        _balance.update(at=now, last=_cpu_seconds(), threads=torch.get_num_threads())
        time.sleep(0.2)
    elif now - _balance["at"] < window:
        return
    reading = _cpu_seconds()
    if reading is None or _balance["last"] is None or torch.get_num_threads() != _balance["threads"]:
        _balance["at"] = None  # no /proc/stat, or someone else set the threads: stop balancing
        return
    (busy0, own0, _), (busy1, own1, n_cpus) = _balance["last"], reading
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(time.perf_counter() - _balance["at"], 1e-3)  # cores
    # a core counts as free while others take under 0.4 of it. Measured on 2 cores, s/epoch at 2 threads vs 1 with
    # another process busy a share of the time: 1/3: 4.96 vs 5.33; 1/2: 7.48 vs 5.46; 0.7: 11.0 vs 6.0
    threads = max(1, min(n_cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(n_cpus - others + 0.4)))
    if threads != torch.get_num_threads():
        print(f"[drlhf] CPU: other processes use {others:.1f} of {n_cpus} cores -> {threads} torch thread(s) "
              "(set OMP_NUM_THREADS to fix the number)", file=sys.stderr)
        torch.set_num_threads(threads)
    _balance.update(at=time.perf_counter(), last=_cpu_seconds(), threads=threads)


def broadcast_object(obj):
    """Rank 0's copy of a picklable object on every rank (identity in a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box)
    return box[0]


def autocast(precision: str, device: torch.device):
    """torch.autocast for fp16 / bf16 (Table 6.2 "Precision"); disabled for fp32. Log-probabilities are computed
    in fp32 inside it regardless (drlhf.sampler)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all processes, in place (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's x (same shape on each) concatenated along dim 0, in rank order (x itself in one process)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def sync_device(device: torch.device):
    """Wait for queued GPU work, so that phase timings are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# the blocks that U-Nets repeat, compiled one at a time by --compile-scope blocks: diffusers' transformer and
# ResNet blocks (SD v1.5, the toy models) and guided-diffusion's ResBlock and AttentionBlock (OpenAI's 64x64 models)
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "ResBlock", "AttentionBlock")


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
    without such blocks is compiled whole. CPU thread balancing (balance_cpu_threads) stops here."""
    from drlhf.toys import default_cache_dir
    # dynamo guards on torch's thread count: a change after compiling would recompile every graph (and inductor's
    # compile workers look like other processes' load to balance_cpu_threads), so the count stays as it is now
    _balance["at"] = None
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
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        return os.path.abspath(default_cache_dir())
    except ImportError:  # a torch without that module: only an unset variable counts as no choice
        return None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter); a count that still grows
    after the first epoch means recompilation (TORCH_LOGS=recompiles says why)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_gpu_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
