"""Devices, processes, collectives and number formats (Table 6.2, "Hardware"), shared by the four scripts.

    rank, world, device = setup_distributed("auto")   # torchrun's RANK / LOCAL_RANK / WORLD_SIZE; nccl or gloo
    with autocast("fp16", device): ...                # Table 6.2 "Precision"; a no-op for fp32

The speed and memory machinery (CPU threads, compilation, memory peaks) is drlhf/speed.py's.
"""
from __future__ import annotations

import os
import sys
from typing import Literal

import torch
import torch.distributed as dist

Precision = Literal["fp32", "fp16", "bf16"]
DeviceFlag = Literal["auto", "cpu", "cuda"]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(flag: str) -> torch.device:
    """--device auto|cpu|cuda -> this process's device (auto: cuda when there is one; GPU LOCAL_RANK under torchrun)."""
    use_cuda = flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
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


def broadcast_object(obj):
    """Rank 0's copy of a picklable object on every rank (identity in a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box)
    return box[0]


def on_rank_0(fn):
    """fn() run by rank 0 alone (claiming an output folder, say), its result returned on every rank; an exception it
    raises is raised on every rank, so that all processes stop with the same line instead of waiting for rank 0 at
    the next collective. In a single process: fn()."""
    if not dist.is_initialized():
        return fn()
    result = error = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def autocast(precision: str, device: torch.device):
    """torch.autocast for fp16 / bf16 (Table 6.2 "Precision"); disabled for fp32. Log-probabilities are computed
    in fp32 inside it regardless (drlhf.sampler)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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
