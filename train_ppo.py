"""PPO fine-tuning of a diffusion model against a reward (thesis chapter 5.3, Table 6.2).

One epoch = one batched rollout of all environments through the reverse process (the MDP of thesis 5.1),
a terminal reward plus a per-step k3 KL penalty to the frozen base model, GAE over the denoising steps,
then one pass over all states in random minibatches with the clipped PPO objective.

Launch:
    python train_ppo.py                                   # offline default: toy "4"s, target-image reward, CPU
    python train_ppo.py --exp digits-colorfulness         # offline class-conditional colour digits
    python train_ppo.py --exp target --epochs 3000        # Table 6.2 "Target Image" values, 32x32 toy base
    torchrun --nproc_per_node=2 train_ppo.py --device cpu # 2 CPU processes (gloo)
    torchrun --nproc_per_node=10 train_ppo.py --exp pink  # Table 6.2 "Pink": 8 environments per GPU, 80 in all
    python train_ppo.py --resume runs/digits-target       # continue exactly where the last checkpoint stopped
    python train_ppo.py --exp macaw-norl --reward-model runs/reward-macaw   # Table 6.2 "Macaw: Without RL" (--algo backprop)
    python train_ppo.py --exp pink --reward-model DIR --gradient-checkpointing --lora-rank 8   # one small GPU

With --algo backprop (thesis 6.8) an epoch is instead: sample every environment through the whole chain with
gradients, loss = -reward of the frozen reward model, gradients accumulated over the epoch's minibatches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from drlhf import cli, models, pictures, rewards
from drlhf.prompts import read_prompts
from drlhf.reward_model import RewardModelError
from drlhf.sampler import DiffusionSchedule, ReparameterizedChain, action_logprob, rollout


@dataclass
class Args:
    exp: str | None = None
    """preset: one Table 6.2 column (target, colorfulness, aesthetic, macaw, macaw-norl, pink, pickscore) or an offline stand-in (digits-target, digits-colorfulness, digits-aesthetic, digits-macaw, digits-macaw-norl); flags given on the command line override it"""
    seed: int = 0
    """base seed; rank r samples with seed + r"""
    # --- diffusion (Table 6.2, "Diffusion") ---
    pretrained: str = "toy:digit4"
    """Table 6.2 "Base Policy": diffusers folder, hub id, or toy:digit4 / toy:digit4-32 / toy:digits-rgb (offline, trained on first use)"""
    resolution: int | None = None
    """Table 6.2 "Resolution" of the images in pixels; checked against the base model (None = the model's)"""
    conditioning: str | None = None
    """Table 6.2 "Cond. Type": none, class or text; checked against the base model (None = the model's)"""
    latent: bool | None = None
    """Table 6.2 "Latent Diff."; checked against the base model (None = the model's)"""
    guidance_scale: float = 1.0
    """Table 6.2 "CFG Scale": classifier-free guidance weight during rollout and update (1 = none)"""
    num_steps: int = 25
    """Table 6.2 "Timesteps": denoising steps per rollout, a respaced subset of the 1000 training steps"""
    sampler: str = "ddpm"
    """thesis 5.1: ddpm (the thesis) or ddim (stochastic, --eta > 0)"""
    spacing: str = "leading"
    """which training timesteps are kept: leading, trailing, linspace (diffusers) or guided (guided-diffusion)"""
    eta: float = 1.0
    """DDIM noise level (only with --sampler ddim)"""
    variance_type: str | None = None
    """policy std: fixed_small, fixed_large or learned_range (None = the model's scheduler config)"""
    logprob_reduction: str = "sum"
    """thesis 5.3: sum the per-dimension action log-likelihoods (thesis) or mean (DDPO)"""
    class_labels: str | None = None
    """class models: comma-separated classes sampled uniformly per environment (None = all classes; thesis 6.5)"""
    prompts: str | None = None
    """text models: a .txt/.jsonl/.csv/.parquet prompt file or builtin:pink / builtin:pickscore-eval, sampled uniformly per environment (thesis 5.3)"""
    # --- reward and value function ---
    reward: str = "target"
    """Table 6.2 reward: target (Algorithm 1), colorfulness (appendix A), aesthetic (LAION Aesthetics Predictor V2), pickscore (PickScore v1), rm (a trained reward model, --reward-model) or module:function on images in [-1,1] and prompts/class labels"""
    reward_model: str | None = None
    """--reward rm: a reward-model folder written by train_reward.py (thesis 5.2), scored on the samples themselves (latents for latent models)"""
    eval_reward: str | None = None
    """an extra score of the fixed-seed samples, never optimized: a --reward name or module:function (e.g. the gold function that labeled the reward model's data)"""
    classifier: str | None = None
    """--value-fn classifier: OpenAI's noisy-image classifier, guided-diffusion:/path/to/64x64_classifier.pt (thesis 6.5)"""
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    """--reward pickscore: the CLIP preference model (hub id or folder; thesis 6.10)"""
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """--reward pickscore: the CLIP processor (hub id or folder)"""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """--reward aesthetic: the CLIP image encoder of the LAION Aesthetics Predictor V2 (hub id or folder; thesis 6.6)"""
    aesthetic_mlp: str = rewards.AESTHETIC_MLP_URL
    """--reward aesthetic: the predictor's MLP weights, sac+logos+ava1-l14-linearMSE.pth (path or URL, read with weights_only)"""
    target_image: str | None = None
    """target image of the target reward (default: the bold slanted 4 in drlhf/assets)"""
    value_fn: str = "cnn"
    """value function V(x_t, t, c): cnn (appendix B), encoder (small conv encoder, cf. thesis 6.5), classifier (OpenAI's ImageNet classifier + a linear layer, --classifier; thesis 6.5), unet (the reward-model architecture on the base U-Net with a new head), reward (a copy of --reward-model, Pink's choice, thesis 6.9) or none"""
    value_init: str = "classifier"
    """value-function init: classifier (--value-fn cnn only: appendix B net pre-trained on noisy digits, thesis 6.4), random, or reward (the same as --value-fn reward: a copy of --reward-model, thesis 6.9)"""
    # --- reinforcement learning (Table 6.2) ---
    num_envs: int = 32
    """Table 6.2 "Environments": parallel environments per epoch over all processes"""
    gamma: float = 1.0
    """Table 6.2 "GAE gamma" """
    gae_lambda: float = 0.95
    """Table 6.2 "GAE lambda" """
    clip_coef: float = 0.2
    """Table 6.2 "PPO Clip Coeff." (also clips the value update)"""
    vf_coef: float = 0.5
    """Table 6.2 "PPO VF Coeff." """
    kl_coef: float = 0.0
    """Table 6.2 "KL Penalty Coeff." beta of Eq. 5.3; the frozen base model is built only when > 0"""
    norm_adv: bool = True
    """normalize advantages over the whole batch of all processes (thesis 5.3)"""
    clip_vloss: bool = True
    """clip the value loss around the rollout values (thesis 5.3)"""
    update_epochs: int = 1
    """passes over the rollout buffer per epoch (thesis: 1)"""
    old_logprobs: str = "rollout"
    """log pi_old for the PPO ratio and the KL: rollout (recorded while sampling, thesis 5.3; exact on CPU and in fp32) or recompute (one extra no-grad pass in the update's own minibatches; needed with fp16/bf16 on GPU, where batch-dependent kernels move the starting ratio by up to 0.85, see losses/ratio_dev_at_start)"""
    minibatch_grouping: str = "state"
    """state: random states from all trajectories per minibatch (thesis 5.3); trajectory: whole trajectories (DDPO)"""
    # --- optimization (Table 6.2, "General Optimization") ---
    epochs: int = 50
    """Table 6.2 "Epochs": rollout + update rounds (offline default: 50, thesis: 3000)"""
    minibatch_size: int = 25
    """Table 6.2 "Minibatch Size": states per forward pass on each process"""
    policy_lr: float = 5e-5
    """Table 6.2 "Learning Rate Policy" (offline default 5e-5 to learn in minutes on CPU; thesis: 1e-7)"""
    policy_lr_early: float | None = None
    """Table 6.2 "Aesthetic Score": policy LR for the first --policy-lr-early-epochs epochs (2e-7)"""
    policy_lr_early_epochs: int = 0
    """epochs that use --policy-lr-early"""
    vf_lr: float = 1e-3
    """Table 6.2 "Learning Rate VF" (offline default 1e-3; thesis: 1e-5)"""
    policy_warmup_steps: int = 50
    """Table 6.2 "Warmup Steps Policy": linear warmup in optimizer steps (offline default 50; thesis: 4096)"""
    vf_warmup_steps: int = 50
    """Table 6.2 "Warmup Steps VF" (offline default 50; thesis: 1024)"""
    adam_beta1: float = 0.9
    """Table 6.2 "Adam beta1" (both optimizers)"""
    adam_beta2: float = 0.999
    """Table 6.2 "Adam beta2" (both optimizers)"""
    adam_eps: float = 1e-5
    """Table 6.2 "Adam epsilon" (both optimizers)"""
    weight_decay: float = 0.01
    """Table 6.2 "Adam Weight Decay" (AdamW, both optimizers)"""
    grad_accum_steps: int = 1
    """Table 6.2 "Grad. Accum. Steps": minibatches per optimizer step"""
    max_grad_norm: float | None = 0.5
    """Table 6.2 "Grad. Clip Norm", per model (None: no clipping)"""
    # --- hardware (Table 6.2, "Hardware") ---
    precision: str = "fp32"
    """Table 6.2 "Precision": fp32, fp16 (autocast + GradScaler) or bf16 (autocast); log-probs always fp32"""
    tf32: bool = False
    """Table 6.2 "Allow TF32" for matmuls and convolutions on Ampere+ GPUs"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    gradient_checkpointing: bool = False
    """recompute U-Net activations in the backward pass (thesis 5.3): less memory for ~25 % more update time"""
    compile: bool = False
    """torch.compile the policy U-Net's forward (inductor; the first epoch pays the compilation). Checkpoints keep the uncompiled module's key names; the compiled training and no-grad graphs round differently, so the PPO ratio starts near 1 (~1e-4 on CPU) rather than exactly 1"""
    lora_rank: int = 0
    """train low-rank adapters (peft LoRA) of this rank instead of the whole U-Net (0 = full fine-tuning, the thesis); for small GPUs. Checkpoints then hold the adapters only; the final pipeline has them merged"""
    lora_alpha: float | None = None
    """LoRA scaling numerator (None = --lora-rank, i.e. a scale of 1)"""
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    """comma-separated module names that get adapters (default: the attention projections of diffusers U-Nets)"""
    algo: str = "ppo"
    """ppo (thesis 5.3) or backprop: loss = -reward back-propagated through the whole sampling chain, no value function, base model or KL (Table 6.2 "Macaw: Without RL", thesis 6.8)"""
    chain_checkpointing: bool = True
    """--algo backprop: keep only x_t of each denoising step and recompute its U-Net forward in the backward pass (thesis 6.8: what makes 25 steps fit in memory)"""
    # --- logging and checkpoints ---
    output_dir: str | None = None
    """run folder for TensorBoard logs, checkpoints, sample grids and the final policy (default runs/<exp>)"""
    eval_samples: int = 64
    """fixed-seed samples scored before training and every --eval-every epochs"""
    eval_every: int = 10
    """epochs between fixed-seed evaluations and image grids"""
    checkpoint_every: int = 25
    """epochs between resumable checkpoints (0: only at the end)"""
    resume: str | None = None
    """continue from a checkpoint folder or a run folder (its latest checkpoint)"""
    cache_dir: str | None = None
    """where offline toy models are cached (default $DRLHF_CACHE or ~/.cache/drlhf)"""
    toy_train_steps: int = models.TOY_TRAIN_STEPS
    """training steps of an offline toy base model on first use (fewer: faster, blurrier)"""


PRESETS = {
    # Table 6.2 columns; keys override Args defaults, the command line overrides presets
    "target": dict(pretrained="toy:digit4-32", resolution=32, conditioning="none", latent=False, guidance_scale=1.0,
                   num_steps=25, reward="target", num_envs=32, gamma=1.0, gae_lambda=0.95, clip_coef=0.2,
                   vf_coef=0.5, kl_coef=0.0, epochs=3000, minibatch_size=25, policy_lr=1e-7, vf_lr=1e-5,
                   policy_warmup_steps=4096, vf_warmup_steps=1024, adam_beta1=0.9, adam_beta2=0.999,
                   adam_eps=1e-5, weight_decay=0.01, grad_accum_steps=1, max_grad_norm=0.5, precision="fp32",
                   tf32=False, value_fn="cnn", value_init="classifier"),
    "colorfulness": dict(pretrained="guided-diffusion:64x64", resolution=64, conditioning="class", latent=False,
                         guidance_scale=1.0, num_steps=32, reward="colorfulness", num_envs=32, gamma=1.0,
                         gae_lambda=0.95, clip_coef=0.2, vf_coef=0.5, kl_coef=0.02, epochs=400, minibatch_size=32,
                         policy_lr=1e-6, vf_lr=1e-5, policy_warmup_steps=8192, vf_warmup_steps=1024, adam_beta1=0.9,
                         adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_accum_steps=1, max_grad_norm=0.5,
                         precision="fp32", tf32=False, value_fn="classifier", classifier="guided-diffusion:64x64",
                         spacing="guided",
                         variance_type="learned_range"),
    "aesthetic": dict(pretrained="guided-diffusion:64x64", resolution=64, conditioning="class", latent=False,
                      guidance_scale=1.0, num_steps=50, reward="aesthetic", num_envs=32, gamma=1.0, gae_lambda=0.95,
                      clip_coef=0.2, vf_coef=0.5, kl_coef=0.03, epochs=500, minibatch_size=25, policy_lr=5e-7,
                      policy_lr_early=2e-7, policy_lr_early_epochs=100, vf_lr=1e-5, policy_warmup_steps=8192,
                      vf_warmup_steps=1024, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0,
                      grad_accum_steps=1, max_grad_norm=0.5, precision="fp32", tf32=False, value_fn="classifier",
                      classifier="guided-diffusion:64x64", spacing="guided", variance_type="learned_range"),
    "macaw": dict(pretrained="guided-diffusion:64x64", resolution=64, conditioning="class", latent=False,
                  guidance_scale=1.0, num_steps=25, reward="rm", class_labels="88", num_envs=32, gamma=1.0,
                  gae_lambda=0.95, clip_coef=0.2, vf_coef=0.5, kl_coef=0.02, epochs=250, minibatch_size=25,
                  policy_lr=1e-6, vf_lr=1e-5, policy_warmup_steps=8192, vf_warmup_steps=1024, adam_beta1=0.9,
                  adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_accum_steps=1, max_grad_norm=0.5,
                  precision="fp32", tf32=False, value_fn="classifier", classifier="guided-diffusion:64x64",
                  spacing="guided",
                  variance_type="learned_range"),
    "macaw-norl": dict(algo="backprop", pretrained="guided-diffusion:64x64", resolution=64, conditioning="class",
                       latent=False, guidance_scale=1.0, num_steps=25, reward="rm", class_labels="88", num_envs=32,
                       kl_coef=0.0, value_fn="none", epochs=750, minibatch_size=100, policy_lr=1e-6,
                       policy_warmup_steps=100, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.01,
                       grad_accum_steps=8, max_grad_norm=None, precision="fp32", tf32=False, spacing="guided",
                       variance_type="learned_range"),
    "pink": dict(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512, conditioning="text",
                 latent=True, guidance_scale=7.5, num_steps=16, reward="rm", num_envs=80, gamma=1.0, gae_lambda=0.95,
                 clip_coef=0.2, vf_coef=0.1, kl_coef=0.0, epochs=25500, minibatch_size=16, policy_lr=1e-7,
                 vf_lr=1e-6, policy_warmup_steps=4096, vf_warmup_steps=1024, adam_beta1=0.9, adam_beta2=0.999,
                 adam_eps=1e-8, weight_decay=0.01, grad_accum_steps=2, max_grad_norm=1.0, precision="fp16",
                 tf32=True, value_fn="reward", old_logprobs="recompute", prompts="builtin:pink"),  # Table 6.5
    "pickscore": dict(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512,
                      conditioning="text", latent=True, guidance_scale=7.5, num_steps=50, reward="pickscore",
                      num_envs=80, gamma=1.0, gae_lambda=0.95, clip_coef=0.2, vf_coef=0.1, kl_coef=0.0,
                      epochs=20850, minibatch_size=10, policy_lr=5e-7, vf_lr=1e-6, policy_warmup_steps=4096,
                      vf_warmup_steps=1024, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.01,
                      grad_accum_steps=4, max_grad_norm=1.0, precision="fp16", tf32=True, value_fn="unet",
                      old_logprobs="recompute", prompts="builtin:pickscore-eval"),
    # offline stand-ins that learn within minutes on 2 CPU cores (learning rates differ from the thesis)
    "digits-target": dict(),  # the Args defaults
    # colour digits: the thesis's beta = 0.02 let the summed KL (~1e3 per trajectory here) swamp the reward at
    # these learning rates, so the stand-in uses beta = 0.002
    "digits-colorfulness": dict(pretrained="toy:digits-rgb", reward="colorfulness", value_fn="encoder",
                                value_init="random", num_steps=25, kl_coef=0.002, minibatch_size=25, epochs=40,
                                adam_eps=1e-8, weight_decay=0.0),
    # Aesthetic Score on the colour digits, with the toy classifier as value function: needs --aesthetic-clip and
    # --aesthetic-mlp (the real ones offline, or any CLIP vision model with an MLP of the predictor's layout)
    # (beta and the learning rates scaled as in digits-colorfulness)
    "digits-aesthetic": dict(pretrained="toy:digits-rgb", reward="aesthetic", value_fn="classifier",
                             classifier="toy:digits-rgb", num_steps=25, kl_coef=0.003, minibatch_size=25, epochs=30,
                             policy_lr_early=2e-5, policy_lr_early_epochs=5, adam_eps=1e-8, weight_decay=0.0),
    # Macaw and Macaw without RL on class 4 of the colour digits, with the reward model of
    # `train_reward.py --exp digits-macaw` (the toy classifier + a linear layer) and the toy classifier as value fn
    "digits-macaw": dict(pretrained="toy:digits-rgb", class_labels="4", reward="rm",
                         reward_model="runs/reward-digits-macaw", value_fn="classifier", classifier="toy:digits-rgb",
                         num_steps=25, kl_coef=0.002, minibatch_size=25, epochs=30, adam_eps=1e-8, weight_decay=0.0),
    "digits-macaw-norl": dict(algo="backprop", pretrained="toy:digits-rgb", class_labels="4", reward="rm",
                              reward_model="runs/reward-digits-macaw", value_fn="none", kl_coef=0.0, num_steps=25,
                              num_envs=32, minibatch_size=100, grad_accum_steps=8, epochs=30, policy_lr=1e-4,
                              policy_warmup_steps=5, adam_eps=1e-8, weight_decay=0.01, max_grad_norm=None),
}


CHOICES = {"conditioning": ("none", "class", "text"), "sampler": ("ddpm", "ddim"),
           "spacing": ("leading", "trailing", "linspace", "guided"),
           "variance_type": ("fixed_small", "fixed_large", "learned_range"), "logprob_reduction": ("sum", "mean"),
           "value_fn": ("cnn", "encoder", "unet", "none", "reward", "classifier"), "value_init": ("classifier", "random", "reward"),
           "old_logprobs": ("rollout", "recompute"), "minibatch_grouping": ("state", "trajectory"),
           "precision": ("fp32", "fp16", "bf16"), "device": ("auto", "cpu", "cuda"), "algo": ("ppo", "backprop")}


def parse_args(argv=None):
    """default < preset < command line; returns the Args and the set of flags given on the command line."""
    return cli.parse_args(Args, PRESETS, argv, CHOICES)


# ---------------------------------------------------------------------------------------------------------
# Plumbing: distributed set-up, seeding, learning rates, image grids
# ---------------------------------------------------------------------------------------------------------
def setup_distributed(device_flag: str):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on GPU, gloo on CPU."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def sync_device(device):
    """Wait for queued GPU work, so that phase timings are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def set_lr(optimizer, lr: float, step: int, warmup: int):
    """Constant LR after a linear warmup over `warmup` optimizer steps (thesis 5.3)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))


def batch_arithmetic(args: Args, world: int) -> tuple[int, int, int]:
    """Environments, states and minibatches per process and epoch, checked for exact divisibility (Table 6.2:
    Pink on 10 GPUs = 8 environments x 16 steps = 128 states -> 8 minibatches of 16 -> 4 optimizer steps)."""
    if args.num_envs % world:
        raise SystemExit(f"--num-envs ({args.num_envs}) must be divisible by the number of processes ({world})")
    B, T = args.num_envs // world, args.num_steps
    n_states = B * T
    if n_states % args.minibatch_size:
        raise SystemExit(f"--minibatch-size ({args.minibatch_size}) must divide the states per process, "
                         f"--num-envs/processes x --num-steps = {B} x {T} = {n_states}")
    if args.algo == "backprop" and args.minibatch_size % T:
        raise SystemExit(f"--algo backprop back-propagates through whole chains: --minibatch-size ({args.minibatch_size}"
                         f" states) must be a multiple of --num-steps ({T}); Table 6.2: 100 = 4 images x 25 steps")
    if args.minibatch_grouping == "trajectory" and args.minibatch_size % T:
        raise SystemExit(f"--minibatch-grouping trajectory needs --minibatch-size ({args.minibatch_size}) to be a "
                         f"multiple of --num-steps ({T})")
    n_minibatches = n_states // args.minibatch_size
    if n_minibatches % args.grad_accum_steps:
        raise SystemExit(f"--grad-accum-steps ({args.grad_accum_steps}) must divide the minibatches per process "
                         f"and epoch ({n_states} states / --minibatch-size {args.minibatch_size} = {n_minibatches})")
    return B, n_states, n_minibatches


# ---------------------------------------------------------------------------------------------------------
# Setup: models, reward, value function
# ---------------------------------------------------------------------------------------------------------
def check_requirements(args: Args):
    """Stop early, before loading anything large, when a preset needs parts that are not available here."""
    if args.algo == "backprop" and (args.value_fn != "none" or args.kl_coef):
        raise SystemExit(f"--algo backprop (thesis 6.8) has no value function and no KL penalty: pass --value-fn none "
                         f"and --kl-coef 0 (got --value-fn {args.value_fn}, --kl-coef {args.kl_coef})")
    if (args.reward == "rm" or "reward" in (args.value_fn, args.value_init)) and not args.reward_model:
        raise SystemExit(f"--reward {args.reward} / --value-fn {args.value_fn}: pass --reward-model DIR, a folder "
                         "written by train_reward.py")
    if args.value_fn == "classifier" and not args.classifier:
        raise SystemExit("--value-fn classifier needs --classifier guided-diffusion:/path/to/64x64_classifier.pt "
                         "(OpenAI's noisy-image classifier); offline stand-in: --exp digits-colorfulness")


def make_reward_fn(spec: str, args: Args, base: models.BaseModel, device):
    """A reward by name -> fn(samples, cond, prompts) -> (B,) scores (drlhf.rewards.build)."""
    return rewards.build(spec, base, device, reward_model=args.reward_model, target_image=args.target_image,
                         pickscore_model=args.pickscore_model, pickscore_processor=args.pickscore_processor,
                         cache_dir=args.cache_dir, aesthetic_clip=args.aesthetic_clip, aesthetic_mlp=args.aesthetic_mlp)


def make_value_fn(args: Args, base: models.BaseModel) -> nn.Module | None:
    c, h, _ = base.sample_shape
    if args.value_fn == "none":
        return None
    if args.value_fn == "cnn":
        net = models.CriticCNN(c, h)
        if args.value_init == "classifier":  # appendix B: start from a digit classifier, new scalar output
            state = models.pretrain_critic_classifier(c, h, args.cache_dir)
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc2.")}, strict=False)
        return net
    if "reward" in (args.value_fn, args.value_init):  # thesis 6.9: the value function starts as a copy of the RM
        from drlhf.reward_model import load_reward_model
        return load_reward_model(args.reward_model, base, cache_dir=args.cache_dir)[0]
    if args.value_fn == "classifier":  # thesis 6.5: the ImageNet classifier + a linear layer to one scalar
        return models.ClassifierValue(models.load_guided_classifier(args.classifier, args.cache_dir))
    if args.value_fn == "unet":  # the reward-model architecture on the base U-Net, with a new head
        from drlhf.reward_model import RewardModel
        null_text = base.encode_prompts([""]) if base.conditioning == "text" else None
        return RewardModel(base.unet, base.conditioning, null_text, base.num_classes)
    if args.value_fn == "encoder":
        if args.value_init != "random":
            print(f"[drlhf] note: --value-init {args.value_init} applies to --value-fn cnn only; the encoder starts "
                  "from random weights", file=sys.stderr)
        return models.EncoderValue(c)
    raise ValueError(f"--value-fn must be cnn, encoder or none, got {args.value_fn!r}")


def sample_conditions(base: models.BaseModel, args: Args, n: int, generator, prompts=None, prompt_embeds=None):
    """Conditions of n environments, drawn uniformly (thesis 5.3): (cond for the model, prompts or None).
    cond is None (unconditional), class labels (n,) or text-encoder states (n, L, D) of the drawn prompts."""
    if base.conditioning == "none":
        return None, None
    if base.conditioning == "class":
        classes = torch.tensor([int(c) for c in args.class_labels.split(",")] if args.class_labels
                               else list(range(base.num_classes)))
        if classes.min() < 0 or classes.max() >= base.num_classes:
            raise ValueError(f"--class-labels {args.class_labels}: the base model has classes 0..{base.num_classes - 1}")
        return classes[torch.randint(len(classes), (n,), generator=generator)], None
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return prompt_embeds[idx], [prompts[i] for i in idx.tolist()]


def select(cond, index):
    return None if cond is None else cond[index.to(cond.device)]


def autocast(args: Args, device):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: rewards with the per-step KL penalty, values, GAE
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_terminal(reward_fn, samples, cond, prompts, epoch: int, rank: int) -> torch.Tensor:
    """Terminal reward r(s_0) of each environment (B,); non-finite rewards stop training with the culprit."""
    with torch.no_grad():
        scores = torch.as_tensor(reward_fn(samples, cond, prompts)).float().to(samples.device).flatten()
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        raise FloatingPointError(f"epoch {epoch}: the reward of sample {bad[0].item()} on rank {rank} is "
                                 f"{scores[bad[0]].item()} ({len(bad)} non-finite in all); stopping before the update "
                                 "so that no checkpoint is written from it. Check the reward function.")
    return scores


def compute_rewards(scores, logprobs, ref_logprobs, kl_coef: float):
    """Eq. 5.3: R_t = r(s_t)[t is terminal] - beta * KL_t, with the k3 estimator
    KL_t = (ratio - 1) - log ratio, ratio = pi_base(a_t|s_t) / pi_theta(a_t|s_t) (http://joschu.net/blog/kl-approx.html).
    scores (B,), logprobs/ref_logprobs (T, B) or None -> rewards (T, B), kl (T, B)."""
    T, B = logprobs.shape
    if ref_logprobs is None:
        kl = torch.zeros(T, B, dtype=torch.float64, device=scores.device)
    else:  # float64: a log-ratio summed over many dimensions can exceed float32's exp range
        log_ratio = ref_logprobs.double() - logprobs.double()
        kl = torch.expm1(log_ratio) - log_ratio
    rewards = -kl_coef * kl
    rewards[-1] += scores.double()
    return rewards.float(), kl.float()


def compute_advantages(rewards, values, gamma: float, gae_lambda: float):
    """GAE(gamma, lambda) over the denoising steps (Schulman et al. 2015); the state after the last action is
    terminal (value 0). rewards, values (T, B) -> advantages, returns (T, B)."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):  # over denoising steps, batched over environments
        next_value = values[t + 1] if t + 1 < T else torch.zeros_like(values[t])
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * gae_lambda * last
        advantages[t] = last
    return advantages, advantages + values


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Normalize with the mean and std over all processes, so that N ranks equal one process on the union."""
    stats = all_reduce_sum(torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double())
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean ** 2) * stats[2] / (stats[2] - 1).clamp(min=1)
    return ((x.double() - mean) / (var.sqrt() + 1e-8)).to(x.dtype)


def minibatch_orders(args: Args, T: int, B: int, generator, device) -> torch.Tensor:
    """(update_epochs, T*B) permutations of the flattened states (row i*B + e = step i of environment e)."""
    orders = []
    for _ in range(args.update_epochs):
        if args.minibatch_grouping == "trajectory":  # whole trajectories stay together (DDPO)
            envs = torch.randperm(B, generator=generator)
            orders.append((envs[:, None] + B * torch.arange(T)[None]).flatten())
        elif args.minibatch_grouping == "state":  # random states mixed across trajectories (thesis 5.3)
            orders.append(torch.randperm(T * B, generator=generator))
        else:
            raise ValueError(f"--minibatch-grouping must be state or trajectory, got {args.minibatch_grouping!r}")
    return torch.stack(orders).to(device)


@torch.no_grad()
def evaluate_states(fn, latents, cond, order, chunk: int, args: Args, device):
    """fn(states, step_index, cond, actions) over all T x B states of a rollout -> (T, B), evaluated in the
    chunks of the update's minibatch order, so that batch-dependent GPU kernels see the same batches."""
    T, B = latents.shape[0] - 1, latents.shape[1]
    states, actions = latents[:-1].flatten(0, 1), latents[1:].flatten(0, 1)  # (T*B, C, H, W)
    idx = torch.arange(T, device=device).repeat_interleave(B)                # (T*B,)
    flat_cond = None if cond is None else cond.repeat(T, *([1] * (cond.ndim - 1)))
    out = torch.empty(T * B, device=device)
    for s in range(0, T * B, chunk):
        i = order[s:s + chunk]
        with autocast(args, device):
            out[i] = fn(states[i], idx[i], select(flat_cond, i), actions[i]).float()
    return out.view(T, B)


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the PPO update
# ---------------------------------------------------------------------------------------------------------
def ppo_update(policy, value_fn, schedule, opt_pi, opt_vf, scaler, buf, orders, args: Args, state: dict, device):
    """Clipped-surrogate PPO over all states of the rollout buffer (thesis 5.3), one pass per row of `orders`.
    `state["global_step"]` counts optimizer steps and sets the warmup. Returns a dict of averaged statistics."""
    T, B = buf["logprobs"].shape
    b_states = buf["latents"][:-1].flatten(0, 1)                 # (T*B, C, H, W), row i*B + e = step i of env e
    b_actions = buf["latents"][1:].flatten(0, 1)                 # (T*B, C, H, W)
    b_idx = torch.arange(T, device=device).repeat_interleave(B)  # (T*B,) step index of each state
    b_t = schedule.timesteps.to(device)[b_idx]                  # (T*B,) training timestep
    b_cond = None if buf["cond"] is None else buf["cond"].repeat(T, *([1] * (buf["cond"].ndim - 1)))
    b_logprobs, b_values = buf["logprobs"].flatten(), buf["values"].flatten()   # (T*B,)
    b_returns = buf["returns"].flatten()                                         # (T*B,)
    b_advantages = whiten(buf["advantages"].flatten()) if args.norm_adv else buf["advantages"].flatten()
    n, mb = T * B, args.minibatch_size
    stats = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "ratio")}
    stats["ratio_dev_at_start"] = []  # max |ratio - 1| of the first minibatch, before any optimizer step
    for order in orders:
        for j, start in enumerate(range(0, n, mb)):
            i = order[start:start + mb]
            sync = (j + 1) % args.grad_accum_steps == 0
            nosync = [m.no_sync() for m in (policy, value_fn) if isinstance(m, DDP) and not sync]
            with contextlib.ExitStack() as stack:
                for ctx in nosync:
                    stack.enter_context(ctx)
                with autocast(args, device):
                    new_logprobs = action_logprob(policy, schedule, b_states[i], b_idx[i], select(b_cond, i), b_actions[i])
                    new_values = value_fn(b_states[i], b_t[i], select(b_cond, i)).float() if value_fn else None
                log_ratio = new_logprobs - b_logprobs[i]
                ratio = log_ratio.exp()
                adv = b_advantages[i]
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                if value_fn is not None:
                    v_loss = (new_values - b_returns[i]) ** 2
                    if args.clip_vloss:
                        v_clipped = b_values[i] + (new_values - b_values[i]).clamp(-args.clip_coef, args.clip_coef)
                        v_loss = torch.max(v_loss, (v_clipped - b_returns[i]) ** 2)
                    v_loss = 0.5 * v_loss.mean()
                else:
                    v_loss = torch.zeros((), device=device)
                loss = (pg_loss + args.vf_coef * v_loss) / args.grad_accum_steps
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {state['epoch']}: non-finite PPO loss (policy {pg_loss.item()}, "
                                             f"value {v_loss.item()}, max |log-ratio| {log_ratio.abs().max().item():.3g});"
                                             " try --logprob-reduction mean or a lower --policy-lr")
                scaler.scale(loss).backward()
            if sync:
                for opt, model in ((opt_pi, policy), (opt_vf, value_fn)):
                    if opt is None:
                        continue
                    scaler.unscale_(opt)
                    if args.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    scaler.step(opt)
                    opt.zero_grad(set_to_none=True)
                scaler.update()
                state["global_step"] += 1
                set_lrs(opt_pi, opt_vf, args, state)
            with torch.no_grad():
                stats["pg_loss"].append(pg_loss.item())
                stats["v_loss"].append(v_loss.item())
                stats["approx_kl"].append(((ratio - 1) - log_ratio).mean().item())  # k3 of the update step
                stats["clipfrac"].append(((ratio - 1).abs() > args.clip_coef).float().mean().item())
                stats["ratio"].append(ratio.mean().item())
                if not stats["ratio_dev_at_start"]:
                    stats["ratio_dev_at_start"].append((ratio - 1).abs().max().item())
    return {k: float(np.mean(v)) for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: one PPO epoch, the method's step 4 (thesis 5.3)
# ---------------------------------------------------------------------------------------------------------
def ppo_epoch(policy, policy_net, ref_net, value_fn, value_net, schedule, reward_fn, opt_pi, opt_vf, scaler, x_T, cond,
              prompts, args: Args, state: dict, gens: dict, device, t0: float):
    """Rollout -> terminal reward + per-step KL -> values -> GAE -> PPO update, for environments starting at
    x_T (B, C, H, W). Returns the rewards (B,), the KL (T, B), the update statistics and the phase timings."""
    T, B = schedule.num_steps, len(x_T)
    # 1. ROLLOUT: all environments, one batch per denoising step
    policy_net.eval()
    with autocast(args, device):
        buf = rollout(policy_net, schedule, x_T, cond, generator=gens["rollout"])
    sync_device(device)
    t_rollout = time.perf_counter() - t0
    orders = minibatch_orders(args, T, B, gens["shuffle"], device)  # (update_epochs, T*B)
    logprobs = buf.logprobs                                          # (T, B) log pi_old(a_t|s_t)
    if args.old_logprobs == "recompute":
        logprobs = evaluate_states(lambda x, i, c, a: action_logprob(policy_net, schedule, x, i, c, a),
                                   buf.latents, cond, orders[0], args.minibatch_size, args, device)
    # 2. REWARD: terminal score, per-step KL to the base model, values of every state
    scores = score_terminal(reward_fn, buf.samples, cond, prompts, state["epoch"], int(os.environ.get("RANK", 0)))  # (B,)
    ref_logprobs = None                                                        # (T, B) log pi_base(a_t|s_t)
    if ref_net is not None:
        ref_logprobs = evaluate_states(lambda x, i, c, a: action_logprob(ref_net, schedule, x, i, c, a),
                                       buf.latents, cond, orders[0], args.minibatch_size, args, device)
    rewards_t, kl = compute_rewards(scores, logprobs, ref_logprobs, args.kl_coef)  # (T, B) each
    values = torch.zeros_like(rewards_t)                                          # (T, B) V(x_t, t, c)
    if value_net is not None:
        value_net.eval()
        values = evaluate_states(lambda x, i, c, a: value_net(x, schedule.timesteps.to(device)[i], c),
                                 buf.latents, cond, orders[0], args.minibatch_size, args, device)
    # 3. ADVANTAGES: GAE over the denoising steps
    advantages, returns = compute_advantages(rewards_t, values, args.gamma, args.gae_lambda)  # (T, B) each
    sync_device(device)
    t_score = time.perf_counter() - t0 - t_rollout
    # 4. UPDATE: PPO over all states in random minibatches
    policy_net.train()
    if value_net is not None:
        value_net.train()
    buf_d = dict(latents=buf.latents, logprobs=logprobs, cond=cond, values=values, returns=returns,
                 advantages=advantages)
    stats = ppo_update(policy, value_fn, schedule, opt_pi, opt_vf, scaler, buf_d, orders, args, state, device)
    var_y = returns.var()
    stats["explained_variance"] = (1 - (returns - values).var() / var_y).item() if var_y > 0 else float("nan")
    return scores, kl, stats, t_rollout, t_score


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: without RL, the reward back-propagated through the sampling chain (thesis 6.8)
# ---------------------------------------------------------------------------------------------------------
def backprop_update(chain, reward_fn, opt_pi, scaler, x_T, noise, cond, prompts, args: Args, state: dict, device):
    """Table 6.2 "Macaw: Without RL": each minibatch of --minibatch-size / T images is sampled through the whole
    chain with gradients (`chain` = a ReparameterizedChain, DDP-wrapped under torchrun), scored by the frozen
    reward, and loss = -reward is back-propagated; the gradients of --grad-accum-steps minibatches make one
    optimizer step (thesis: 8 minibatches of 4 images = all 32 environments). x_T (B, C, H, W), noise (T, B, C, H, W).
    Returns the rewards (B,) and averaged statistics."""
    B, n_img = len(x_T), args.minibatch_size // len(noise)
    scores, stats = [], {"loss": [], "grad_norm": []}
    for j, start in enumerate(range(0, B, n_img)):
        i = torch.arange(start, start + n_img, device=device)
        sync = (j + 1) % args.grad_accum_steps == 0
        with chain.no_sync() if isinstance(chain, DDP) and not sync else contextlib.nullcontext():
            with autocast(args, device):
                x_0 = chain(x_T[i], select(cond, i), noise[:, i])                         # (n, C, H, W)
            mb_prompts = None if prompts is None else [prompts[k] for k in i.tolist()]
            r = torch.as_tensor(reward_fn(x_0.float(), select(cond, i), mb_prompts)).float().flatten()  # (n,)
            if not torch.isfinite(r).all():
                bad = (~torch.isfinite(r)).nonzero()[0].item()
                raise FloatingPointError(f"epoch {state['epoch']}: the reward of sample {start + bad} is {r[bad].item()};"
                                         " stopping before the update so that no checkpoint is written from it")
            if not r.requires_grad:
                raise ValueError(f"--algo backprop: --reward {args.reward} gives no gradient (it is not a torch "
                                 "function of the samples); use --reward rm or target, or a differentiable module:function")
            loss = -r.mean() / args.grad_accum_steps  # thesis 6.8: loss = -reward
            scaler.scale(loss).backward()
        if sync:
            scaler.unscale_(opt_pi)
            params = [p for g in opt_pi.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
            scaler.step(opt_pi)
            scaler.update()
            opt_pi.zero_grad(set_to_none=True)
            state["global_step"] += 1
            set_lrs(opt_pi, None, args, state)
            stats["grad_norm"].append(norm.item())
        stats["loss"].append(loss.item() * args.grad_accum_steps)
        scores.append(r.detach())
    return torch.cat(scores), {k: float(np.mean(v)) for k, v in stats.items()}


def set_lrs(opt_pi, opt_vf, args: Args, state: dict):
    early = args.policy_lr_early is not None and state["epoch"] < args.policy_lr_early_epochs
    set_lr(opt_pi, args.policy_lr_early if early else args.policy_lr, state["global_step"], args.policy_warmup_steps)
    if opt_vf is not None:
        set_lr(opt_vf, args.vf_lr, state["global_step"], args.vf_warmup_steps)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + a resumable state (optimizers, scaler, step, RNG of every rank, args)
# ---------------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


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


def save_checkpoint(path: Path, policy_unet, value_net, opt_pi, opt_vf, scaler, state, args, generators):
    """Rank 0 writes; every rank's RNG state is gathered first. Written to a temporary folder, then renamed."""
    rngs = [rng_state(generators)]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state(generators))
    if int(os.environ.get("RANK", 0)) != 0:
        return
    for name, module in (("policy", policy_unet), ("value", value_net)):
        if module is not None and not all(torch.isfinite(p).all() for p in module.parameters()):
            raise FloatingPointError(f"non-finite {name} weights at epoch {state['epoch']}: not writing {path}")

    def write(d):
        weights = policy_unet.state_dict()
        if args.lora_rank:  # the base weights never change: the adapters are the whole trained state
            weights = {k: v for k, v in weights.items() if "lora_" in k}
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, d / "policy.safetensors")
        if value_net is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in value_net.state_dict().items()}, d / "value.safetensors")
        torch.save({"opt_pi": opt_pi.state_dict(), "opt_vf": opt_vf.state_dict() if opt_vf else None,
                    "scaler": scaler.state_dict(), "state": state, "rng": rngs, "args": dataclasses.asdict(args)},
                   d / "state.pt")
    models._atomic_save(path, write)
    (path.parent / "latest").write_text(path.name)


def find_checkpoint(resume: str) -> Path:
    p = Path(resume)
    if (p / "checkpoints" / "latest").exists():
        p = p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
    if not (p / "state.pt").exists() or not (p / "policy.safetensors").exists():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected state.pt and policy.safetensors, "
                                "or a run folder with checkpoints/latest)")
    return p


def load_state(ckpt: Path) -> dict:
    try:  # weights_only: never execute pickled code from a file
        return torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume {ckpt}: state.pt is unreadable or corrupt ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}); resume from an earlier checkpoint folder") from None


def load_weights(module, path: Path, adapters_only: bool = False):
    try:
        missing, unexpected = module.load_state_dict(load_file(path), strict=not adapters_only)
        if adapters_only and (unexpected or any("lora_" in k for k in missing)):
            raise KeyError("adapter keys do not match (--lora-rank / --lora-targets changed?)")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume: {path} is unreadable or does not fit the model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}); resume from an earlier checkpoint folder") from None


# ---------------------------------------------------------------------------------------------------------
# Evaluation: fixed-seed samples, their rewards and image grids
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy, schedule, base, reward_fns, args: Args, device, eval_cond, eval_prompts=None):
    """Fixed-seed samples -> decoded images and the scores of each reward function (each (N,) on the CPU)."""
    g = torch.Generator(device).manual_seed(args.seed + 12345)  # the same seeds every time
    x_T = torch.randn((args.eval_samples, *base.sample_shape), generator=g, device=device)
    with autocast(args, device):
        buf = rollout(policy, schedule, x_T, eval_cond, generator=g)
    return base.decode(buf.samples), [torch.as_tensor(fn(buf.samples, eval_cond, eval_prompts)).float().flatten().cpu()
                                      for fn in reward_fns]


# ---------------------------------------------------------------------------------------------------------
# main: the method's step 4, epoch by epoch
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    args, given = parse_args(argv)
    if args.resume:  # the saved args, overridden only by flags given explicitly now
        ckpt = find_checkpoint(args.resume)
        saved = load_state(ckpt)
        args = Args(**{**saved["args"], **{k: getattr(args, k) for k in given if k != "resume"}, "resume": args.resume})
    check_requirements(args)
    if args.old_logprobs not in ("rollout", "recompute"):
        raise SystemExit(f"--old-logprobs must be rollout or recompute, got {args.old_logprobs!r}")
    if args.precision != "fp32" and args.old_logprobs == "rollout":
        print(f"[drlhf] warning: --precision {args.precision} with --old-logprobs rollout: on GPUs the PPO ratio and "
              "the KL then start away from 1 and 0 (see losses/ratio_dev_at_start); --old-logprobs recompute fixes it",
              file=sys.stderr)
    rank, world, device = setup_distributed(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output_dir or f"runs/{args.exp or 'digits-target'}")

    # --- batch arithmetic, asserted up front -----------------------------------------------------------------
    B, n_states, n_minibatches = batch_arithmetic(args, world)
    T = args.num_steps
    schedule_cfg = dict(sampler=args.sampler, num_steps=args.num_steps, spacing=args.spacing, eta=args.eta,
                        guidance_scale=args.guidance_scale, logprob_reduction=args.logprob_reduction)

    # --- models ---------------------------------------------------------------------------------------------
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 trains and caches toy models first; the others then read the cache
    frozen_dtype = torch.float16 if device.type == "cuda" and args.precision != "fp32" else torch.float32
    base = models.load_base_model(args.pretrained, device, args.cache_dir, weights_dtype=frozen_dtype,
                                  toy_train_steps=args.toy_train_steps)  # VAE and text encoder frozen, half on GPU
    torch.manual_seed(args.seed)  # the same value-function init whether or not a toy model was just trained
    value_net = make_value_fn(args, base)
    if world > 1 and rank == 0:
        dist.barrier()
    res = base.sample_shape[1] * (8 if base.is_latent else 1)
    for flag, want, have in (("resolution", args.resolution, res), ("conditioning", args.conditioning, base.conditioning),
                             ("latent", args.latent, base.is_latent)):
        if want is not None and want != have:
            raise SystemExit(f"--{flag} {want}: the base model {args.pretrained} has {flag} {have}")
    schedule = DiffusionSchedule.for_model(base.scheduler_config, base.is_latent, **schedule_cfg,
                                           variance_type=args.variance_type)
    if schedule.num_steps != T:
        raise SystemExit(f"--num-steps {T} with --spacing {args.spacing} keeps {schedule.num_steps} distinct steps")
    reward_fn = make_reward_fn(args.reward, args, base, device)
    eval_fns = [reward_fn] + ([make_reward_fn(args.eval_reward, args, base, device)] if args.eval_reward else [])
    base.unet.requires_grad_(True).train()
    if args.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    policy_net = models.make_denoiser(base, args.guidance_scale)
    ref_net = None
    if args.kl_coef > 0:  # the frozen base policy pi_base, only needed for the KL penalty
        import copy
        ref_net = copy.deepcopy(policy_net).requires_grad_(False).eval()
    if args.lora_rank:  # low-rank adapters on the attention projections; the base weights stay frozen
        models.add_lora(base.unet, args.lora_rank, args.lora_alpha or args.lora_rank, args.lora_targets.split(","))
    if args.compile:  # only the policy's forward is compiled; base.unet (saved, checkpointed) stays the plain module
        policy_net.unet = torch.compile(base.unet)
    value_net = value_net.to(device) if value_net is not None else None
    if args.algo == "backprop":  # thesis 6.8: the whole sampling chain is one differentiable forward
        policy_net = ReparameterizedChain(policy_net, schedule, args.chain_checkpointing)
    policy = DDP(policy_net, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False) if world > 1 else policy_net
    if args.algo == "backprop":
        policy_net = policy_net.model  # the plain denoiser, for rollouts without gradients
    value_fn = (DDP(value_net, device_ids=[device] if device.type == "cuda" else None) if world > 1 else value_net) if value_net else None
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    opt_pi = torch.optim.AdamW([p for p in base.unet.parameters() if p.requires_grad], lr=args.policy_lr, **adam)
    opt_vf = torch.optim.AdamW(value_net.parameters(), lr=args.vf_lr, **adam) if value_net else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    prompts = prompt_embeds = None
    if base.conditioning == "text":
        if not args.prompts:
            raise SystemExit("--prompts is required for a text-conditional model: a .txt (one prompt per line), "
                             ".jsonl, .csv or .parquet file, or builtin:pink")
        prompts = read_prompts(args.prompts)
        prompt_embeds = base.encode_prompts(prompts)  # computed once per prompt
    gens = {"rollout": torch.Generator(device).manual_seed(args.seed + rank), "shuffle": torch.Generator().manual_seed(args.seed + 7919 * (rank + 1))}
    state = {"epoch": 0, "global_step": 0}
    eval_cond, eval_prompts = sample_conditions(base, args, args.eval_samples,
                                                torch.Generator().manual_seed(args.seed + 54321), prompts, prompt_embeds)
    eval_cond = None if eval_cond is None else eval_cond.to(device)
    if args.resume:
        load_weights(base.unet, ckpt / "policy.safetensors", adapters_only=bool(args.lora_rank))
        if value_net is not None:
            load_weights(value_net, ckpt / "value.safetensors")
        opt_pi.load_state_dict(saved["opt_pi"])
        if opt_vf is not None:
            opt_vf.load_state_dict(saved["opt_vf"])
        scaler.load_state_dict(saved["scaler"])
        state = dict(saved["state"])
        if len(saved["rng"]) != world:
            raise SystemExit(f"--resume: the checkpoint was written by {len(saved['rng'])} processes, now {world}")
        set_rng_state(saved["rng"][rank], gens)
    set_lrs(opt_pi, opt_vf, args, state)

    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(out / "tb", purge_step=state["epoch"] if args.resume else None)
        table = "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
        writer.add_text("args", table)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"[drlhf] base {args.pretrained} ({base.conditioning}, {'latent' if base.is_latent else 'pixel'} "
              f"{tuple(base.sample_shape)}), {T} steps {args.sampler}/{schedule.cfg.variance_type}; {world} process(es) x "
              f"{B} environments = {B * world}; {n_states} states per process -> {n_minibatches} minibatches of "
              f"{args.minibatch_size} -> {n_minibatches // args.grad_accum_steps} optimizer steps per epoch")
        if "base_rewards" not in state:
            images, (base_rewards, *gold) = evaluate(policy_net, schedule, base, eval_fns, args, device, eval_cond, eval_prompts)
            state["base_rewards"] = base_rewards
            if gold:
                state["base_eval_reward"] = gold[0]
            pictures.save_png(pictures.image_grid(images), out / "samples_base.png")
            print(f"[drlhf] base model, {args.eval_samples} fixed-seed samples: reward {base_rewards.mean():.4f} "
                  f"+- {base_rewards.std():.4f}")
    if dist.is_initialized():  # every rank keeps the same state dict (it is saved by rank 0)
        box = [state]
        dist.broadcast_object_list(box)
        state = box[0]

    # --- the training loop ------------------------------------------------------------------------------------
    epoch_times = []
    bar = tqdm(range(state["epoch"], args.epochs), initial=state["epoch"], total=args.epochs, disable=rank != 0,
               desc=f"{args.algo} epochs", unit="epoch")
    for epoch in bar:
        state["epoch"] = epoch
        t0 = time.perf_counter()
        cond, cond_prompts = sample_conditions(base, args, B, gens["shuffle"], prompts, prompt_embeds)
        cond = None if cond is None else cond.to(device)
        x_T = torch.randn((B, *base.sample_shape), generator=gens["rollout"], device=device)
        if args.algo == "backprop":  # thesis 6.8: sample with gradients, loss = -reward, no RL
            noise = torch.randn((T, *x_T.shape), generator=gens["rollout"], device=device)  # (T, B, C, H, W)
            policy_net.train()
            scores, stats = backprop_update(policy, reward_fn, opt_pi, scaler, x_T, noise, cond, cond_prompts,
                                               args, state, device)
            kl = torch.zeros(T, B, device=device)
            t_rollout = t_score = 0.0
        else:
            scores, kl, stats, t_rollout, t_score = ppo_epoch(policy, policy_net, ref_net, value_fn, value_net, schedule,
                                                              reward_fn, opt_pi, opt_vf, scaler, x_T, cond, cond_prompts,
                                                              args, state, gens, device, t0)
        # STATS (all ranks' rewards and KL pooled)
        pooled = all_reduce_sum(torch.stack([scores.sum(), (scores ** 2).sum(), kl.sum(0).sum() * args.kl_coef,
                                             (scores.abs() + kl.sum(0) * args.kl_coef).sum()]).double()).cpu() / (B * world)
        sync_device(device)
        dt = time.perf_counter() - t0
        epoch_times.append(dt)
        if rank == 0:
            r_mean = pooled[0].item()
            r_std = math.sqrt(max(pooled[1].item() - r_mean ** 2, 0.0))
            bmu, bsd = state["base_rewards"].mean().item(), state["base_rewards"].std().item() + 1e-12
            logs = {"objective/reward_mean": r_mean, "objective/reward_std": r_std,
                    "objective/reward_mean_std_units": (r_mean - bmu) / bsd,
                    "charts/policy_lr": opt_pi.param_groups[0]["lr"], "charts/images_per_s": B * world / dt,
                    "charts/global_step": state["global_step"], "charts/seconds_update": dt - t_rollout - t_score}
            if args.algo == "backprop":
                logs.update({"losses/loss": stats["loss"], "losses/grad_norm": stats["grad_norm"]})
            else:
                logs.update({
                    "objective/kl": kl.sum(0).mean().item(), "objective/kl_penalty": pooled[2].item(),
                    "objective/kl_share": pooled[2].item() / max(pooled[3].item(), 1e-12),
                    "losses/policy_loss": stats["pg_loss"], "losses/value_loss": stats["v_loss"],
                    "losses/log_value_loss": math.log10(max(stats["v_loss"], 1e-12)), "losses/approx_kl": stats["approx_kl"],
                    "losses/clipfrac": stats["clipfrac"], "losses/ratio": stats["ratio"],
                    "losses/ratio_dev_at_start": stats["ratio_dev_at_start"],
                    "losses/explained_variance": stats["explained_variance"],
                    "charts/seconds_rollout": t_rollout,
                    "charts/seconds_scoring": t_score})  # rewards, values, pi_base and a recomputed pi_old
            logs["charts/peak_rss_gb"] = peak_rss_gb()
            if device.type == "cuda":
                logs["charts/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if opt_vf is not None:
                logs["charts/vf_lr"] = opt_vf.param_groups[0]["lr"]
            for k, v in logs.items():
                writer.add_scalar(k, v, epoch)
            writer.add_histogram("objective/rewards", scores.cpu(), epoch)
            bar.set_postfix(reward=f"{r_mean:.3f}", **({"loss": f"{stats['loss']:.3g}"} if args.algo == "backprop" else
                                                      {"kl": f"{logs['objective/kl']:.3g}", "clipfrac": f"{stats['clipfrac']:.2f}"}))
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                images, (ev, *gold) = evaluate(policy_net, schedule, base, eval_fns, args, device, eval_cond, eval_prompts)
                writer.add_scalar("eval/reward_mean", ev.mean().item(), epoch)
                if gold:
                    gb = state["base_eval_reward"]
                    writer.add_scalar("eval/eval_reward_gain_in_base_std",
                                      ((gold[0].mean() - gb.mean()) / (gb.std() + 1e-12)).item(), epoch)
                writer.add_scalar("eval/reward_gain_in_base_std", (ev.mean().item() - bmu) / bsd, epoch)
                grid = pictures.image_grid(images)
                writer.add_image("eval/samples", grid, epoch, dataformats="HWC")
                (out / "samples").mkdir(exist_ok=True)
                pictures.save_png(grid, out / "samples" / f"epoch_{epoch + 1:05d}.png")
                state["last_eval"] = ev
        if args.checkpoint_every and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
            state["epoch"] = epoch + 1
            save_checkpoint(out / "checkpoints" / f"epoch_{epoch + 1:05d}", base.unet, value_net, opt_pi, opt_vf,
                            scaler, state, args, gens)
    state["epoch"] = args.epochs

    # --- the end: the policy as a diffusers pipeline, before/after pictures ---------------------------------------
    if rank == 0:
        models.save_pipeline(models.merge_lora(base.unet) if args.lora_rank else base.unet, base, out / "final_policy")
        images, (ev, *gold) = evaluate(policy_net, schedule, base, eval_fns, args, device, eval_cond, eval_prompts)
        before = pictures.load_grid(out / "samples_base.png")
        pictures.save_png(np.concatenate([before, np.full((before.shape[0], 4, 3), 255, np.uint8), pictures.image_grid(images)], 1),
                 out / "samples_before_after.png")
        br = state["base_rewards"]
        pictures.histogram_png(br.numpy(), ev.numpy(), out / "reward_histogram.png")
        gain = (ev.mean() - br.mean()) / (br.std() + 1e-12)
        summary = dict(base_reward_mean=br.mean().item(), base_reward_std=br.std().item(), final_reward_mean=ev.mean().item(),
                       final_reward_std=ev.std().item(), gain_in_base_std=gain.item(), epochs=args.epochs,
                       seconds_per_epoch=float(np.mean(epoch_times)) if epoch_times else None,
                       images_per_second=B * world / float(np.mean(epoch_times)) if epoch_times else None,
                       peak_gpu_memory_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                       peak_rss_gb=peak_rss_gb())
        if gold:  # the extra score, never optimized (e.g. the gold labeler behind a reward model)
            gb = state["base_eval_reward"]
            summary.update(eval_reward=args.eval_reward, base_eval_reward_mean=gb.mean().item(),
                           base_eval_reward_std=gb.std().item(), final_eval_reward_mean=gold[0].mean().item(),
                           final_eval_reward_std=gold[0].std().item(),
                           eval_reward_gain_in_base_std=((gold[0].mean() - gb.mean()) / (gb.std() + 1e-12)).item())
            print(f"[drlhf] {args.eval_reward} of the fixed-seed samples: {gb.mean():.4f} +- {gb.std():.4f} -> "
                  f"{gold[0].mean():.4f} +- {gold[0].std():.4f} ({summary['eval_reward_gain_in_base_std']:+.2f} base std)")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[drlhf] fixed-seed reward {br.mean():.4f} +- {br.std():.4f} -> {ev.mean():.4f} +- {ev.std():.4f} "
              f"({gain:+.2f} base std); policy saved to {out / 'final_policy'}")
        writer.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (models.ModelLoadError, RewardModelError, CheckpointError, FileNotFoundError, FloatingPointError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
