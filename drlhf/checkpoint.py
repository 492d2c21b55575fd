"""The run folder of train_ppo.py: its only writer and reader, and the atomic write every file writer uses.

    RUN/args.json                       the resolved flags
    RUN/tb/                             TensorBoard (charts/, losses/, objective/, eval/)
    RUN/samples_base.png, samples/epoch_NNNNN.png, samples_before_after.png, reward_histogram.png
    RUN/summary.json                    fixed-seed rewards before and after, speed, memory
    RUN/final_policy/                   the policy as a diffusers pipeline (guided_unet.safetensors for OpenAI's)
        drlhf_lineage.json              where it came from: the root base model and every round of RLHF behind it
    RUN/checkpoints/latest              name of the newest complete checkpoint folder
    RUN/checkpoints/epoch_NNNNN/
        policy.safetensors              the policy U-Net (the LoRA adapters only with --lora-rank)
        value.safetensors               the value function (absent with --value-fn none)
        state.pt                        optimizers, GradScaler, counters, RNG of every rank, args (weights_only)

Everything is written to a temporary sibling and renamed, so an interrupted write leaves the old file or
nothing, never half a file.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from drlhf.cli import UserError


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], object], folder: bool = False):
    """write(tmp) creates the file (or fills the folder, folder=True) `.NAME.tmp` next to path; tmp is then
    renamed to path, replacing what was there. An interrupted write leaves no file of that name half-written,
    and its leftover tmp is replaced by the next write of the same path. One writer per path at a time."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # left by an interrupted write
        if folder:
            tmp.mkdir()
        write(tmp)
        if folder and path.exists():  # a folder cannot replace a folder in one rename: the old one steps aside first
            _remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    except Exception as e:  # noqa: BLE001 - a full or read-only disk is the user's to fix, anything else a bug
        reason = _disk_problem(e)
        if reason is None:
            raise
        raise WriteError(f"could not write {path}: {reason}; nothing was half-written (the previous version, if any, "
                         "is intact). Free space or choose another output folder (--output-dir / --out)") from None
    finally:
        _remove(tmp)


class WriteError(UserError):
    """A file could not be written for a reason outside the program (disk full, read-only, no permission)."""


def _disk_problem(e: Exception) -> str | None:
    """Why a write failed, when the disk (not the program) is the cause; None otherwise. safetensors and
    torch.save report a full disk in their own exception types, so their messages are read too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return os.strerror(e.errno).lower()
    text = str(e)
    if "No space left on device" in text or "os error 28" in text or "unexpected pos" in text:
        return "no space left on device"
    return None


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: Path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_safetensors(tensors: dict, path: Path):
    """A state dict as safetensors (contiguous CPU copies), atomically."""
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp))


# ---------------------------------------------------------------------------------------------------------
# RNG state of a process: torch, numpy, python, CUDA and the run's own generators
# ---------------------------------------------------------------------------------------------------------
def rng_state(generators: dict) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors and numbers: loadable with weights_only
    st = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
          "python": random.getstate()}
    st.update({k: g.get_state() for k, g in generators.items()})
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict, generators: dict):
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    for k, g in generators.items():
        g.set_state(st[k])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------
class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:05d}"


def save_checkpoint(run_dir: Path, epoch: int, unet: nn.Module, value_net, opt_pi, opt_vf, scaler, state: dict,
                    args: dict, generators: dict, rank: int, adapters_only: bool = False):
    """Every rank's RNG state is gathered, then rank 0 writes the folder (temporary, then renamed) and `latest`."""
    rngs = [rng_state(generators)]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state(generators))
    if rank != 0:
        return
    path = checkpoint_dir(run_dir, epoch)
    for name, module in (("policy", unet), ("value", value_net)):
        if module is not None and not all(torch.isfinite(p).all() for p in module.parameters()):
            raise FloatingPointError(f"non-finite {name} weights at epoch {state['epoch']}: not writing {path}")

    def write(d: Path):
        weights = unet.state_dict()
        if adapters_only:  # the base weights never change: the adapters are the whole trained state
            weights = {k: v for k, v in weights.items() if "lora_" in k}
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, d / "policy.safetensors")
        if value_net is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in value_net.state_dict().items()}, d / "value.safetensors")
        torch.save({"opt_pi": opt_pi.state_dict(), "opt_vf": opt_vf.state_dict() if opt_vf else None,
                    "scaler": scaler.state_dict(), "state": state, "rng": rngs, "args": args}, d / "state.pt")
    for stale in path.parent.glob(".epoch_*.tmp"):  # left by a run killed while it wrote a checkpoint
        _remove(stale)
    atomic_write(path, write, folder=True)
    write_text(path.parent / "latest", path.name)


def latest_checkpoint(path: Path) -> Path:
    """A run folder -> the checkpoint folder its `latest` names; any other folder unchanged."""
    latest = Path(path) / "checkpoints" / "latest"
    return latest.parent / latest.read_text().strip() if latest.exists() else Path(path)


def find_checkpoint(spec: str) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    p = latest_checkpoint(Path(spec))
    if not (p / "state.pt").exists() or not (p / "policy.safetensors").exists():
        raise FileNotFoundError(f"--resume {spec}: no checkpoint there (expected state.pt and policy.safetensors, "
                                "or a run folder with checkpoints/latest)")
    return p


def load_state(ckpt: Path) -> dict:
    """state.pt of a checkpoint folder, read with weights_only: no pickled code runs."""
    try:
        return torch.load(Path(ckpt) / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume {ckpt}: state.pt is unreadable or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); resume from an earlier checkpoint folder") from None


def resume_args(args, given: set, args_cls):
    """--resume: (the saved args overridden only by the flags given now, the checkpoint folder, its state).
    The run continues in the run folder that holds the checkpoint (a copied run folder continues in the copy,
    never in the folder it was copied from), or in --output-dir when given."""
    ckpt = find_checkpoint(args.resume)
    saved = load_state(ckpt)
    merged = args_cls(**{**saved["args"], **{k: getattr(args, k) for k in given if k != "resume"}, "resume": args.resume})
    if "output_dir" not in given:
        if ckpt.parent.name != "checkpoints":
            raise CheckpointError(f"--resume {args.resume}: this checkpoint folder is not inside a run folder "
                                  "(RUN/checkpoints/epoch_N); pass --output-dir for the continued run")
        merged = dataclasses.replace(merged, output_dir=str(ckpt.parent.parent))
    return merged, ckpt, saved


def load_weights(module: nn.Module, path: Path, adapters_only: bool = False):
    try:
        missing, unexpected = module.load_state_dict(load_file(path), strict=not adapters_only)
        if adapters_only and (unexpected or any("lora_" in k for k in missing)):
            raise KeyError("adapter keys do not match (--lora-rank / --lora-targets changed?)")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume: {path} is unreadable or does not fit the model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); resume from an earlier checkpoint folder") from None


def restore_checkpoint(ckpt: Path, saved: dict, unet, value_net, opt_pi, opt_vf, scaler, generators: dict, rank: int,
                       world: int, adapters_only: bool = False) -> dict:
    """Load a checkpoint written by save_checkpoint into freshly built networks; returns the training state."""
    if len(saved["rng"]) != world:
        raise CheckpointError(f"--resume: the checkpoint was written by {len(saved['rng'])} processes, now {world}")
    load_weights(unet, Path(ckpt) / "policy.safetensors", adapters_only)
    if value_net is not None:
        load_weights(value_net, Path(ckpt) / "value.safetensors")
    opt_pi.load_state_dict(saved["opt_pi"])
    if opt_vf is not None:
        opt_vf.load_state_dict(saved["opt_vf"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"][rank], generators)
    return dict(saved["state"])


# ---------------------------------------------------------------------------------------------------------
# A trained policy for sample.py eval
# ---------------------------------------------------------------------------------------------------------
def load_policy_unet(spec: str, base, device) -> nn.Module:
    """A policy U-Net on `base` (drlhf.models.BaseModel) from a run folder (its latest checkpoint), a checkpoint
    folder or a diffusers folder (final_policy). LoRA checkpoints get their adapters re-injected and merged."""
    from drlhf import models
    path = latest_checkpoint(Path(spec))
    if (path / "policy.safetensors").exists():
        unet, weights = copy.deepcopy(base.unet), load_file(path / "policy.safetensors")
        if weights and all("lora_" in k for k in weights):  # a --lora-rank run: re-inject its adapters, merge them
            run_args = torch.load(path / "state.pt", map_location="cpu", weights_only=True)["args"]
            models.add_lora(unet, run_args["lora_rank"], run_args["lora_alpha"] or run_args["lora_rank"],
                            run_args["lora_targets"].split(","))
            unet.load_state_dict(weights, strict=False)
            return models.merge_lora(unet).to(device).eval()
        unet.load_state_dict(weights)
        return unet.to(device).eval()
    if path.is_dir():
        return models.load_base_model(str(path), device).unet.eval()
    raise FileNotFoundError(f"--checkpoints {spec}: not a run folder, checkpoint folder or diffusers folder")


# ---------------------------------------------------------------------------------------------------------
# Lineage: the rounds of iterated RLHF behind a policy (sample -> label -> train_reward -> train_ppo, again)
# ---------------------------------------------------------------------------------------------------------
LINEAGE_FILE = "drlhf_lineage.json"


def start_lineage(base) -> dict:
    """The lineage a run continues: the loaded policy's own (a final_policy folder of an earlier run), or a new one
    rooted at this base model. The root's fingerprint lets a reward model trained on the root base model score any
    later round's policy (drlhf.reward_model.load_reward_model). Call before training changes base.unet."""
    if base.lineage:
        return copy.deepcopy(base.lineage)
    root = {"base_model": base.source, "path": base.path}
    if hasattr(base.unet, "config"):  # diffusers U-Nets: the identity reward models built on it carry
        from drlhf.reward_model import base_fingerprint
        root["fingerprint"] = base_fingerprint(base.unet)
    return {"root": root, "rounds": []}


def record_round(lineage: dict, run_dir: Path, args: dict) -> dict:
    """The lineage of the policy this run wrote: the lineage it continued plus this run as the next round (which
    policy it started from, which reward and reward model, on which labeled datasets)."""
    datasets, rm_config = None, Path(args.get("reward_model") or "") / "config.json"
    if args.get("reward_model") and rm_config.exists():
        config = json.loads(rm_config.read_text())
        datasets = config.get("datasets") or [config.get("dataset")]
    entry = {"round": len(lineage["rounds"]) + 1, "run": str(run_dir), "policy_from": args["pretrained"],
             "reward": args["reward"], "reward_model": args.get("reward_model"),
             "reward_model_datasets": datasets, "epochs": args["epochs"], "seed": args["seed"]}
    return dict(lineage, rounds=lineage["rounds"] + [entry])


def write_lineage(policy_dir: Path, lineage: dict):
    write_text(Path(policy_dir) / LINEAGE_FILE, json.dumps(lineage, indent=1))
