"""Curate a labeling dataset from a base diffusion model (thesis chapter 4, step 1 of the method).

N tasks of K images; each task is one prompt or class drawn from a list, sampled with the same sampler settings
as the PPO rollout (steps, CFG scale, resolution), deterministic from --seed, resumable: re-running the same
command finishes an interrupted dataset without redoing or duplicating tasks.

Launch:
    python sample.py                                     # offline: 40 tasks of K=5 "4"s from toy:digit4
    python sample.py eval --checkpoints runs/digits-target --reward target   # base vs policy: grids, histograms
    python sample.py --exp digits-rgb                    # offline: class-conditional colour digits
    python sample.py --exp pink --out datasets/pink      # Table 6.5 prompts, 120 tasks of K=8, 16 steps, CFG 7.5
    python sample.py --exp macaw --pretrained DIR        # class 88, 200 tasks of K=5, 25 steps
    python sample.py --pretrained runs/digits-target/final_policy --out datasets/round2   # iterated RLHF's next round

The dataset folder (read by label.py and train_reward.py; contract: drlhf/labels.py and the README):
    dataset.json      base model (and the rounds of RLHF behind it), sampler settings, K, seed, batch size, ...
    tasks.jsonl       {"task_id", "prompt" | "class_label", "images": [K paths], "latents": [K paths] | null, "seeds": [K]}
    images/*.png      the images (8-bit, RGB or greyscale)
    latents/*.safetensors  the finished latents of latent models ({"latent": (C, h, w) float32})
    instructions.md   the labeling instructions shown by label.py
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drlhf.cli import NonNegFloat, PosInt, Seed
from drlhf import cli, comparison, evaluation, models, presets, rewards
from drlhf.checkpoint import load_policy_net, open_policy
from drlhf.distributed import DeviceFlag, Precision, autocast, resolve_device
from drlhf.files import (atomic_write, check_writable, hold_folder, make_dir, save_safetensors, write_json,
                         write_text)
from drlhf.speed import setup_cpu
from drlhf.prompts import check_condition_flags, class_list, prompt_list, prompt_table
from drlhf.sampler import Sampler, Spacing, VarianceType, rollout, schedule_for_model
from drlhf.toys import TOY_SAMPLING_STEPS, TOY_TRAIN_STEPS

VERSION = "0.1"
BUILTIN_INSTRUCTIONS = {
    # thesis Table 6.3 (Macaw) and Table 6.6 (Pink; {animal} is the animal of the task's prompt)
    "macaw": ["Always prefer images with a macaw over images without a macaw.",
              "Of the images with a macaw, prefer the image with the highest perceived fidelity.",
              "Rank the images in order of what you would most prefer as output from the model."],
    "pink": ["Always prefer images with {animal} wearing pink sunglasses over images with {animal} not wearing pink "
             "sunglasses.",
             "Always prefer images with just {animal} over images without {animal}.",
             "Always prefer images with just sunglasses over images without {animal} or sunglasses.",
             "Within these categories, always prefer images with pink sunglasses over images with sunglasses in other "
             "colors.",
             "Within these categories, rank the images in order of what you would most prefer as output from the model."],
    # a blind comparison (--compare): nothing says which model made which image
    "compare": ["Each task shows two images made for the same prompt or class: prefer the one you would rather get.",
                "Press t (tie) only when you truly cannot prefer one image over the other.",
                "Flag both as bad when neither is an acceptable image."],
    "digits": ["Prefer the image that looks most like a clean, well-formed digit of the task's class.",
               "Between equally good digits, prefer the bolder, more confident stroke.",
               "Press t (tie) only when you truly cannot prefer one image over the other."],
}


@dataclass
class Args:
    exp: str | None = None
    """preset: a Table 6.2 experiment or an offline stand-in (drlhf/presets.py; listed below)"""
    # --- the dataset: model, tasks, conditions (thesis chapter 4) ---------------------------------------------
    out: str | None = None
    """dataset folder to create or finish (default datasets/<exp>)"""
    pretrained: str = "toy:digit4"
    """base model: diffusers folder, hub id or toy:digit4 / toy:digit4-32 / toy:digits-rgb (as in train_ppo.py)"""
    num_tasks: PosInt = 40
    """tasks N (thesis: 200 for Macaw, 120 for Pink)"""
    k: int = 5
    """images per task K (thesis: 5 for Macaw, 8 for Pink)"""
    prompts: str | None = None
    """text models: a .txt/.jsonl/.csv/.parquet prompt file, or builtin:pink (Table 6.5) / builtin:pickscore-eval (appendix D)"""
    class_labels: str | None = None
    """class models: comma-separated classes to draw tasks from (None = all; Macaw: 88)"""
    compare: str | None = None
    """blind comparison (thesis 8.1): a second model (diffusers folder, hub id, toy, run or checkpoint folder); each
    task holds one image of --pretrained and one of it, same condition and seeds, sides shuffled (docs/labeler.md)"""
    instructions: str | None = "builtin:digits"
    """labeling instructions for label.py: a Markdown file or builtin:macaw / pink / digits / compare (--compare's)"""
    # --- the sampler: the PPO rollout's settings (Table 6.2, thesis 5.1) -----------------------------------
    num_steps: PosInt = TOY_SAMPLING_STEPS
    """denoising steps (Table 6.2 "Timesteps"; the PPO rollout must use the same; offline default 10, as train_ppo.py's)"""
    guidance_scale: NonNegFloat = 1.0
    """classifier-free guidance scale (Table 6.2 "CFG Scale")"""
    resolution: PosInt | None = None
    """image size in pixels (Table 6.2 "Resolution"); None = the model's own; transformers (SD3) take other sizes"""
    sampler: Sampler | None = None
    """ddpm, ddim, or flow for rectified-flow models (as in train_ppo.py); None = the model's own"""
    spacing: Spacing = "leading"
    """respacing of the training timesteps (as in train_ppo.py)"""
    eta: NonNegFloat = 1.0
    """DDIM's eta, or the flow SDE's noise level (as in train_ppo.py)"""
    variance_type: VarianceType | None = None
    """fixed_small, fixed_large or learned_range (None = the model's scheduler config)"""
    # --- the run: seed, device, cache, speed ------------------------------------------------------------------
    seed: Seed = 0
    """seed of the task conditions and of every image"""
    batch_size: PosInt = 40
    """images per forward pass, rounded down to whole tasks; fixed for a dataset (stored in dataset.json)"""
    precision: Precision = "fp32"
    """fp32, fp16 or bf16 autocast for sampling"""
    device: DeviceFlag = "auto"
    """auto, cpu or cuda"""
    threads: PosInt | None = None
    """CPU threads, fixed for the run (None = $OMP_NUM_THREADS, or the usable cores / local processes); the numbers
    depend on it (docs/performance.md)"""
    cache_dir: str | None = None
    """cache of the offline toy models (default $DRLHF_CACHE or ~/.cache/drlhf)"""
    toy_train_steps: PosInt = TOY_TRAIN_STEPS
    """training steps of an offline toy base model on first use"""


# settings that must not change when an interrupted dataset is finished
FIXED = ("pretrained", "compare", "num_tasks", "k", "prompts", "class_labels", "num_steps", "guidance_scale", "sampler", "spacing",
         "eta", "variance_type", "seed", "batch_size")


def read_instructions(spec: str | None) -> str:
    if spec is None:
        return ""
    if spec.startswith("builtin:"):
        if spec[8:] not in BUILTIN_INSTRUCTIONS:
            raise ValueError(f"--instructions {spec}: built-in sets are "
                             + ", ".join(f"builtin:{k}" for k in BUILTIN_INSTRUCTIONS))
        return "# Labeling instructions\n\n" + "\n".join(f"{i}. {line}" for i, line in
                                                         enumerate(BUILTIN_INSTRUCTIONS[spec[8:]], 1)) + "\n"
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--instructions {spec}: no such file")
    return path.read_text()


def task_conditions(args: Args, base: models.BaseModel) -> list[dict]:
    """The condition of every task: each prompt/class equally often (as far as N allows), in a seeded order."""
    check_condition_flags(base.conditioning, args.pretrained, args.prompts, args.class_labels, base.num_classes)
    if base.conditioning == "text":
        items = [{"prompt": p} for p in prompt_list(args.prompts)]
    elif base.conditioning == "class":
        items = [{"class_label": c} for c in class_list(args.class_labels, base.num_classes)]
    else:
        items = [{}]
    order = torch.randperm(args.num_tasks, generator=torch.Generator().manual_seed(args.seed))
    return [items[i % len(items)] for i in order.tolist()]


def to_png(image: torch.Tensor, path: Path):
    """(C, H, W) in [-1, 1] -> 8-bit PNG, written atomically."""
    from PIL import Image
    x = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    img = Image.fromarray(x[0]) if x.shape[0] == 1 else Image.fromarray(np.moveaxis(x, 0, -1))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_done(tasks_file: Path) -> list[dict]:
    """Finished tasks; a last line cut off by a crash is dropped (its task is sampled again)."""
    if not tasks_file.exists():
        return []
    lines = tasks_file.read_text().split("\n")
    done = []
    for line in lines:
        if not line.strip():
            continue
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(done) != len([ln for ln in lines if ln.strip()]):  # rewrite without the broken tail
        write_text(tasks_file, "".join(json.dumps(t) + "\n" for t in done))
    return done


def resolve_args(argv=None) -> tuple[Args, Path]:
    """The flags, or for an interrupted dataset its stored settings (conflicting flags are an error)."""
    args, given = cli.parse_args(Args, presets.for_script("sample"), argv)
    if args.k < 2 or (args.compare and args.k != 2):
        raise cli.UserError(f"--k {args.k}: a task needs at least 2 images to compare (--compare: exactly 2)")
    out = Path(args.out or f"datasets/{args.exp or 'digits'}")
    hold_folder(out, "a labeling dataset", "--out")  # one process per dataset folder, until this one ends
    if (out / "dataset.json").exists():
        stored = json.loads((out / "dataset.json").read_text())["args"]
        clash = [k for k in FIXED if k in given and getattr(args, k) != stored[k]]
        if clash:
            raise cli.UserError(f"{out} was started with other settings ({', '.join('--' + k.replace('_', '-') + '=' + str(stored[k]) for k in clash)}); "
                             "finish it with those or choose another --out")
        kept = ("device", "precision", "cache_dir", "out") + (("threads",) if "threads" in given else ())
        args = Args(**{**stored, **{k: getattr(args, k) for k in kept}})  # an interrupted dataset keeps its threads
    return args, out


def save_task(out: Path, i: int, condition: dict, images, samples, seeds: list, latent: bool) -> dict:
    """Write one task's K images (and latents), atomically each; returns its tasks.jsonl record."""
    record = {"task_id": i, **condition, "images": [], "latents": [] if latent else None, "seeds": seeds}
    for j in range(len(seeds)):
        name = f"task_{i:05d}_{j}"
        to_png(images[j], out / "images" / f"{name}.png")
        record["images"].append(f"images/{name}.png")
        if latent:
            save_safetensors({"latent": samples[j].float()}, out / "latents" / f"{name}.safetensors")
            record["latents"].append(f"latents/{name}.safetensors")
    return record


def check_same_model(out: Path, meta: dict, base: models.BaseModel):
    """An interrupted dataset is finished by the model that started it: the same fingerprint as dataset.json's (a
    model folder whose weights changed since is refused, naming both)."""
    want, have = meta.get("base_fingerprint"), models.identity(base)["fingerprint"]
    if want and have and want != have:
        raise cli.UserError(f"{out} was started from {meta.get('base_model')} with fingerprint {want}; --pretrained "
                            f"{base.source} now has fingerprint {have} (its weights changed since): finishing would "
                            "mix two models. Restore those weights, or sample a new dataset with another --out")


def compared_model(args: Args, base: models.BaseModel, device) -> models.BaseModel:
    """--compare: model B of a blind comparison, of the same kind as --pretrained (sampler family, conditioning,
    samples); a run or checkpoint folder gets --pretrained's architecture and must come from its base model."""
    spec = args.compare
    if Path(spec).is_dir() and not any((Path(spec) / f).exists() for f in ("model_index.json", "config.json")):
        return dataclasses.replace(base, net=load_policy_net(spec, base, device, "--compare"))
    other = models.load_base_model(spec, device, args.cache_dir, toy_train_steps=args.toy_train_steps, flag="--compare")
    other.expect(resolution=args.resolution)
    models.check_fits(models.identity(other), models.identity(base), f"--compare {spec}", same_base=False)
    return other


def start_dataset(out: Path, args: Args, base: models.BaseModel, schedule):
    """The files a new dataset folder gets once: instructions.md, for a comparison its key (which image of each task
    is which model: never shown by label.py), and dataset.json last (base model and the rounds of RLHF behind it,
    sampler settings, K, seed, the flags), so that a folder with dataset.json is a started dataset."""
    res = base.sample_shape[1] * (8 if base.is_latent else 1)
    meta = dict(tool=f"drlhf sample.py {VERSION}", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                base_model=args.pretrained, base_model_path=base.path,
                base_fingerprint=models.identity(base)["fingerprint"],
                sample_shape=list(base.sample_shape), conditioning=base.conditioning,
                latent=base.is_latent, resolution=res, k=args.k, num_tasks=args.num_tasks, seed=args.seed,
                sampler=dict(dataclasses.asdict(schedule.cfg), timesteps=schedule.timesteps.tolist()),
                instructions="instructions.md", args=dataclasses.asdict(args),
                **({"lineage": base.lineage} if base.lineage else {}))  # a fine-tuned policy: the rounds behind it
    default = args.compare and args.instructions == Args.instructions  # a comparison's own instructions
    write_text(out / "instructions.md", read_instructions("builtin:compare" if default else args.instructions))
    if args.compare:
        comparison.write_key(out, args.pretrained, args.compare, args.num_tasks, args.seed)
    write_json(out / "dataset.json", meta)


def main(argv=None):
    args, out = resolve_args(argv)
    meta_file = out / "dataset.json"
    device = resolve_device(args.device)
    args = dataclasses.replace(args, threads=setup_cpu(device, args.threads))  # kept with the data
    base = models.load_base_model(args.pretrained, device, args.cache_dir, toy_train_steps=args.toy_train_steps)
    base.expect(resolution=args.resolution)
    conditions = task_conditions(args, base)
    schedule = schedule_for_model(base.scheduler_config, base.is_latent, args.sampler, args.num_steps,
                                  args.spacing, args.eta, args.variance_type, args.guidance_scale,
                                  flow_timesteps=base.flow_timesteps(args.num_steps))
    args = dataclasses.replace(args, sampler=schedule.cfg.sampler)  # --sampler's default: the model's own, recorded
    if meta_file.exists():  # finishing a dataset: from the very model that started it
        check_same_model(out, json.loads(meta_file.read_text()), base)
    policy = models.make_denoiser(base, args.guidance_scale).eval()
    other = compared_model(args, base, device) if args.compare else None  # model B of a blind comparison
    if other is not None:  # B's own scheduler (a model of the same kind may space its noise otherwise)
        other_schedule = schedule_for_model(other.scheduler_config, other.is_latent, args.sampler, args.num_steps,
                                            args.spacing, args.eta, args.variance_type, args.guidance_scale,
                                            flow_timesteps=other.flow_timesteps(args.num_steps))
    prompt_embeds, other_embeds = {}, {}
    if base.conditioning == "text":  # one text-encoder pass per distinct prompt (and for B: its own text encoder)
        distinct = sorted({c["prompt"] for c in conditions})
        prompt_embeds = dict(zip(distinct, base.encode_prompts(distinct)))
        other_embeds = dict(zip(distinct, other.encode_prompts(distinct))) if other is not None else {}

    make_dir(out / "images", "--out")
    if base.is_latent:
        make_dir(out / "latents", "--out")
    if not meta_file.exists():
        start_dataset(out, args, base, schedule)
    sides = comparison.read_key(out, args.num_tasks)["sides"] if other is not None else None

    # SAMPLING: whole tasks per batch; batch b always holds the same tasks, so its images do not depend on
    # where an earlier run stopped
    tasks_file = out / "tasks.jsonl"
    done = {t["task_id"] for t in read_done(tasks_file)}
    per_batch = max(1, args.batch_size // args.k)
    from tqdm.auto import tqdm
    bar = tqdm(total=args.num_tasks, initial=len(done), desc=f"sampling {out}", unit="task")
    with open(tasks_file, "a") as log:
        for first in range(0, args.num_tasks, per_batch):
            ids = [i for i in range(first, min(first + per_batch, args.num_tasks))]
            if all(i in done for i in ids):
                continue
            draws = 1 if other else args.k  # a blind pair: one seed, drawn by both models
            seeds = [[args.seed * 1_000_003 + i * args.k + j for j in range(draws)] for i in ids]
            x_T = torch.stack([torch.randn(base.sample_shape, generator=torch.Generator().manual_seed(s))
                               for row in seeds for s in row]).to(device)  # (n*draws, C, H, W), one seed per image
            cond = cond_b = None  # cond_b: B's (--compare)
            if base.conditioning == "class":
                cond = cond_b = torch.tensor([conditions[i]["class_label"] for i in ids for _ in range(draws)],
                                             device=device)
            elif base.conditioning == "text":
                cond, cond_b = (torch.stack([table[conditions[i]["prompt"]] for i in ids for _ in range(draws)])
                                if table else None for table in (prompt_embeds, other_embeds))
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + first)
            with autocast(args.precision, device):
                samples = rollout(policy, schedule, x_T, cond, generator=g).samples
            images = base.decode(samples)
            if other is not None:  # a blind pair: both models from the same noise, sides as the key says
                samples, images = comparison.pair_up(samples, images, other, other_schedule, x_T, cond_b,
                                                     g.initial_seed(), [sides[i] for i in ids], args.precision,
                                                     args.guidance_scale)
                seeds = [row * 2 for row in seeds]
            for n, i in enumerate(ids):
                if i in done:
                    continue
                k = slice(n * args.k, (n + 1) * args.k)
                record = save_task(out, i, conditions[i], images[k], samples[k], seeds[n], base.is_latent)
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())  # a task line is written only after its images, and is durable
                bar.update(1)
    bar.close()
    print(f"[drlhf] {out}: {args.num_tasks} tasks of {args.k} images ({base.conditioning}-conditioned, "
          f"{args.num_steps} steps)")


# ---------------------------------------------------------------------------------------------------------
# sample.py eval: same-seed pictures of the base model next to optimized policies (thesis chapter 6)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EvalArgs:
    # --- the models: the base and the policies beside it ------------------------------------------------------
    pretrained: str = "toy:digit4"
    """the base model (as in train_ppo.py)"""
    checkpoints: str = ""
    """comma-separated policies to compare with the base: train_ppo.py run folders (their latest checkpoint),
    checkpoint folders (policy.safetensors) or diffusers folders (final_policy)"""
    out: str = "runs/eval"
    """folder for comparison.png, progression.png, histogram_*.png and scores.json"""
    # --- the samples: conditions and the sampler (as in train_ppo.py) --------------------------------------------
    num_samples: PosInt = 64
    """fixed-seed samples per model (conditions cycle through the prompt/class list)"""
    prompts: str | None = None
    """text models: a prompt file or builtin:pink / pink-colors / pink-no-sunglasses / pickscore-eval (appendix C, D)"""
    class_labels: str | None = None
    """class models: comma-separated classes to cycle through (None = all)"""
    num_steps: PosInt = TOY_SAMPLING_STEPS
    """denoising steps (offline default 10, as train_ppo.py's; the thesis's figures: 250 for the small models, 25 for Stable Diffusion)"""
    guidance_scale: NonNegFloat = 1.0
    """classifier-free guidance scale"""
    resolution: PosInt | None = None
    """image size in pixels; None = the model's own (as in sample.py)"""
    sampler: Sampler | None = None
    """ddpm, ddim or flow (as in train_ppo.py); None = the model's own"""
    spacing: Spacing = "leading"
    """respacing of the training timesteps"""
    eta: NonNegFloat = 1.0
    """DDIM's eta, or the flow SDE's noise level (as in train_ppo.py)"""
    variance_type: VarianceType | None = None
    """fixed_small, fixed_large or learned_range (None = the model's scheduler config)"""
    # --- the scores ----------------------------------------------------------------------------------------------
    reward: str | None = None
    """score every sample: target, colorfulness, aesthetic, pickscore, rm (with --reward-model) or module:function"""
    reward_model: str | None = None
    """--reward rm: the reward-model folder"""
    heldout_reward_model: str | None = None
    """a second reward model never optimized against, as an over-optimization check"""
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    """--reward pickscore: the CLIP preference model"""
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """--reward pickscore: its processor"""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """--reward aesthetic: the CLIP image encoder of the LAION Aesthetics Predictor V2 (thesis 6.6)"""
    aesthetic_mlp: str = rewards.AESTHETIC_MLP_URL
    """--reward aesthetic: the predictor's MLP weights (path or URL)"""
    # --- the run: seed, device, cache, speed ------------------------------------------------------------------
    seed: Seed = 0
    """seed of the initial noise and of every sampling step (the same for every model)"""
    batch_size: PosInt = 64
    """samples per forward pass"""
    precision: Precision = "fp32"
    """fp32, fp16 or bf16 autocast"""
    device: DeviceFlag = "auto"
    """auto, cpu or cuda"""
    threads: PosInt | None = None
    """CPU threads, fixed for the run (None = $OMP_NUM_THREADS, or the usable cores / local processes); the numbers
    depend on it (docs/performance.md)"""
    cache_dir: str | None = None
    """cache of the offline toy models"""
    toy_train_steps: PosInt = TOY_TRAIN_STEPS
    """training steps of an offline toy base model on first use"""


def model_names(specs: list[str]) -> list[str]:
    """A name per policy for scores.json and the file names: the folder's name, with as many parent folders as
    tell two policies apart (runs/a/final_policy and runs/b/final_policy: a/final_policy, b/final_policy)."""
    parts = [Path(s).resolve().parts[1:] for s in specs]
    for depth in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) and "base" not in names:  # "base" names the base model
            return names
    return [f"{Path(s).name}#{i + 1}" for i, s in enumerate(specs)]  # the same folder given twice


def eval_main(argv=None):
    from drlhf import pictures
    parser = cli.build_parser(EvalArgs)
    parser.prog, parser.description = "sample.py eval", "Same-seed pictures and scores of the base model next to policies."
    args = EvalArgs(**vars(parser.parse_args(argv)))
    cli.check_ranges(args)
    device = resolve_device(args.device)
    setup_cpu(device, args.threads)
    out = Path(args.out)
    hold_folder(out, "an evaluation", "--out")  # one process per output folder, until this one ends
    check_writable(out, "--out")  # before any work: a folder that cannot be written is one sentence (made at the end)
    base = models.load_base_model(args.pretrained, device, args.cache_dir, toy_train_steps=args.toy_train_steps)
    base.expect(resolution=args.resolution)
    check_condition_flags(base.conditioning, args.pretrained, args.prompts, args.class_labels, base.num_classes)
    schedule = schedule_for_model(base.scheduler_config, base.is_latent, args.sampler, args.num_steps,
                                  args.spacing, args.eta, args.variance_type, args.guidance_scale,
                                  flow_timesteps=base.flow_timesteps(args.num_steps))
    n = args.num_samples
    cond, prompts = None, None  # the same conditions, seeds and step noise for every model
    if base.conditioning == "class":
        classes = class_list(args.class_labels, base.num_classes)
        cond = torch.tensor([classes[i % len(classes)] for i in range(n)], device=device)
    elif base.conditioning == "text":
        plist, embeds = prompt_table(args.prompts, base)  # a long prompt file: only the rows drawn get encoded
        rows = torch.arange(n) % len(plist)
        prompts, cond = [plist[i] for i in rows.tolist()], embeds[rows].to(device)
    x_T = torch.stack([torch.randn(base.sample_shape, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i))
                       for i in range(n)]).to(device)
    specs = [c for c in args.checkpoints.split(",") if c]
    names = ["base"] + model_names(specs)
    policies = [lambda device: base.net] + [open_policy(s, base) for s in specs]  # checked now, loaded in turn
    scorers = {}
    if args.reward:
        scorers["reward"] = rewards.from_flags(args.reward, base, device, args)
    if args.heldout_reward_model:
        scorers["heldout"] = rewards.build("rm", base, device, args.heldout_reward_model, cache_dir=args.cache_dir,
                                           flag="--heldout-reward-model")
    from tqdm.auto import tqdm
    images, scores, variety = [], {k: [] for k in scorers}, {}
    diversity = evaluation.Diversity(base)  # the base model's encoder; the base model's samples are the reference
    groups = prompts or (cond.tolist() if cond is not None else [None] * n)
    for name, load in tqdm(list(zip(names, policies)), desc="sampling models", unit="model"):
        policy = models.make_denoiser(dataclasses.replace(base, net=load(device)), args.guidance_scale).eval()
        outs = []
        for s in range(0, n, args.batch_size):
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + s)
            c = None if cond is None else cond[s:s + args.batch_size]
            with autocast(args.precision, device):
                samples = rollout(policy, schedule, x_T[s:s + args.batch_size], c, generator=g).samples
            outs.append(samples)
            for k, fn in scorers.items():
                p = None if prompts is None else prompts[s:s + args.batch_size]
                with torch.no_grad():
                    scores[k].append(torch.as_tensor(fn(samples, c, p)).float().flatten().cpu())
        samples = torch.cat(outs)
        images.append(base.decode(samples).cpu())
        variety[name] = diversity(samples, groups)
    cols = min(n, 8)
    # rows = models, columns = seeds (the same seeds in every row)
    pictures.save_png(pictures.image_grid(torch.cat([im[:cols] for im in images]), nrow=cols), out / "comparison.png")
    # rows = seeds, columns = models in the given order (optimization progression)
    prog = torch.stack([im[:cols] for im in images], 1).flatten(0, 1)
    pictures.save_png(pictures.image_grid(prog, nrow=len(images)), out / "progression.png")
    summary = {"models": names, "prompts": prompts[:cols] if prompts else None, "diversity": variety}
    for k, vals in scores.items():
        per_model = [torch.cat(vals[m * len(vals) // len(names):(m + 1) * len(vals) // len(names)])
                     for m in range(len(names))]
        b = per_model[0]
        summary[k] = {name: evaluation.score_stats(b, v) for name, v in zip(names, per_model)}
        for name, v in zip(names[1:], per_model[1:]):
            pictures.histogram_png(b.numpy(), v.numpy(), out / f"histogram_{k}_{name.replace('/', '-')}.png")
    write_json(out / "scores.json", summary)
    print(f"[drlhf] {out}: comparison.png, progression.png, scores.json" + (", histograms" if scores else ""))
    print("  diversity (Vendi score per condition): " + ", ".join(f"{m} {v:.2f}" for m, v in variety.items()))
    for k in scores:
        print(f"  {k}: " + ", ".join(f"{m} {v['mean']:.4f} ({v['gain_in_base_std']:+.2f} base std)"
                                    for m, v in summary[k].items()))


if __name__ == "__main__":
    # bad input: one line and exit code 1 (drlhf.cli.UserError and its kin)
    cli.run(lambda: eval_main(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else main())
