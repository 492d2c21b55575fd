"""PPO fine-tuning of a diffusion model against a reward (thesis chapter 5.3, Table 6.2).

One epoch = one batched rollout of all environments through the reverse process (the MDP of thesis 5.1),
a terminal reward plus a per-step k3 KL penalty to the frozen base model, GAE over the denoising steps,
then one pass over all states in random minibatches with the clipped PPO objective (`ppo_epoch` below).

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
The run folder's layout (checkpoints, final policy, pictures, summary.json) is drlhf/checkpoint.py's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from drlhf.cli import Fraction, NonNegFloat, NonNegInt, OpenFraction, PosFloat, PosInt
from drlhf import checkpoint, cli, evaluation, hardware, models, presets, rewards, tracking
from drlhf.hardware import DeviceFlag, Precision, all_reduce_sum, autocast, sync_device
from drlhf.passes import (mode_dependent, pass_size, reference_in_update_graph, rollout_chunk, rollout_in_update_graph,
                          rollout_is_recompute, rollout_notes, update_graph)
from drlhf.prompts import prompt_table, sample_conditions
from drlhf.sampler import (DiffusionSchedule, ReparameterizedChain, Reduction, Sampler, Spacing, VarianceType,
                           action_logprob, rollout)
from drlhf.toys import TOY_SAMPLING_STEPS, TOY_TRAIN_STEPS
from drlhf.value import make_value_fn


@dataclass
class Args:
    exp: str | None = None
    """preset: one Table 6.2 column (target, colorfulness, aesthetic, macaw, macaw-norl, pink, pickscore) or an offline stand-in (digits-target, digits-colorfulness, digits-aesthetic, digits-macaw, digits-macaw-norl); flags given on the command line override it"""
    seed: int = 0
    """base seed; rank r samples with seed + r"""
    # --- diffusion (Table 6.2, "Diffusion") ---
    pretrained: str = "toy:digit4"
    """Table 6.2 "Base Policy": diffusers folder, hub id, or toy:digit4 / toy:digit4-32 / toy:digits-rgb (offline, trained on first use)"""
    resolution: PosInt | None = None
    """Table 6.2 "Resolution" of the images in pixels; checked against the base model (None = the model's)"""
    conditioning: Literal["none", "class", "text"] | None = None
    """Table 6.2 "Cond. Type": none, class or text; checked against the base model (None = the model's)"""
    latent: bool | None = None
    """Table 6.2 "Latent Diff."; checked against the base model (None = the model's)"""
    guidance_scale: NonNegFloat = 1.0
    """Table 6.2 "CFG Scale": classifier-free guidance weight during rollout and update (1 = none)"""
    num_steps: PosInt = TOY_SAMPLING_STEPS
    """Table 6.2 "Timesteps": denoising steps per rollout, a respaced subset of the 1000 training steps (offline default 10 for speed, as sample.py's; thesis: 25)"""
    sampler: Sampler = "ddpm"
    """thesis 5.1: ddpm (the thesis) or ddim (stochastic, --eta > 0)"""
    spacing: Spacing = "leading"
    """which training timesteps are kept: leading, trailing, linspace (diffusers) or guided (guided-diffusion)"""
    eta: NonNegFloat = 1.0
    """DDIM noise level (only with --sampler ddim)"""
    variance_type: VarianceType | None = None
    """policy std: fixed_small, fixed_large or learned_range (None = the model's scheduler config)"""
    logprob_reduction: Reduction = "sum"
    """thesis 5.3: sum the per-dimension action log-likelihoods (thesis) or mean (DDPO)"""
    class_labels: str | None = None
    """class models: comma-separated classes sampled uniformly per environment (None = all classes; thesis 6.5)"""
    prompts: str | None = None
    """text models: a .txt/.jsonl/.csv/.parquet prompt file or builtin:pink / builtin:pickscore-eval, sampled uniformly per environment (thesis 5.3)"""
    # --- reward and value function ---
    reward: str = "target"
    """Table 6.2 reward: target (Algorithm 1), colorfulness (appendix A), aesthetic (LAION Aesthetics Predictor V2), pickscore (PickScore v1), rm (a trained reward model, --reward-model) or module:function on images in [-1,1] and prompts/class labels, one number per image: e.g. my_reward.py holding `def brightness(images, cond): return images.mean((1, 2, 3))`, then --reward my_reward:brightness (the module must be importable: in the working directory or on PYTHONPATH)"""
    reward_model: str | None = None
    """--reward rm: a reward-model folder written by train_reward.py (thesis 5.2), scored on the samples themselves (latents for latent models)"""
    ensemble_penalty: NonNegFloat = 0.0
    """beyond the thesis (its 8.1): a reward model of N heads (train_reward.py --ensemble N) scores mean - k x std over its heads (Coste et al. 2023's uncertainty-weighted optimization); the heads' disagreement is logged as objective/ensemble_disagreement"""
    ensemble_reduce: Literal["penalty", "min"] = "penalty"
    """an ensemble's reward: penalty (mean - --ensemble-penalty x std) or min (the worst head, worst-case optimization)"""
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
    value_fn: Literal["cnn", "encoder", "classifier", "unet", "reward", "none"] = "cnn"
    """value function V(x_t, t, c): cnn (appendix B), encoder (small conv encoder, cf. thesis 6.5), classifier (OpenAI's ImageNet classifier + a linear layer, --classifier; thesis 6.5), unet (the reward-model architecture on the base U-Net with a new head), reward (a copy of --reward-model, Pink's choice, thesis 6.9) or none"""
    value_init: Literal["classifier", "random", "reward"] = "classifier"
    """value-function init: classifier (--value-fn cnn only: appendix B net pre-trained on noisy digits, thesis 6.4), random, or reward (the same as --value-fn reward: a copy of --reward-model, thesis 6.9)"""
    # --- reinforcement learning (Table 6.2) ---
    num_envs: PosInt = 32
    """Table 6.2 "Environments": parallel environments per epoch over all processes"""
    gamma: Fraction = 1.0
    """Table 6.2 "GAE gamma" """
    gae_lambda: Fraction = 0.95
    """Table 6.2 "GAE lambda" """
    clip_coef: PosFloat = 0.2
    """Table 6.2 "PPO Clip Coeff." (also clips the value update)"""
    vf_coef: NonNegFloat = 0.5
    """Table 6.2 "PPO VF Coeff." """
    kl_coef: NonNegFloat = 0.0
    """Table 6.2 "KL Penalty Coeff." beta of Eq. 5.3; the frozen base model is built only when > 0 (with --kl-target: the starting beta)"""
    kl_target: PosFloat | None = None
    """beyond the thesis (its 8.1): adapt beta every epoch towards this KL per sample (summed over the steps) with Ziegler et al. 2019's proportional controller; None = the fixed beta of Table 6.2"""
    kl_horizon: PosFloat = 10000.0
    """--kl-target: samples over which beta may change by the controller's full step: beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * samples per epoch / horizon (Ziegler et al. 2019)"""
    advantage: Literal["gae", "group"] = "gae"
    """gae: the critic and GAE over the denoising steps (thesis 5.3); group: no critic, each terminal reward standardized among the epoch's samples of its prompt or class (DDPO's per-prompt statistics, GRPO), minus the KL penalty still to come"""
    norm_adv: bool = True
    """normalize advantages over the whole batch of all processes (thesis 5.3)"""
    clip_vloss: bool = True
    """clip the value loss around the rollout values (thesis 5.3)"""
    update_epochs: PosInt = 1
    """passes over the rollout buffer per epoch (thesis: 1)"""
    old_logprobs: Literal["rollout", "recompute"] = "rollout"
    """log pi_old for the PPO ratio and the KL: rollout (recorded while sampling, thesis 5.3; exact in fp32 on CPU up to the rounding of batch-size-dependent matrix kernels, ~1e-4) or recompute (log pi_old from the update's own passes of --minibatch-size x --fused-minibatches states: needed with fp16/bf16 on GPU, where batch-dependent kernels move the starting ratio by up to 0.85, see losses/ratio_dev_at_start; the rollout then evaluates the policy in such passes, split or padded, so its log-probs are the pass's bit for bit and no extra pass is made, unless padding would cost more than one extra no-grad pass over the epoch's states, which is then made)"""
    minibatch_grouping: Literal["state", "trajectory"] = "state"
    """state: random states from all trajectories per minibatch (thesis 5.3); trajectory: whole trajectories (DDPO)"""
    # --- optimization (Table 6.2, "General Optimization") ---
    epochs: PosInt = 50
    """Table 6.2 "Epochs": rollout + update rounds (offline default: 50, thesis: 3000)"""
    minibatch_size: PosInt = 20
    """Table 6.2 "Minibatch Size": states per forward pass on each process (offline default 20: 16 per epoch of its 32 x 10 states; thesis: 25)"""
    policy_lr: PosFloat = 5e-5
    """Table 6.2 "Learning Rate Policy" (offline default 5e-5 to learn in minutes on CPU; thesis: 1e-7)"""
    policy_lr_early: PosFloat | None = None
    """Table 6.2 "Aesthetic Score": policy LR for the first --policy-lr-early-epochs epochs (2e-7)"""
    policy_lr_early_epochs: NonNegInt = 0
    """epochs that use --policy-lr-early"""
    vf_lr: PosFloat = 1e-3
    """Table 6.2 "Learning Rate VF" (offline default 1e-3; thesis: 1e-5)"""
    policy_warmup_steps: NonNegInt = 50
    """Table 6.2 "Warmup Steps Policy": linear warmup in optimizer steps (offline default 50; thesis: 4096)"""
    vf_warmup_steps: NonNegInt = 50
    """Table 6.2 "Warmup Steps VF" (offline default 50; thesis: 1024)"""
    adam_beta1: OpenFraction = 0.9
    """Table 6.2 "Adam beta1" (both optimizers)"""
    adam_beta2: OpenFraction = 0.999
    """Table 6.2 "Adam beta2" (both optimizers)"""
    adam_eps: PosFloat = 1e-5
    """Table 6.2 "Adam epsilon" (both optimizers)"""
    weight_decay: NonNegFloat = 0.01
    """Table 6.2 "Adam Weight Decay" (AdamW, both optimizers)"""
    grad_accum_steps: PosInt = 1
    """Table 6.2 "Grad. Accum. Steps": minibatches per optimizer step"""
    fused_minibatches: PosInt = 1
    """speed (not in the thesis): run this many minibatches of one optimizer step as one forward and backward pass; the same update up to the order of floating-point sums, for this many times the activation memory (must divide --grad-accum-steps; PPO only)"""
    max_grad_norm: PosFloat | None = 0.5
    """Table 6.2 "Grad. Clip Norm", per model (None: no clipping)"""
    # --- hardware (Table 6.2, "Hardware") ---
    precision: Precision = "fp32"
    """Table 6.2 "Precision": fp32, fp16 (autocast + GradScaler) or bf16 (autocast); log-probs always fp32"""
    tf32: bool = False
    """Table 6.2 "Allow TF32" for matmuls and convolutions on Ampere+ GPUs"""
    device: DeviceFlag = "auto"
    """auto (cuda if available), cpu or cuda"""
    gradient_checkpointing: bool = False
    """recompute U-Net activations in the backward pass (thesis 5.3): less memory for ~25 % more update time"""
    compile: bool = False
    """torch.compile the policy U-Net's forward (inductor; the first epoch pays the compilation). Checkpoints keep the uncompiled module's key names; where the rollout runs in the update's passes (its batch per process is --minibatch-size x --fused-minibatches, or with --old-logprobs recompute it is split or padded to such passes) it runs the update's graph (nothing of its own to compile; the ratio starts at exactly 1); otherwise it has its own no-grad graph, which rounds differently, so the PPO ratio starts near 1 (~1e-4 on CPU). With --kl-coef > 0 the reference policy's pass runs the update's graph too (full fine-tuning without dropout: pi_base's weights then stay fp32, in fp16/bf16 1.7 GB more for SD v1.5; the first epoch's KL is exactly 0)"""
    compile_scope: Literal["model", "blocks"] = "model"
    """with --compile (speed; not in the thesis): model compiles the U-Net's whole forward as one graph per batch shape; blocks compiles each repeated block (ResNet, transformer) on its own, one graph per block shape (regional compilation: quicker on a CPU, slower to warm up on an H100; docs/performance.md)"""
    cudnn_benchmark: bool = False
    """GPU speed (not in the thesis): cuDNN times its convolution algorithms once per input shape in the first epoch and keeps the fastest; their workspaces raise peak memory (docs/performance.md), and runs may differ in the last bits"""
    lora_rank: NonNegInt = 0
    """train low-rank adapters (peft LoRA) of this rank instead of the whole U-Net (0 = full fine-tuning, the thesis); for small GPUs. Checkpoints then hold the adapters only; the final pipeline has them merged"""
    lora_alpha: PosFloat | None = None
    """LoRA scaling numerator (None = --lora-rank, i.e. a scale of 1)"""
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    """comma-separated module names that get adapters (default: the attention projections of diffusers U-Nets)"""
    algo: Literal["ppo", "backprop"] = "ppo"
    """ppo (thesis 5.3) or backprop: loss = -reward back-propagated through the whole sampling chain, no value function, base model or KL (Table 6.2 "Macaw: Without RL", thesis 6.8)"""
    chain_checkpointing: bool = True
    """--algo backprop: keep only x_t of each denoising step and recompute its U-Net forward in the backward pass (thesis 6.8: what makes 25 steps fit in memory)"""
    # --- logging and checkpoints ---
    output_dir: str | None = None
    """run folder for TensorBoard logs, checkpoints, sample grids and the final policy (default runs/<exp>)"""
    eval_samples: PosInt = 64
    """fixed-seed samples scored before training and every --eval-every epochs"""
    eval_every: PosInt = 10
    """epochs between fixed-seed evaluations and image grids"""
    checkpoint_every: NonNegInt = 25
    """epochs between resumable checkpoints (0: only at the end)"""
    resume: str | None = None
    """continue from a checkpoint folder or a run folder (its latest checkpoint)"""
    cache_dir: str | None = None
    """where offline toy models are cached (default $DRLHF_CACHE or ~/.cache/drlhf)"""
    toy_train_steps: PosInt = TOY_TRAIN_STEPS
    """training steps of an offline toy base model on first use (fewer: faster, blurrier)"""


# ======== ALGO LOGIC: one PPO epoch, the method's step 4 (thesis 5.3), and its parts in the order they run ===
@dataclass
class Nets:
    """What an epoch trains and scores with. `policy` and `value` are what gradients go through (wrapped in
    DistributedDataParallel under torchrun); `policy_net` and `value_net` are the plain modules."""
    schedule: DiffusionSchedule   # the MDP: respaced timesteps, sampler, CFG scale, log-prob reduction
    reward_fn: Callable           # (samples, cond, prompts) -> (B,) terminal rewards
    policy: nn.Module             # the trained denoiser (--algo backprop: the whole chain) through DDP
    policy_net: nn.Module         # the plain denoiser, for rollouts without gradients
    unet: nn.Module               # the base U-Net being trained: what checkpoints save (never compiled)
    ref: nn.Module | None         # pi_base as the KL pass runs it (--compile: through the update's graph)
    ref_net: nn.Module | None     # the frozen base policy pi_base (with --kl-coef > 0 or --eval-reward)
    value: nn.Module | None       # V(x_t, t, c) through DDP (None with --value-fn none)
    value_net: nn.Module | None
    opt_pi: torch.optim.Optimizer
    opt_vf: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler  # fp16 only; a no-op otherwise


def ppo_epoch(nets: Nets, x_T, cond, prompts, groups, args: Args, state: dict, gens: dict, rank: int, device):
    """Rollout -> terminal reward + per-step KL -> values -> GAE -> PPO update, for environments starting at
    x_T (B, C, H, W) with conditions of group ids `groups` (B,) (prompt or class; --advantage group). Returns the
    rewards (B,), the KL (T, B), the update statistics and the phase times (s)."""
    T, B = nets.schedule.num_steps, len(x_T)
    t0 = time.perf_counter()
    # 1. ROLLOUT: all environments, one batch per denoising step (or the update's passes: drlhf/passes.py)
    chunk = rollout_chunk(nets.policy_net, B, args)  # the update's passes where that makes its log-probs pi_old
    shared = rollout_in_update_graph(nets.policy_net, B, args)  # --compile: one graph for both, where shapes agree
    same_mode = not mode_dependent(nets.policy_net)  # pi_old in the update's training mode where that changes nothing
    nets.policy_net.train(chunk is not None and same_mode)
    with autocast(args.precision, device):
        buf = rollout(update_graph(nets.policy_net, shared), nets.schedule, x_T, cond, generator=gens["rollout"],
                      chunk=chunk)
    sync_device(device)
    t_rollout = time.perf_counter() - t0
    orders = minibatch_orders(args, T, B, gens["shuffle"], device)  # (update_epochs, T*B)
    state_fn = lambda fn: evaluate_states(fn, buf.latents, cond, orders[0], pass_size(args), args, device)  # noqa: E731
    logprobs = buf.logprobs                                          # (T, B) log pi_old(a_t|s_t)
    if args.old_logprobs == "recompute" and not rollout_is_recompute(nets.policy_net, B, args):
        # --compile: through the update's own graph (no extra graph to compile)
        nets.policy_net.train(args.compile or same_mode)
        logprobs = state_fn(update_graph(lambda x, i, c, a: action_logprob(nets.policy_net, nets.schedule, x, i, c, a),
                                         args.compile))
    # 2. REWARD: terminal score, per-step KL to the base model (Eq. 5.3), values of every state
    scores = score_terminal(nets.reward_fn, buf.samples, cond, prompts, state["epoch"], rank)  # (B,)
    disagreement = getattr(nets.reward_fn, "ensemble", {}).get("disagreement")  # an ensemble's std over heads
    ref_logprobs = None                                              # (T, B) log pi_base(a_t|s_t)
    if nets.ref_net is not None and args.kl_coef > 0:  # (--eval-reward alone builds pi_base for the evaluations)
        ref_logprobs = state_fn(update_graph(lambda x, i, c, a: action_logprob(nets.ref, nets.schedule, x, i, c, a),
                                             reference_in_update_graph(nets.policy_net, args)))
    beta = state.get("kl_coef", args.kl_coef)                       # --kl-target adapts it every epoch
    rewards_t, kl = compute_rewards(scores, logprobs, ref_logprobs, beta)  # (T, B) each
    values = torch.zeros_like(rewards_t)                                          # (T, B) V(x_t, t, c)
    if nets.value_net is not None:
        nets.value_net.eval()
        timesteps = nets.schedule.on(nets.schedule.timesteps, device)
        values = state_fn(lambda x, i, c, a: nets.value_net(x, timesteps[i], c))
    # 3. ADVANTAGES: GAE over the denoising steps (or the critic-free group baseline)
    if args.advantage == "group":
        advantages, returns = group_advantages(scores, groups, kl, beta)                  # (T, B) each
    else:
        advantages, returns = compute_advantages(rewards_t, values, args.gamma, args.gae_lambda)  # (T, B) each
    sync_device(device)
    t_score = time.perf_counter() - t0 - t_rollout
    # 4. UPDATE: PPO over all states in random minibatches
    nets.policy_net.train()
    if nets.value_net is not None:
        nets.value_net.train()
    buf_d = dict(latents=buf.latents, logprobs=logprobs, cond=cond, values=values, returns=returns,
                 advantages=advantages)
    stats = ppo_update(nets, buf_d, orders, args, state, device)
    var_y = returns.var()
    stats["explained_variance"] = (1 - (returns - values).var() / var_y).item() if var_y > 0 else float("nan")
    stats["kl_coef"], stats["ensemble_disagreement"] = beta, disagreement
    return scores, kl, stats, dict(rollout=t_rollout, scoring=t_score)


@torch.no_grad()
def score_terminal(reward_fn, samples, cond, prompts, epoch: int, rank: int) -> torch.Tensor:
    """Terminal reward r(s_0) of each environment (B,); non-finite rewards stop training with the culprit."""
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


def group_advantages(scores, groups, kl, kl_coef: float):
    """The critic-free baseline (DDPO's per-prompt reward statistics; GRPO): each terminal reward standardized
    among all processes' samples of this epoch with the same prompt or class, minus the KL penalty from each step
    on: A_t = (r - mean_g r) / (std_g r + 1e-8) - beta * sum_{t' >= t} KL_t'. scores, groups (B,), kl (T, B) ->
    advantages and returns (T, B) (returns = advantages: there is no value function to fit)."""
    all_scores, all_groups = hardware.all_gather(scores.float()), hardware.all_gather(groups)
    norm = torch.empty_like(scores, dtype=torch.float32)
    for g in groups.unique():
        pool = all_scores[all_groups == g]
        norm[groups == g] = (scores[groups == g].float() - pool.mean()) / (pool.std(correction=0) + 1e-8)
    advantages = norm[None] - kl_coef * kl.flip(0).cumsum(0).flip(0)
    return advantages, advantages


def adapt_kl_coef(beta: float, kl: float, args: Args, n_samples: int) -> float:
    """Ziegler et al. 2019 (sec. 2.2): proportional control of beta towards --kl-target, the KL per sample summed
    over the steps: error e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * samples / --kl-horizon)."""
    error = min(max(kl / args.kl_target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_samples / args.kl_horizon)


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
        else:  # state: random states mixed across trajectories (thesis 5.3)
            orders.append(torch.randperm(T * B, generator=generator))
    return torch.stack(orders).to(device)


def select(cond, index):
    """The rows `index` of a condition batch (None stays None)."""
    return None if cond is None else cond[index.to(cond.device)]


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
        with autocast(args.precision, device):
            out[i] = fn(states[i], idx[i], select(flat_cond, i), actions[i]).float()
    return out.view(T, B)


def ppo_update(nets: Nets, buf: dict, orders, args: Args, state: dict, device) -> dict:
    """Clipped-surrogate PPO over all states of the rollout buffer (thesis 5.3), one pass per row of `orders`.
    `state["global_step"]` counts optimizer steps and sets the warmup. Returns a dict of averaged statistics."""
    T, B = buf["logprobs"].shape
    b_states = buf["latents"][:-1].flatten(0, 1)                 # (T*B, C, H, W), row i*B + e = step i of env e
    b_actions = buf["latents"][1:].flatten(0, 1)                 # (T*B, C, H, W)
    b_idx = torch.arange(T, device=device).repeat_interleave(B)  # (T*B,) step index of each state
    b_t = nets.schedule.on(nets.schedule.timesteps, device)[b_idx]              # (T*B,) training timestep
    b_cond = None if buf["cond"] is None else buf["cond"].repeat(T, *([1] * (buf["cond"].ndim - 1)))
    b_logprobs, b_values = buf["logprobs"].flatten(), buf["values"].flatten()   # (T*B,)
    b_returns = buf["returns"].flatten()                                         # (T*B,)
    b_advantages = whiten(buf["advantages"].flatten()) if args.norm_adv else buf["advantages"].flatten()
    # one pass = --fused-minibatches minibatches of one optimizer step; its mean loss / (passes per step) gives the
    # gradient of their per-minibatch losses / --grad-accum-steps
    n, mb, passes = T * B, pass_size(args), args.grad_accum_steps // args.fused_minibatches
    policy, value_fn = nets.policy, nets.value
    rows, checked = [], 0  # per pass, on the device: read once per optimizer step (no GPU sync per pass)
    for order in orders:
        for j, start in enumerate(range(0, n, mb)):
            i = order[start:start + mb]
            sync = (j + 1) % passes == 0
            with contextlib.ExitStack() as stack:
                for m in (policy, value_fn):  # accumulate locally; all-reduce only on the optimizer step
                    if isinstance(m, DDP) and not sync:
                        stack.enter_context(m.no_sync())
                with autocast(args.precision, device):
                    new_logprobs = action_logprob(policy, nets.schedule, b_states[i], b_idx[i], select(b_cond, i),
                                                  b_actions[i])
                    new_values = value_fn(b_states[i], b_t[i], select(b_cond, i)).float() if value_fn else None
                log_ratio = new_logprobs - b_logprobs[i]
                ratio = log_ratio.exp()
                adv = b_advantages[i]
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = torch.zeros((), device=device)
                if value_fn is not None:
                    v_loss = (new_values - b_returns[i]) ** 2
                    if args.clip_vloss:
                        v_clipped = b_values[i] + (new_values - b_values[i]).clamp(-args.clip_coef, args.clip_coef)
                        v_loss = torch.max(v_loss, (v_clipped - b_returns[i]) ** 2)
                    v_loss = 0.5 * v_loss.mean()
                loss = (pg_loss + args.vf_coef * v_loss) / passes
                nets.scaler.scale(loss).backward()
            with torch.no_grad():
                rows.append(torch.stack([loss, pg_loss, v_loss, ((ratio - 1) - log_ratio).mean(),  # k3 of the step
                                         ((ratio - 1).abs() > args.clip_coef).float().mean(), ratio.mean(),
                                         (ratio - 1).abs().max(), log_ratio.abs().max()]).float())
            if sync:  # a non-finite loss stops training before the optimizer step it would spoil
                check_finite_losses(rows, checked, state["epoch"])
                checked = len(rows)
                optimizer_step(nets, args, state)
    table = torch.stack(rows).cpu()  # (passes, 8)
    stats = dict(zip(("pg_loss", "v_loss", "approx_kl", "clipfrac", "ratio"), table[:, 1:6].double().mean(0).tolist()))
    stats["ratio_dev_at_start"] = table[0, 6].item()  # max |ratio - 1| of the first pass, before any step
    return stats


def check_finite_losses(rows: list, start: int, epoch: int):
    """Raise at the first non-finite PPO loss among the minibatches rows[start:] (one GPU sync)."""
    block = torch.stack(rows[start:]).cpu()
    bad = (~torch.isfinite(block[:, 0])).nonzero().flatten()
    if len(bad):
        _, pg, v, *_, max_log_ratio = block[bad[0]].tolist()
        raise FloatingPointError(f"epoch {epoch}: non-finite PPO loss (policy {pg}, value {v}, max |log-ratio| "
                                 f"{max_log_ratio:.3g}); try --logprob-reduction mean or a lower --policy-lr")


def optimizer_step(nets: Nets, args: Args, state: dict) -> torch.Tensor:
    """Unscale, clip (Table 6.2 "Grad. Clip Norm", each model on its own), step and zero both optimizers; the
    warmup schedule then moves one optimizer step on. Returns the policy's gradient norm before clipping."""
    norms = []
    for opt in (nets.opt_pi, nets.opt_vf):
        if opt is None:
            continue
        nets.scaler.unscale_(opt)
        params = [p for group in opt.param_groups for p in group["params"]]
        norms.append(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")))
        nets.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    nets.scaler.update()
    state["global_step"] += 1
    set_lrs(nets.opt_pi, nets.opt_vf, args, state)
    return norms[0]


# -------- ALGO LOGIC: without RL, the reward back-propagated through the sampling chain (thesis 6.8) -------
def backprop_update(nets: Nets, x_T, noise, cond, prompts, args: Args, state: dict, device):
    """Table 6.2 "Macaw: Without RL": each minibatch of --minibatch-size / T images is sampled through the whole
    chain with gradients (`nets.policy` = a ReparameterizedChain, DDP-wrapped under torchrun), scored by the frozen
    reward, and loss = -reward is back-propagated; the gradients of --grad-accum-steps minibatches make one
    optimizer step (thesis: 8 minibatches of 4 images = all 32 environments). x_T (B, C, H, W), noise (T, B, C, H, W).
    Returns the rewards (B,) and averaged statistics."""
    B, n_img = len(x_T), args.minibatch_size // len(noise)
    chain = nets.policy
    scores, stats = [], {"loss": [], "grad_norm": []}
    for j, start in enumerate(range(0, B, n_img)):
        i = torch.arange(start, start + n_img, device=device)
        sync = (j + 1) % args.grad_accum_steps == 0
        with chain.no_sync() if isinstance(chain, DDP) and not sync else contextlib.nullcontext():
            with autocast(args.precision, device):
                x_0 = chain(x_T[i], select(cond, i), noise[:, i])                         # (n, C, H, W)
            mb_prompts = None if prompts is None else [prompts[k] for k in i.tolist()]
            r = torch.as_tensor(nets.reward_fn(x_0.float(), select(cond, i), mb_prompts)).float().flatten()  # (n,)
            if not torch.isfinite(r).all():
                bad = (~torch.isfinite(r)).nonzero()[0].item()
                raise FloatingPointError(f"epoch {state['epoch']}: the reward of sample {start + bad} is {r[bad].item()};"
                                         " stopping before the update so that no checkpoint is written from it")
            if not r.requires_grad:
                raise ValueError(f"--algo backprop: --reward {args.reward} gives no gradient (it is not a torch "
                                 "function of the samples); use --reward rm or target, or a differentiable module:function")
            loss = -r.mean() / args.grad_accum_steps  # thesis 6.8: loss = -reward
            nets.scaler.scale(loss).backward()
        if sync:
            stats["grad_norm"].append(optimizer_step(nets, args, state).item())
        stats["loss"].append(loss.item() * args.grad_accum_steps)
        scores.append(r.detach())
    return torch.cat(scores), {k: float(np.mean(v)) for k, v in stats.items()}


def set_lr(optimizer, lr: float, step: int, warmup: int):
    """Constant LR after a linear warmup over `warmup` optimizer steps (thesis 5.3)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))


def set_lrs(opt_pi, opt_vf, args: Args, state: dict):
    early = args.policy_lr_early is not None and state["epoch"] < args.policy_lr_early_epochs  # Table 6.2 Aesthetic
    set_lr(opt_pi, args.policy_lr_early if early else args.policy_lr, state["global_step"], args.policy_warmup_steps)
    if opt_vf is not None:
        set_lr(opt_vf, args.vf_lr, state["global_step"], args.vf_warmup_steps)


# ======== SETUP: arguments, batch arithmetic, networks, conditions =========================================
def parse_args(argv=None):
    """default < preset (drlhf.presets) < command line; returns the Args and the set of flags given."""
    return cli.parse_args(Args, presets.for_script("train_ppo"), argv)


def resolve_args(argv=None):
    """The Args of this run; with --resume also the checkpoint folder and its saved state (drlhf.checkpoint)."""
    args, given = parse_args(argv)
    args, ckpt, saved = checkpoint.resume_args(args, given, Args) if args.resume else (args, None, None)
    check_requirements(args)
    if "compile_scope" in given and not args.compile:
        print("[drlhf] warning: --compile-scope has no effect without --compile true", file=sys.stderr)
    return args, ckpt, saved


def check_requirements(args: Args):
    """Stop early, before loading anything large, when a preset needs parts that are not available here."""
    if args.algo == "backprop" and (args.value_fn != "none" or args.kl_coef):
        raise SystemExit(f"--algo backprop (thesis 6.8) has no value function and no KL penalty: pass --value-fn none "
                         f"and --kl-coef 0 (got --value-fn {args.value_fn}, --kl-coef {args.kl_coef})")
    if (args.reward == "rm" or "reward" in (args.value_fn, args.value_init)) and not args.reward_model:
        raise SystemExit(f"--reward {args.reward} / --value-fn {args.value_fn}: pass --reward-model DIR, a folder "
                         "written by train_reward.py")
    if args.kl_target is not None and not args.kl_coef:
        raise SystemExit("--kl-target adapts beta from its start: pass --kl-coef > 0 as the starting value")
    if args.advantage == "group" and args.value_fn != "none":
        raise SystemExit(f"--advantage group has no critic: pass --value-fn none (got --value-fn {args.value_fn})")
    if args.value_fn == "classifier" and not args.classifier:
        raise SystemExit("--value-fn classifier needs --classifier guided-diffusion:/path/to/64x64_classifier.pt "
                         "(OpenAI's noisy-image classifier); offline stand-in: --exp digits-colorfulness")
    if args.precision != "fp32" and args.old_logprobs == "rollout":
        print(f"[drlhf] warning: --precision {args.precision} with --old-logprobs rollout: on GPUs the PPO ratio and "
              "the KL then start away from 1 and 0 (see losses/ratio_dev_at_start); --old-logprobs recompute fixes it",
              file=sys.stderr)


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
    if args.grad_accum_steps % args.fused_minibatches:
        raise SystemExit(f"--fused-minibatches ({args.fused_minibatches}) runs minibatches of one optimizer step "
                         f"together: it must divide --grad-accum-steps ({args.grad_accum_steps})")
    if args.algo == "backprop" and args.fused_minibatches > 1:
        raise SystemExit(f"--fused-minibatches ({args.fused_minibatches}) is for --algo ppo; --algo backprop's "
                         "minibatches are --minibatch-size / --num-steps whole chains")
    return B, n_states, n_minibatches


def load_models(args: Args, rank: int, world: int, device):
    """The base model (VAE and text encoder frozen, in half precision on GPU), the value network, the rollout
    schedule and the reward functions (the optimized one first, then --eval-reward)."""
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 trains and caches toy models first; the others then read the cache
    frozen_dtype = torch.float16 if device.type == "cuda" and args.precision != "fp32" else torch.float32
    base = models.load_base_model(args.pretrained, device, args.cache_dir, weights_dtype=frozen_dtype,
                                  toy_train_steps=args.toy_train_steps)
    torch.manual_seed(args.seed)  # the same value-function init whether or not a toy model was just trained
    value_net = make_value_fn(args.value_fn, args.value_init, base, args.reward_model, args.classifier,
                              args.cache_dir)
    if world > 1 and rank == 0:
        dist.barrier()
    base.expect(resolution=args.resolution, conditioning=args.conditioning, latent=args.latent)  # Table 6.2 rows
    schedule = DiffusionSchedule.for_model(base.scheduler_config, base.is_latent, args.sampler, args.num_steps,
                                           args.spacing, args.eta, args.variance_type, args.guidance_scale,
                                           args.logprob_reduction)
    reward_fns = [rewards.from_flags(spec, base, device, args, flag) for spec, flag in
                  ((args.reward, "--reward"), (args.eval_reward, "--eval-reward")) if spec]
    return base, value_net, schedule, reward_fns


def build_nets(args: Args, base, value_net, schedule, reward_fn, world: int, device) -> Nets:
    """The trained policy (full U-Net or LoRA adapters; --algo backprop: the whole chain), the frozen reference
    policy, the value function, DDP wrappers, AdamW optimizers (Table 6.2 "General Optimization") and GradScaler."""
    base.unet.requires_grad_(True).train()
    if args.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    policy_net = models.make_denoiser(base, args.guidance_scale)
    # --compile: the KL pass through the update's graph, which guards on requires_grad and runs in training mode
    shared_ref = reference_in_update_graph(policy_net, args)  # (pi_base's weights are never given to an optimizer)
    ref_net = None
    if args.kl_coef > 0 or args.eval_reward:  # the frozen base policy pi_base: the KL penalty; KL of the evaluations
        ref_net = copy.deepcopy(policy_net).requires_grad_(shared_ref).train(shared_ref)
    if args.lora_rank:  # low-rank adapters on the attention projections; the base weights stay frozen
        models.add_lora(base.unet, args.lora_rank, args.lora_alpha or args.lora_rank, args.lora_targets.split(","))
    value_net = value_net.to(device) if value_net is not None else None
    for frozen in (ref_net, base.unet if args.lora_rank else None, value_net):  # GPU fp16/bf16: weights not cast
        if frozen is not None:                                                    # at every forward (no-op on CPU)
            hardware.hold_frozen_in_compute_dtype(frozen, args.precision, device)
    if args.compile:  # only the policy's forward is compiled; base.unet (saved, checkpointed) stays the plain module
        policy_net.unet = hardware.compile_module(base.unet, args.cache_dir, args.compile_scope)
    ref = ref_net
    if shared_ref:  # the KL pass through the update's graph: pi_base's weights as the graph's inputs
        ref = models.Denoiser(hardware.compile_module(ref_net.unet, args.cache_dir, args.compile_scope),
                              ref_net.conditioning, ref_net.guidance_scale, ref_net.null_cond)
    # thesis 6.8: with --algo backprop the whole sampling chain is the one differentiable forward
    trained = ReparameterizedChain(policy_net, schedule, args.chain_checkpointing) if args.algo == "backprop" else policy_net
    ids = [device] if device.type == "cuda" else None
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay,
                fused=device.type == "cuda" or None)  # GPU: one fused kernel per step instead of foreach ones
    return Nets(schedule=schedule, reward_fn=reward_fn, policy_net=policy_net, unet=base.unet, ref=ref, ref_net=ref_net,
                policy=DDP(trained, device_ids=ids, broadcast_buffers=False) if world > 1 else trained,
                value_net=value_net,
                value=(DDP(value_net, device_ids=ids) if world > 1 else value_net) if value_net else None,
                opt_pi=torch.optim.AdamW([p for p in base.unet.parameters() if p.requires_grad], lr=args.policy_lr, **adam),
                opt_vf=torch.optim.AdamW(value_net.parameters(), lr=args.vf_lr, **adam) if value_net else None,
                scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))


def setup(args: Args, rank: int, world: int, device):
    """Seeds, TF32, batch sizes, models and networks, the prompt table and the random generators of one process
    (also what benchmarks/epoch.py times). Returns (base, nets, reward_fns, prompts, prompt_embeds, gens, sizes)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # Table 6.2 "Allow TF32"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # no effect on CPU
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    sizes = batch_arithmetic(args, world)
    base, value_net, schedule, reward_fns = load_models(args, rank, world, device)
    nets = build_nets(args, base, value_net, schedule, reward_fns[0], world, device)
    if rank == 0:
        for line in rollout_notes(nets.policy_net, sizes[0], args):  # what --compile and the pi_old recompute cost
            print(line)
    prompts, prompt_embeds = prompt_table(args.prompts, base) if base.conditioning == "text" else (None, None)
    gens = {"rollout": torch.Generator(device).manual_seed(args.seed + rank),
            "shuffle": torch.Generator().manual_seed(args.seed + 7919 * (rank + 1))}
    return base, nets, reward_fns, prompts, prompt_embeds, gens, sizes


# ======== main: set up, loop over epochs, finish ===========================================================
def train_epoch(nets: Nets, base, args: Args, state: dict, gens: dict, prompts, prompt_embeds, B: int, rank: int,
                device):
    """One epoch of this process's B environments: conditions and initial noise drawn, then `ppo_epoch` (or
    `backprop_update` with --algo backprop). Returns the rewards (B,), the KL (T, B), statistics, phase times."""
    cond, cond_prompts = sample_conditions(base, args.class_labels, B, gens["shuffle"], prompts, prompt_embeds)
    cond = None if cond is None else cond.to(device)
    x_T = torch.randn((B, *base.sample_shape), generator=gens["rollout"], device=device)
    if args.algo == "ppo":  # group ids for --advantage group: the class, the prompt's row, or one group
        groups = (cond if base.conditioning == "class" else torch.tensor([prompts.index(p) for p in cond_prompts])
                  if cond_prompts else torch.zeros(B, dtype=torch.long)).to(device)
        return ppo_epoch(nets, x_T, cond, cond_prompts, groups, args, state, gens, rank, device)
    # thesis 6.8: sample with gradients, loss = -reward, no RL
    noise = torch.randn((args.num_steps, *x_T.shape), generator=gens["rollout"], device=device)  # (T, B, C, H, W)
    nets.policy_net.train()
    scores, stats = backprop_update(nets, x_T, noise, cond, cond_prompts, args, state, device)
    return scores, torch.zeros(args.num_steps, B, device=device), stats, {}


def main(argv=None):
    args, ckpt, saved = resolve_args(argv)
    rank, world, device = hardware.setup_distributed(args.device)
    out = Path(args.output_dir or f"runs/{args.exp or 'digits-target'}")
    base, nets, reward_fns, prompts, prompt_embeds, gens, sizes = setup(args, rank, world, device)
    B = sizes[0]
    lineage = checkpoint.start_lineage(base)  # the rounds of RLHF behind the policy this run starts from
    state = {"epoch": 0, "global_step": 0} | ({"kl_coef": args.kl_coef} if args.kl_target else {})
    # the fixed-seed evaluation runs eagerly: compiling its batch size too would only add warm-up
    eval_net = models.make_denoiser(base, args.guidance_scale) if args.compile else nets.policy_net
    evaluator = evaluation.FixedSeedEval(eval_net, nets.schedule, base, reward_fns, args.eval_samples, args.seed,
                                         args.precision, device, args.class_labels, prompts, prompt_embeds,
                                         ref=nets.ref_net if args.eval_reward else None)
    if args.resume:
        state = checkpoint.restore_checkpoint(ckpt, saved, base.unet, nets.value_net, nets.opt_pi, nets.opt_vf,
                                              nets.scaler, gens, rank, world, adapters_only=bool(args.lora_rank))
    set_lrs(nets.opt_pi, nets.opt_vf, args, state)
    writer = tracking.start_run(out, args, base, nets.schedule, evaluator, state, sizes, world) if rank == 0 else None
    state = hardware.broadcast_object(state)  # every rank keeps rank 0's state dict (rank 0 saves it)

    from tqdm.auto import tqdm
    epoch_times, compile_log = [], tracking.CompileLog() if args.compile else None
    bar = tqdm(range(state["epoch"], args.epochs), initial=state["epoch"], total=args.epochs, disable=rank != 0,
               desc=f"{args.algo} epochs", unit="epoch")
    for epoch in bar:
        state["epoch"] = epoch
        t0 = time.perf_counter()
        scores, kl, stats, times = train_epoch(nets, base, args, state, gens, prompts, prompt_embeds, B, rank, device)
        beta = state.get("kl_coef", args.kl_coef)
        pooled = tracking.pool_rewards(scores, kl, beta, B * world)  # all ranks' rewards and KL
        if args.kl_target:  # the KL penalty's beta towards --kl-target (Ziegler et al. 2019), for the next epoch
            state["kl_coef"] = adapt_kl_coef(beta, pooled[4].item(), args, B * world)
        sync_device(device)
        epoch_times.append(time.perf_counter() - t0)
        hardware.balance_cpu_threads()  # CPU: torch threads = the cores other processes leave free
        if compile_log:
            compile_log.epoch(writer, epoch, epoch_times[-1])
        if rank == 0:
            tracking.log_ppo_epoch(writer, bar, epoch, args.algo, pooled, scores, kl, stats, state, nets.opt_pi,
                                   nets.opt_vf, times, epoch_times[-1], B * world, device)
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                evaluator.log(writer, out, epoch, state)
        if args.checkpoint_every and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
            state["epoch"] = epoch + 1
            checkpoint.save_checkpoint(out, epoch + 1, base.unet, nets.value_net, nets.opt_pi, nets.opt_vf, nets.scaler,
                                       state, dataclasses.asdict(args), gens, rank, adapters_only=bool(args.lora_rank))
    state["epoch"] = args.epochs
    if rank == 0:  # the policy as a diffusers pipeline, before/after pictures, summary.json
        models.save_pipeline(models.merge_lora(base.unet) if args.lora_rank else base.unet, base, out / "final_policy")
        lineage = checkpoint.record_round(lineage, out, dataclasses.asdict(args))  # iterated RLHF: this run = a round
        checkpoint.write_lineage(out / "final_policy", lineage)
        scores = dict(evaluator.finish(out, state, args.eval_reward), lineage=lineage)
        tracking.write_summary(out, scores, args.epochs, epoch_times, B * world, device)
        print(f"[drlhf] policy saved to {out / 'final_policy'}, summary in {out / 'summary.json'}")
        writer.close()
    hardware.cleanup_distributed()


if __name__ == "__main__":
    cli.run(main)  # bad input: one line and exit code 1 (drlhf.cli.UserError and its kin)
