"""Devices, processes and number formats (Table 6.2, "Hardware"), shared by the four scripts.

    rank, world, device = setup_distributed("auto")   # torchrun's RANK / LOCAL_RANK / WORLD_SIZE; nccl or gloo
    with autocast("fp16", device): ...                # Table 6.2 "Precision"; a no-op for fp32
"""
from __future__ import annotations

import os
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


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all processes, in place (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def sync_device(device: torch.device):
    """Wait for queued GPU work, so that phase timings are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_gpu_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
