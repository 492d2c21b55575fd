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
        state.pt                        optimizers, GradScaler, counters, the base model's identity, RNG of every
                                        rank, args (weights_only)

Every file is written through drlhf/files.py (a temporary sibling, then renamed): an interrupted write leaves
the old file or nothing. One process at a time writes a run folder (a lock beside it, RUN/../.NAME.lock, held
for the run's life), and a folder that holds a run is never written into by a new run (`claim_run_folder`); a
resumed run keeps its experiment (`resume_args`), and one resumed from an earlier checkpoint is a branch in a
folder of its own, its parent recorded in the lineage. state.pt's `state["base"]` is what the run's base model
was (drlhf.models.identity): sample.py checks a policy against it before putting it beside a base model.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from drlhf import models
from drlhf.cli import UserError
from drlhf.distributed import on_rank_0
from drlhf.files import (OUTPUT_KINDS, atomic_write, check_writable, first_free, hold_folder, move_aside, remove,
                         write_json, write_text)


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


def save_checkpoint(run_dir: Path, epoch: int, net: nn.Module, value_net, opt_pi, opt_vf, scaler, state: dict,
                    args: dict, generators: dict, rank: int, adapters_only: bool = False):
    """Every rank's RNG state is gathered, then rank 0 writes the folder (temporary, then renamed) and `latest`."""
    rngs = [rng_state(generators)]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state(generators))
    if rank != 0:
        return
    path = checkpoint_dir(run_dir, epoch)
    for name, module in (("policy", net), ("value", value_net)):
        if module is not None and not all(torch.isfinite(p).all() for p in module.parameters()):
            raise FloatingPointError(f"non-finite {name} weights at epoch {state['epoch']}: not writing {path}")

    def write(d: Path):
        weights = net.state_dict()
        if adapters_only:  # the base weights never change: the adapters are the whole trained state
            weights = {k: v for k, v in weights.items() if "lora_" in k}
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, d / "policy.safetensors")
        if value_net is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in value_net.state_dict().items()}, d / "value.safetensors")
        torch.save({"opt_pi": opt_pi.state_dict(), "opt_vf": opt_vf.state_dict() if opt_vf else None,
                    "scaler": scaler.state_dict(), "state": state, "rng": rngs, "args": args}, d / "state.pt")
    for stale in path.parent.glob(".epoch_*.tmp"):  # left by a run killed while it wrote a checkpoint
        remove(stale)
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


# flags a resumed run may change: they continue the experiment (more epochs, the learning-rate schedule, logging,
# checkpoints, where it runs and how fast); every other flag defines what is optimized or measured and must stay
CONTINUATION_FLAGS = {"epochs", "policy_lr", "policy_lr_early", "policy_lr_early_epochs", "vf_lr", "policy_warmup_steps",
                      "vf_warmup_steps", "eval_every", "checkpoint_every", "output_dir", "resume", "replace_run",
                      "cache_dir", "device", "threads", "compile", "compile_scope", "cudnn_benchmark",
                      "gradient_checkpointing", "fused_minibatches"}


def resume_args(args, given: set, args_cls):
    """--resume: (the saved args overridden only by the continuation flags given now, the checkpoint folder, its
    state). A flag that would change the experiment is refused with the list of differences. The run continues in
    the run folder given (a live one is then refused when it is claimed), or in the one that holds the checkpoint
    folder given when it is that run's latest; an earlier checkpoint starts a branch, RUN-branch-epoch_N (or
    --output-dir), so that nothing of the original run changes."""
    ckpt = find_checkpoint(args.resume)
    saved = load_state(ckpt)
    old = saved["args"]
    changed = {k: (old.get(k), getattr(args, k)) for k in sorted(given) if old.get(k) != getattr(args, k)}
    identity = {k: v for k, v in changed.items() if k not in CONTINUATION_FLAGS and k in old}
    if identity:
        diffs = ", ".join(f"--{k.replace('_', '-')} {new} (the run has {was})" for k, (was, new) in identity.items())
        raise CheckpointError(f"--resume {args.resume}: {diffs} would change the experiment the checkpoint belongs "
                              "to; drop these flags to continue it, or start a new run with another --output-dir")
    epoch = saved["state"]["epoch"]
    total = args.epochs if "epochs" in given else old["epochs"]
    if total <= epoch:
        raise CheckpointError(f"--resume {args.resume}: the checkpoint has trained {epoch} epochs and --epochs is "
                              f"{total}: nothing to continue; pass --epochs larger than {epoch}")
    merged = args_cls(**{**old, **{k: getattr(args, k) for k in given if k != "resume"}, "resume": args.resume})
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if "output_dir" not in given:
        if run_dir is None:
            raise CheckpointError(f"--resume {args.resume}: this checkpoint folder is not inside a run folder "
                                  "(RUN/checkpoints/epoch_N); pass --output-dir for the continued run")
        # a run folder given: continue that run (a live one is refused by claim_run_folder, never branched from);
        # a checkpoint folder given: continue its run where it is the latest, else branch from it
        named_run = (Path(args.resume) / "checkpoints" / "latest").exists()
        out = run_dir if named_run or latest_checkpoint(run_dir) == ckpt else \
            first_free(Path(f"{run_dir}-branch-{ckpt.name}"))
        merged = dataclasses.replace(merged, output_dir=str(out))
    branch = run_dir is None or Path(merged.output_dir).resolve() != run_dir.resolve()
    saved["resumed"] = dict(checkpoint=str(ckpt), epoch=epoch, branch=branch,
                            changed={k: list(v) for k, v in changed.items() if k not in ("resume", "output_dir")})
    return merged, ckpt, saved


RUN_FILES = (*OUTPUT_KINDS["a PPO run"], "tb")  # what makes a folder a run


def claim_run_folder(args, ckpt: Path | None) -> Path:
    """The run folder of train_ppo.py (--output-dir, default runs/<exp>), made ready for this run by rank 0, which
    holds it for the run's whole life (drlhf.files.hold_folder: a second process is refused, naming the holder). A
    folder that holds a run is refused unless this run continues it (--resume of its latest checkpoint) or
    --replace-run moves the old run aside to DIR.old-N first (never mixed). A folder that cannot be created or
    written into is one sentence; nothing is created here (a run that fails before its first result leaves no
    folder). ckpt: the checkpoint --resume continues (resume_args), or None. Every rank gets the folder, or the
    same error."""
    out = Path(args.output_dir or f"runs/{args.exp or 'digits-target'}")

    def claim():
        hold_folder(out, "a PPO run", "--output-dir")  # before it is looked at: no other process changes it meanwhile
        continuing = ckpt is not None and (out / "checkpoints").is_dir() and \
            latest_checkpoint(out).resolve() == Path(ckpt).resolve()
        holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
        if holds_run and not continuing and not args.replace_run:
            how = f"continue it with --resume {out}" if (out / "checkpoints" / "latest").exists() else "keep it"
            raise UserError(f"--output-dir {out} already holds a run: {how}, choose another --output-dir, or pass "
                            "--replace-run to move the old run aside and start over")
        if holds_run and continuing and args.replace_run:
            raise UserError(f"--replace-run with --resume {args.resume}: the run to move aside is the one being "
                            "resumed; drop --replace-run to continue it")
        if holds_run and not continuing:
            aside = move_aside(out)
            print(f"[drlhf] --replace-run: the run that was in {out} is now in {aside}")
        check_writable(out, "--output-dir")
        return out
    return on_rank_0(claim)


def load_weights(module: nn.Module, path: Path, adapters_only: bool = False):
    try:
        missing, unexpected = module.load_state_dict(load_file(path), strict=not adapters_only)
        if adapters_only and (unexpected or any("lora_" in k for k in missing)):
            raise KeyError("adapter keys do not match (--lora-rank / --lora-targets changed?)")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume: {path} is unreadable or does not fit the model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); resume from an earlier checkpoint folder") from None


def restore_checkpoint(ckpt: Path, saved: dict, net, value_net, opt_pi, opt_vf, scaler, generators: dict, rank: int,
                       world: int, adapters_only: bool = False) -> dict:
    """Load a checkpoint written by save_checkpoint into freshly built networks; returns the training state."""
    if len(saved["rng"]) != world:
        raise CheckpointError(f"--resume: the checkpoint was written by {len(saved['rng'])} processes, now {world}")
    load_weights(net, Path(ckpt) / "policy.safetensors", adapters_only)
    if value_net is not None:
        load_weights(value_net, Path(ckpt) / "value.safetensors")
    opt_pi.load_state_dict(saved["opt_pi"])
    if opt_vf is not None:
        opt_vf.load_state_dict(saved["opt_vf"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"][rank], generators)
    state, resumed = dict(saved["state"]), saved.get("resumed")
    if resumed:  # the lineage records every resume's changed flags, and a branch's parent checkpoint
        state["resumes"] = [*state.get("resumes", []), dict(from_epoch=resumed["epoch"], changed=resumed["changed"])]
        if resumed["branch"]:
            state["branched_from"] = dict(checkpoint=resumed["checkpoint"], epoch=resumed["epoch"])
    return state


# ---------------------------------------------------------------------------------------------------------
# A trained policy for sample.py eval
# ---------------------------------------------------------------------------------------------------------
def open_policy(spec: str, base, flag: str = "--checkpoints"):
    """A policy on `base` (drlhf.models.BaseModel) from a run folder (its latest checkpoint), a checkpoint folder or
    a diffusers folder (final_policy), checked now, before any work, and loaded when the returned function is called
    with a device. A run or checkpoint must come from base's root base model (what its state.pt recorded of its
    base, drlhf.models.check_fits); a diffusers folder is checked when it is loaded (with a lineage: the same root
    base model; without: only its kind). Anything else, or a misfit, is one line naming `flag`. LoRA checkpoints
    get their adapters re-injected and merged."""
    path = latest_checkpoint(Path(spec))
    if not (path / "policy.safetensors").exists():
        if path.is_dir() and any((path / name).exists() for name in RUN_FILES) and not (path / "model_index.json").exists():
            raise CheckpointError(f"{flag} {spec}: a run folder without checkpoints or final_policy yet (its run "
                                  "has not saved one); pass a checkpoint folder, or resume the run until it saves")
        if not (path.is_dir() and ((path / "model_index.json").exists() or (path / "config.json").exists())):
            raise FileNotFoundError(f"{flag} {spec}: not a run folder, checkpoint folder or diffusers folder")

        def load_pipeline(device) -> nn.Module:
            other = models.load_base_model(str(path), device, flag=flag)
            models.check_fits(models.identity(other), models.identity(base), f"{flag} {spec}",
                              same_base=bool(other.lineage))
            return other.net.eval()
        return load_pipeline
    try:  # memory-mapped: the optimizer states in it are not read
        saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{flag} {spec}: {path / 'state.pt'} is unreadable ({type(e).__name__}); pass another "
                              "checkpoint folder") from None
    run_args = saved["args"]  # a checkpoint written before runs recorded their base: its sampler family only
    recorded = saved["state"].get("base") or dict(source=run_args.get("pretrained"), flow=run_args.get("sampler") == "flow")
    models.check_fits(recorded, models.identity(base), f"{flag} {spec}")

    def load_checkpoint(device) -> nn.Module:
        net, weights = copy.deepcopy(base.net), load_file(path / "policy.safetensors")
        try:
            if weights and all("lora_" in k for k in weights):  # a --lora-rank run: re-inject its adapters, merge them
                models.add_lora(net, run_args["lora_rank"], run_args["lora_alpha"] or run_args["lora_rank"],
                                (run_args["lora_targets"] or base.family.lora_targets).split(","))
                net.load_state_dict(weights, strict=False)
                return models.merge_lora(net).to(device).eval()
            net.load_state_dict(weights)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{flag} {spec}: its policy does not fit the base model {base.source} "
                                  f"({str(e).splitlines()[0][:160]}); pass the --pretrained it was trained from") from None
        return net.to(device).eval()
    return load_checkpoint


def load_policy_net(spec: str, base, device, flag: str = "--checkpoints") -> nn.Module:
    """open_policy's policy, checked and loaded at once."""
    return open_policy(spec, base, flag)(device)


# ---------------------------------------------------------------------------------------------------------
# Lineage: the rounds of iterated RLHF behind a policy (sample -> label -> train_reward -> train_ppo, again)
# ---------------------------------------------------------------------------------------------------------
def start_lineage(base) -> dict:
    """The lineage a run continues: the loaded policy's own (a final_policy folder of an earlier run), or a new one
    rooted at this base model. The root's fingerprint lets a reward model trained on the root base model score any
    later round's policy (drlhf.reward_model.load_reward_model). Call before training changes base.net."""
    if base.lineage:
        return copy.deepcopy(base.lineage)
    return {"root": models.identity(base)["root"], "rounds": []}


def record_round(lineage: dict, run_dir: Path, args: dict, state: dict) -> dict:
    """The lineage of the policy this run wrote: the lineage it continued plus this run as the next round (which
    policy it started from, which reward and reward model, on which labeled datasets; a branch names the checkpoint
    it started from, and every resume the flags it changed)."""
    datasets, rm_config = None, Path(args.get("reward_model") or "") / "config.json"
    if args.get("reward_model") and rm_config.exists():
        config = json.loads(rm_config.read_text())
        datasets = config.get("datasets") or [config.get("dataset")]
    entry = {"round": len(lineage["rounds"]) + 1, "run": str(run_dir), "policy_from": args["pretrained"],
             "reward": args["reward"], "reward_model": args.get("reward_model"),
             "reward_model_datasets": datasets, "epochs": args["epochs"], "seed": args["seed"]}
    if state.get("branched_from"):
        entry["branched_from"] = state["branched_from"]
    if state.get("resumes"):
        entry["resumes"] = state["resumes"]
    return dict(lineage, rounds=lineage["rounds"] + [entry])


def write_lineage(policy_dir: Path, lineage: dict):
    write_json(Path(policy_dir) / models.LINEAGE_FILE, lineage)
