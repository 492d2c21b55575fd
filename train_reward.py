"""Train a reward model from ranked labeling tasks (thesis 5.2, step 3 of the method).

Each task is one batch element: its K images go through the reward model together and the loss is Eq. 5.1 over
all pairs its ranking implies, normalized per task. After training, the reward mean and std over the training
images are stored so that the model emits standardized rewards (Eq. 5.2).

Launch:
    python train_reward.py --dataset datasets/digits                       # offline: a digits labeling dataset
    python train_reward.py --exp pink --dataset datasets/pink --out rm/pink # Table 6.2 "Pink": batch 4 tasks, 40 epochs
    torchrun --nproc_per_node=4 train_reward.py --exp macaw --dataset datasets/macaw
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from drlhf.cli import Fraction, NonNegFloat, NonNegInt, OpenFraction, PosFloat, PosInt, Seed
from drlhf import cli, distributed, models, pictures, presets, speed, tracking
from drlhf.distributed import DeviceFlag, Precision, autocast
from drlhf.files import check_writable, hold_folder, move_aside
from drlhf.labels import dataset_fingerprint, dataset_meta, load_tasks as read_tasks, read_rankings
from drlhf.reward_model import ClassifierRewardModel, RewardModel
from drlhf.toys import TOY_TRAIN_STEPS


@dataclass
class Args:
    exp: str | None = None
    """preset: a Table 6.2 experiment or an offline stand-in (drlhf/presets.py; listed below)"""
    # --- the data in, the reward model out -------------------------------------------------------------------
    dataset: str = "datasets/digits"
    """labeling dataset folder (sample.py) holding the export of label.py; several (comma-separated, or a .txt file listing one per line) train on the union of their rankings: the rounds of iterated RLHF (thesis 8.1)"""
    rankings: str | None = None
    """rankings.jsonl from `label.py export` (default DATASET/rankings.jsonl; one dataset only)"""
    annotator: str | None = None
    """use the rankings of one annotator only (default: all; tasks ranked by several count once per annotator)"""
    pretrained: str | None = None
    """base model whose U-Net encoder is reused (default: the dataset's base model from dataset.json)"""
    out: str | None = None
    """reward-model folder to write (default runs/reward-<exp>); one that holds a reward model is refused"""
    replace_out: bool = False
    """move a reward model already in --out aside to OUT.old-N first, and train anew"""
    # --- training: Eq. 5.1 over the rankings (thesis 5.2) ----------------------------------------------------
    epochs: PosInt = 60
    """passes over the training tasks (thesis: 1000 for Macaw, 40 for Pink)"""
    batch_tasks: PosInt = 8
    """tasks per optimizer step over all processes (thesis: 8 for Macaw = 40 images, 4 for Pink = 32 images)"""
    lr: PosFloat = 1e-3
    """AdamW learning rate of the trainable parameters (thesis: 1e-4; offline default 1e-3)"""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay"""
    val_fraction: OpenFraction | None = None
    """hold out this share of tasks for validation, seeded (the thesis's preliminary 80/20 model: 0.2);
    None = use the export's train/val split; 0 = train on everything"""
    ties: Literal["exclude", "half"] = "exclude"
    """pairs inside a tie group: exclude (default) or half (trained toward 0.5)"""
    cond_drop: Fraction = 0.1
    """probability of dropping the condition in training, for classifier-free reward guidance (thesis 5.2)"""
    guidance: float = 1.0
    """reward guidance weight w stored with the model: r = r_u + w (r_c - r_u) (1 = plain conditional reward)"""
    # --- the reward model's architecture (thesis 5.2, 6.7, 8.1) ---------------------------------------------
    backbone: Literal["unet", "classifier"] = "unet"
    """unet: the base model's U-Net encoder + a cross-attention pooling head (thesis 5.2, Pink); classifier: OpenAI's noisy-image classifier + a linear layer to one scalar (thesis 6.7, Macaw; --classifier)"""
    classifier: str | None = None
    """--backbone classifier: guided-diffusion:/path/to/64x64_classifier.pt, or toy:digits-rgb (offline stand-in)"""
    standardize: bool = True
    """store the training-set reward mean and std so that the model emits standardized rewards (Eq. 5.2; the thesis's Macaw model was not standardized)"""
    trainable: Literal["head", "mid", "encoder"] = "head"
    """trainable parts: head (thesis: only the new head), mid (+ mid block; classifier: + middle block and attention pool) or encoder"""
    width: PosInt = 128
    """width of the cross-attention pooling head"""
    heads: PosInt = 4
    """attention heads of the pooling head"""
    ensemble: PosInt = 1
    """thesis 8.1: N heads on one shared encoder, each with its own init and bootstrap resample of the training
    tasks; train_ppo.py --ensemble-penalty scores mean - k x std over them (docs/design.md)"""
    # --- which epoch is kept ---------------------------------------------------------------------------------
    keep: Literal["best", "last"] = "best"
    """which epoch's model is saved: best (lowest validation loss, Eq. 5.1 on the validation tasks) or last; without a validation split the last epoch is kept"""
    patience: NonNegInt = 0
    """stop early after this many epochs without a lower validation loss (0: run all --epochs)"""
    # --- the run: seed, device, cache, speed ------------------------------------------------------------------
    seed: Seed = 0
    """seed of the split, the task order and the condition dropping"""
    precision: Precision = "fp32"
    """fp32, fp16 (autocast + GradScaler) or bf16 (autocast)"""
    device: DeviceFlag = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """cache of the offline toy models"""
    toy_train_steps: PosInt = TOY_TRAIN_STEPS
    """training steps of an offline toy base model on first use"""
    threads: PosInt | None = None
    """CPU threads, fixed for the run (None: $OMP_NUM_THREADS, else the usable cores; docs/performance.md)"""


# ---------------------------------------------------------------------------------------------------------
# Data: tasks as (K images in the model's input space, condition, pair matrices)
# ---------------------------------------------------------------------------------------------------------
def pair_matrices(ranking, both_bad, k: int):
    """(K, K) matrices: win[i, j] = 1 if image i is preferred to j; tie[i, j] = 1 for i != j in one tie group.
    Images flagged "both bad" rank below all the others (keeping their order among themselves)."""
    bad = set(both_bad)
    groups = [[i for i in g if i not in bad] for g in ranking]
    groups = [g for g in groups if g] + [[i for i in g if i in bad] for g in ranking if any(i in bad for i in g)]
    rank = {i: n for n, g in enumerate(groups) for i in g}
    if sorted(rank) != list(range(k)):
        raise ValueError(f"a ranking {ranking} does not cover images 0..{k - 1}")
    r = torch.tensor([rank[i] for i in range(k)])
    win = (r[:, None] < r[None, :]).float()
    tie = ((r[:, None] == r[None, :]) & ~torch.eye(k, dtype=torch.bool)).float()
    return win, tie


def dataset_list(args: Args) -> list[Path]:
    """--dataset: one folder, several comma-separated, or a .txt file listing one folder per line."""
    spec = args.dataset
    if spec.endswith(".txt"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"--dataset {spec}: no such list of dataset folders")
        names = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip() and line[0] != "#"]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--dataset {spec!r} names no dataset folder")
    if len(names) > 1 and args.rankings:
        raise ValueError("--rankings names one dataset's rankings; with several --dataset folders each reads its own "
                         "DATASET/rankings.jsonl")
    return [Path(n) for n in names]


def load_tasks(args: Args, base: models.BaseModel, device):
    """All ranked tasks of all datasets as tensors: inputs (N, K, C, H, W), conditions, win/tie matrices (N, K, K),
    splits. With several datasets a task's id becomes DATASET:TASK_ID."""
    datasets = dataset_list(args)
    inputs, conds, wins, ties, splits, ids, sources = [], [], [], [], [], [], []
    for d, dataset in enumerate(datasets):
        tasks = {t["task_id"]: t for t in read_tasks(dataset, check_images=False)}
        rankings_file = Path(args.rankings or dataset / "rankings.jsonl")
        rows = read_rankings(rankings_file, args.annotator)
        fingerprint = dataset_fingerprint(dataset)  # the dataset identity label.py writes into every ranking
        foreign = [r["task_id"] for r in rows if r.get("dataset", fingerprint) != fingerprint]
        if foreign:
            raise ValueError(f"{rankings_file} was exported from another labeling dataset than {dataset} (tasks "
                             f"{foreign[:5]}); pass the matching --dataset or --rankings")
        for row in rows:
            task = tasks.get(row["task_id"])
            if task is None:
                raise ValueError(f"rankings name task {row['task_id']}, which {dataset / 'tasks.jsonl'} does not have")
            inputs.append(task_inputs(task, dataset, base))
            try:
                win, tie = pair_matrices(row["ranking"], row.get("both_bad", []), len(task["images"]))
            except ValueError as e:
                raise ValueError(f"{rankings_file}: task {task['task_id']}: {e}") from None
            conds.append(task.get("class_label", task.get("prompt")))
            wins.append(win)
            ties.append(tie)
            splits.append(row.get("split", "train"))
            ids.append(task["task_id"] if len(datasets) == 1 else f"{dataset}:{task['task_id']}")
            sources.append(d)
    if len({x.shape for x in inputs}) != 1:
        raise ValueError("tasks have different numbers of images; train_reward.py needs one K for all datasets")
    if args.val_fraction is not None:  # a fresh seeded split by task id (the thesis's preliminary 80/20 model)
        order = sorted(set(ids))
        random.Random(args.seed).shuffle(order)
        val = set(order[:round(len(order) * args.val_fraction)])
        splits = ["val" if i in val else "train" for i in ids]
    if base.conditioning == "class":
        cond = torch.tensor(conds)
    elif base.conditioning == "text":
        prompts = sorted(set(conds))
        table = dict(zip(prompts, base.encode_prompts(prompts).cpu()))
        cond = torch.stack([table[p] for p in conds])
    else:
        cond = None
    return dict(x=torch.stack(inputs), cond=cond, win=torch.stack(wins), tie=torch.stack(ties),
                split=np.array(splits), ids=ids, source=np.array(sources))  # source: the task's --dataset index


def task_inputs(task: dict, dataset: Path, base: models.BaseModel) -> torch.Tensor:
    """A task's K images as the reward model's inputs (K, C, H, W): latents for latent models, else pixels in [-1, 1].
    A file that is missing, truncated or not an image is one line naming it."""
    from PIL import Image
    c, h, w = base.sample_shape
    damaged = (f"; the dataset {dataset} is damaged: restore the file, or drop task {task['task_id']} from its "
               "tasks.jsonl and rankings")
    if base.is_latent:
        from safetensors.torch import load_file
        if not task.get("latents"):
            raise ValueError(f"task {task['task_id']}: a latent base model needs the latents sample.py stores")
        latents = []
        for p in task["latents"]:
            try:
                latents.append(load_file(dataset / p)["latent"])
            except FileNotFoundError:
                raise FileNotFoundError(f"task {task['task_id']}: {dataset / p} is missing{damaged}") from None
            except Exception as e:  # noqa: BLE001 - safetensors reports a cut file in its own types
                raise ValueError(f"task {task['task_id']}: {dataset / p} is unreadable ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120]}){damaged}") from None
        return torch.stack(latents)
    arrays = []
    for p in task["images"]:
        try:
            with Image.open(dataset / p) as img:
                img = img.convert("L" if c == 1 else "RGB")  # decodes the whole file: a cut one fails here
        except FileNotFoundError:
            raise FileNotFoundError(f"task {task['task_id']}: image {dataset / p} is missing{damaged}") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"task {task['task_id']}: image {dataset / p} is unreadable ({e}){damaged}") from None
        if img.size != (w, h):
            raise ValueError(f"{dataset / p} is {img.size[0]}x{img.size[1]}, the base model takes {w}x{h}")
        arrays.append(np.asarray(img, dtype=np.float32).reshape(h, w, c))
    return (torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# METHOD: Eq. 5.1 over all pairs of each task
# ---------------------------------------------------------------------------------------------------------
def ranking_loss(rewards, win, tie, ties: str = "exclude", weights=None):
    """rewards (B, K); win/tie (B, K, K). Per task: the mean over its ordered pairs of -log sigmoid(r_w - r_l)
    (Eq. 5.1); with ties="half", tied pairs add the cross-entropy toward 0.5. Returns the mean over tasks
    (weighted by `weights` (B,), an ensemble head's bootstrap counts of the tasks)."""
    diff = rewards[:, :, None] - rewards[:, None, :]                 # (B, K, K) r_i - r_j
    loss = (win * F.softplus(-diff)).sum((1, 2))                     # -log sigmoid(r_w - r_l) = softplus(r_l - r_w)
    pairs = win.sum((1, 2))
    if ties == "half":  # each unordered tied pair appears twice (i, j) and (j, i): 0.5 (softplus(-d) + softplus(d))
        loss = loss + (tie * 0.5 * F.softplus(-diff)).sum((1, 2))
        pairs = pairs + tie.sum((1, 2)) / 2
    per_task = loss / pairs.clamp(min=1)
    return per_task.mean() if weights is None else (per_task * weights).sum() / weights.sum().clamp(min=1e-8)


def pair_accuracy(rewards, win):
    """Share of strictly ordered pairs that the rewards order the same way (ties in reward count half)."""
    diff = rewards[:, :, None] - rewards[:, None, :]
    correct = (win * ((diff > 0).float() + 0.5 * (diff == 0).float())).sum()
    return (correct / win.sum().clamp(min=1)).item()


@torch.no_grad()
def score(model, x, cond, device, args, chunk=64):
    """Raw rewards (N, K) of tasks x (N, K, C, H, W)."""
    n, k = x.shape[:2]
    flat, out = x.flatten(0, 1), []
    flat_cond = None if cond is None else cond.repeat_interleave(k, 0)
    for s in range(0, len(flat), chunk):
        c = None if flat_cond is None else flat_cond[s:s + chunk].to(device)
        with autocast(args.precision, device):
            out.append(model.raw(flat[s:s + chunk].to(device), None, c).float())
    return torch.cat(out).view(n, k, *out[0].shape[1:])  # (N, K), or (N, K, heads) for an ensemble


def strip_image(x, order, rewards):
    """(K, C, H, W) in [-1, 1] -> uint8 (H, K*(W+1), 3) in the given order (for TensorBoard)."""
    imgs = ((x[order].float().clamp(-1, 1) + 1) * 127.5).byte()
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    pad = torch.full((len(order), 3, imgs.shape[2], 1), 255, dtype=torch.uint8)
    return torch.cat([torch.cat([imgs, pad], 3)[i] for i in range(len(order))], 2).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def train_epoch(net, model, data: dict, train, args: Args, opt, scaler, g, rank: int, world: int, device) -> list:
    """One pass over the training tasks in a seeded random order, --batch-tasks tasks per optimizer step
    (split over the processes; each task is one batch element of K images). Returns the losses."""
    model.train()
    order = train[torch.randperm(len(train), generator=g).numpy()]
    if world > 1:  # every rank must take part in every optimizer step: drop the last incomplete batch
        order = order[:len(order) // args.batch_tasks * args.batch_tasks]
    per_rank, losses = args.batch_tasks // world, []
    for s in range(0, len(order), args.batch_tasks):
        idx = order[s:s + args.batch_tasks][rank * per_rank:(rank + 1) * per_rank]  # tasks are not shared
        if len(idx) == 0:
            continue
        x = data["x"][idx].to(device)                                   # (b, K, C, H, W)
        b, k = x.shape[:2]
        cond = None if data["cond"] is None else data["cond"][idx].to(device).repeat_interleave(k, 0)
        # classifier-free reward guidance: drop a task's condition for all its images with probability p
        drop = (torch.rand(b, generator=g) < args.cond_drop).repeat_interleave(k).to(device)
        with autocast(args.precision, device):
            r = net(x.flatten(0, 1), None, cond, standardize=False, drop=drop)  # through the DDP wrapper
            win, tie = data["win"][idx].to(device), data["tie"][idx].to(device)
            if r.ndim == 1:
                loss = ranking_loss(r.float().view(b, k), win, tie, args.ties)
            else:  # --ensemble: each head on its own bootstrap resample of the tasks (the sum: each head's own loss)
                loss = sum(ranking_loss(r[:, h].float().view(b, k), win, tie, args.ties, data["boot"][h][idx].to(device))
                           for h in range(r.shape[1]))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item() / args.ensemble)
    return losses


@torch.no_grad()
def validate(model, data: dict, val, args: Args, device) -> dict:
    """Eq. 5.1's loss and the pairwise accuracy of the validation tasks ({} without a validation split)."""
    if not len(val):
        return {}
    model.eval()
    rv = score(model, *subset(data, val), device, args)
    heads = [rv] if rv.ndim == 2 else rv.unbind(-1)  # an ensemble: the mean over its heads
    return {"val_loss": float(np.mean([ranking_loss(r, data["win"][val], data["tie"][val], args.ties).item()
                                       for r in heads])),
            "val_accuracy": float(np.mean([pair_accuracy(r, data["win"][val]) for r in heads]))}


class Keeper:
    """Which epoch's model is saved: with keep="best", the trainable parts at the lowest validation loss so far
    (a copy on the CPU); `patience` epochs without a new best stop the run. Prints one table row per epoch."""

    def __init__(self, keep: str, patience: int, epochs: int):
        self.keep, self.patience, self.every = keep, patience, max(1, epochs // 100)
        self.history, self.best, self.state = [], None, None

    def update(self, model, logs: dict, bar) -> bool:
        self.history.append(logs)
        improved = "val_loss" in logs and (self.best is None or logs["val_loss"] < self.best["val_loss"])
        if improved:
            self.best = logs
            if self.keep == "best":
                self.state = {k: v.clone() for k, v in model.trainable_state().items()}
        if len(self.history) == 1:
            bar.write("epoch  train loss  " + ("val loss  val accuracy" if "val_loss" in logs else "(no validation split: "
                                                                                               "the last epoch is kept)"))
        if improved or logs["epoch"] % self.every == 0:
            bar.write(f"{logs['epoch']:5d}  {logs['train_loss']:10.4f}" + (
                f"  {logs['val_loss']:8.4f}  {logs['val_accuracy']:12.3f}{'  *' if improved else ''}" if "val_loss" in logs
                else ""))
        return bool(self.patience and self.best is not None and logs["epoch"] - self.best["epoch"] >= self.patience)

    def restore(self, model):
        if self.state is not None:
            model.load_state_dict(self.state, strict=False)

    def kept(self) -> dict:
        """config.json's record of the choice: the epoch and its metrics, and why."""
        logs = self.best if self.keep == "best" and self.best is not None else self.history[-1]
        why = ("lowest validation loss" if self.keep == "best" and self.best is not None else
               "last epoch" + ("" if "val_loss" in logs else " (no validation split)"))
        return dict(kept_epoch=logs["epoch"], kept=why, epochs_run=len(self.history), history=self.history,
                    **{k: v for k, v in logs.items() if k.startswith("val_")})


def subset(data: dict, idx):
    """(inputs, conditions) of the tasks idx."""
    return data["x"][idx], None if data["cond"] is None else data["cond"][idx]


def build_model(args: Args, base: models.BaseModel, device):
    """The reward model of --backbone: the base U-Net's encoder + cross-attention pooling (thesis 5.2), or
    OpenAI's noisy-image classifier + a linear layer (thesis 6.7)."""
    if args.backbone == "classifier":
        if not args.classifier:
            raise cli.UserError("--backbone classifier needs --classifier guided-diffusion:/path/to/64x64_classifier.pt "
                             f"(OpenAI's, {models.GUIDED_URL.replace('64x64_diffusion', '64x64_classifier')}) or "
                             "toy:digits-rgb offline")
        clf = models.load_guided_classifier(args.classifier, args.cache_dir)
        return ClassifierRewardModel(clf, args.classifier, args.trainable, args.ensemble).to(device)
    null_text = base.encode_prompts([""]) if base.conditioning == "text" else None
    return RewardModel(base.net, base.conditioning, null_text, base.num_classes, args.width, args.heads,
                       args.trainable, args.ensemble).to(device)


def load_base(args: Args, given: set, device):
    """The base model whose U-Net the reward model reuses: --pretrained, or the datasets' base model (a toy with the
    datasets' --toy-train-steps unless given). A dataset sampled from a fine-tuned policy (iterated RLHF) counts as
    its root base model (the policy folder's lineage), so that every round's reward model is built on the same
    U-Net and scores every round's policy. The model is checked against what each dataset recorded of its base."""
    datasets, roots, metas = dataset_list(args), [], []
    for dataset in datasets:
        if not (dataset / "tasks.jsonl").exists():
            raise FileNotFoundError(f"--dataset {dataset}: no tasks.jsonl; create it with sample.py")
        metas.append(dataset_meta(dataset))
        roots.append(metas[-1].get("lineage", {}).get("root", {}).get("base_model", metas[-1].get("base_model")))
    if not args.pretrained and (None in roots or len(set(roots)) > 1):
        named = ", ".join(f"{d} ({r or 'no dataset.json naming it'})" for d, r in zip(datasets, roots))
        raise ValueError(f"--pretrained is needed: the datasets do not name one base model: {named}")
    pretrained = args.pretrained or roots[0]
    steps = args.toy_train_steps  # a toy: the steps the datasets were sampled with, unless given
    if "toy_train_steps" not in given and pretrained.startswith("toy:") and not metas[0].get("lineage"):
        steps = metas[0].get("args", {}).get("toy_train_steps", steps)
    base = models.load_base_model(pretrained, device, args.cache_dir, toy_train_steps=steps)
    if base.any_size and metas[0].get("sample_shape"):  # a transformer takes any size: the one the data was sampled at
        base.expect(resolution=metas[0]["sample_shape"][1] * 8)
    for dataset, meta in zip(datasets, metas):
        models.check_dataset_base(dataset, meta, base)
    return pretrained, base


def datasets_record(args: Args, data: dict) -> list[dict]:
    """What config.json says of each dataset: its folder, fingerprint, base model (the policy that sampled it),
    the RLHF round of that policy and how many ranked tasks it gave."""
    out = []
    for d, dataset in enumerate(dataset_list(args)):
        meta = dataset_meta(dataset)
        out.append(dict(path=str(dataset), fingerprint=dataset_fingerprint(dataset), base_model=meta.get("base_model"),
                        policy_round=len(meta.get("lineage", {}).get("rounds", [])),
                        ranked_tasks=int((data["source"] == d).sum())))
    return out


def save(model, out: Path, writer, args: Args, pretrained: str, base, data: dict, train, val, rt, device,
         minutes: float, keeper: Keeper):
    """Rank 0: validation strips and the standardized reward histogram in TensorBoard, then the folder
    (model.safetensors + config.json with the accuracies). rt: the raw rewards of the training tasks."""
    result = {"train_accuracy": pair_accuracy(rt, data["win"][train])} if rt.ndim == 2 else {
        "train_accuracy": float(np.mean([pair_accuracy(r, data["win"][train]) for r in rt.unbind(-1)])),
        "head_train_accuracy": [pair_accuracy(r, data["win"][train]) for r in rt.unbind(-1)]}
    if len(val):
        rv = score(model, *subset(data, val), device, args)
        result.update(validate(model, data, val, args, device), val_pairs=int(data["win"][val].sum()))
        if rv.ndim == 3:  # --ensemble: each head's accuracy; the strips below order by the heads' mean
            result["head_val_accuracy"] = [pair_accuracy(r, data["win"][val]) for r in rv.unbind(-1)]
            rv = rv.mean(-1)
        for n in range(min(4, len(val))):  # a few validation tasks: model order above human order
            human = sorted(range(rv.shape[1]), key=lambda i: -float(data["win"][val[n]][i].sum()))
            model_order = torch.argsort(rv[n], descending=True).tolist()
            x = data["x"][val[n]] if not base.is_latent else base.decode(data["x"][val[n]].to(device)).cpu()
            writer.add_image(f"val_task_{data['ids'][val[n]]}", np.concatenate(
                [strip_image(x, model_order, rv[n]), strip_image(x, human, rv[n])], 0), dataformats="HWC")
    writer.add_histogram("rewards/train_standardized", ((rt - rt.mean()) / rt.std()).flatten(), args.epochs)
    kept = keeper.kept()
    pictures.learning_curves_png(kept["history"], kept["kept_epoch"], out / "learning_curves.png")
    config = dict(base_model=pretrained, base_model_path=base.path, dataset=str(args.dataset), datasets=datasets_record(args, data),
                  guidance_weight=args.guidance,
                  input_shape=list(base.sample_shape), cond_drop=args.cond_drop, args=dataclasses.asdict(args),
                  minutes=minutes, **{k: v for k, v in kept.items() if not k.startswith("val_")}, **result)
    model.save(out, config)
    print(f"[drlhf] reward model of epoch {kept['kept_epoch']} ({kept['kept']}) saved to {out}: " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def claim_out(args: Args) -> Path:
    """The reward-model folder (--out), held by this process until it ends (drlhf.files.hold_folder); one that holds a
    reward model is refused unless --replace-out. Nothing is created before the model is trained."""
    out = Path(args.out or f"runs/reward-{args.exp or 'digits'}")
    hold_folder(out, "a reward model", "--out")
    if any((out / name).exists() for name in ("config.json", "model.safetensors")) and not args.replace_out:
        raise cli.UserError(f"--out {out} already holds a reward model: choose another --out, or pass --replace-out "
                            "to move it aside and train anew")
    check_writable(out, "--out")
    return out


def main(argv=None):
    args, given = cli.parse_args(Args, presets.for_script("train_reward"), argv)
    rank, world, device = distributed.setup_distributed(args.device)
    out = distributed.on_rank_0(lambda: claim_out(args))  # held by this process alone until it ends
    args = dataclasses.replace(args, threads=speed.setup_cpu(device, args.threads))
    torch.manual_seed(args.seed)
    pretrained, base = load_base(args, given, device)
    data = load_tasks(args, base, device)
    train, val = np.flatnonzero(data["split"] == "train"), np.flatnonzero(data["split"] == "val")
    if len(train) == 0:
        raise ValueError("no training tasks: check --val-fraction or the export's split")
    if args.batch_tasks % world:
        raise cli.UserError(f"--batch-tasks ({args.batch_tasks}) must be divisible by the number of processes ({world})")
    if world > 1 and len(train) < args.batch_tasks:
        raise cli.UserError(f"{len(train)} training tasks are fewer than --batch-tasks ({args.batch_tasks}) over {world} "
                         "processes")
    model = build_model(args, base, device)
    if args.ensemble > 1:  # bootstrap: each head draws len(train) training tasks with replacement (counts per task)
        gb = torch.Generator().manual_seed(args.seed + 1)
        data["boot"] = torch.zeros(args.ensemble, len(data["x"]))
        for h in range(args.ensemble):
            data["boot"][h].index_add_(0, torch.as_tensor(train)[torch.randint(len(train), (len(train),), generator=gb)],
                                       torch.ones(len(train)))
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    writer = None
    if rank == 0:
        if args.replace_out and out.exists():
            print(f"[drlhf] --replace-out: the reward model that was in {out} is now in {move_aside(out)}")
        writer = tracking.open_run(out, args, args_json=False)  # the args are in config.json
        print(f"[drlhf] reward model on {pretrained} ({base.conditioning}), {len(train)} training and {len(val)} "
              f"validation tasks of K = {data['x'].shape[1]}; {sum(p.numel() for p in params):,} trainable "
              f"parameters ({args.trainable})")
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.epochs), desc="reward model", unit="epoch", disable=rank != 0)
    t0 = time.perf_counter()
    keeper = Keeper(args.keep if len(val) else "last", args.patience, args.epochs)
    for epoch in bar:
        losses = train_epoch(net, model, data, train, args, opt, scaler, g, rank, world, device)
        stop = False
        if rank == 0:  # VALIDATION: loss and pairwise accuracy on the held-out tasks, every epoch
            logs = dict(epoch=epoch + 1, train_loss=float(np.mean(losses)), **validate(model, data, val, args, device))
            for k, v in logs.items():
                if k != "epoch":
                    writer.add_scalar(("losses/" if k == "train_loss" else "eval/") + k, v, epoch)
            stop = keeper.update(model, logs, bar)
        if distributed.broadcast_object(stop):  # early stopping: every rank leaves together
            break
    if rank == 0:  # the kept epoch's model, standardized over the training images (Eq. 5.2), and its folder
        keeper.restore(model)
        rt = score(model, *subset(data, train), device, args)
        if args.standardize and model.ensemble == 1:
            model.reward_mean.fill_(rt.mean().item())
            model.reward_std.fill_(rt.std().item())
        elif args.standardize:  # each head over the training images: (N,)
            model.reward_mean.copy_(rt.flatten(0, 1).mean(0))
            model.reward_std.copy_(rt.flatten(0, 1).std(0))
        save(model, out, writer, args, pretrained, base, data, train, val, rt, device, (time.perf_counter() - t0) / 60,
             keeper)
        writer.close()
    distributed.cleanup_distributed()


if __name__ == "__main__":
    cli.run(main)  # bad input: one line and exit code 1 (drlhf.cli.UserError and its kin)
