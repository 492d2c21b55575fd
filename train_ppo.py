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
    python train_ppo.py --exp macaw-norl --reward-model runs/reward-macaw   # Table 6.2 "Macaw: Without RL"
    python train_ppo.py --exp pink --reward-model DIR --gradient-checkpointing true --lora-rank 8   # one small GPU

With --algo backprop (thesis 6.8) an epoch is instead: sample every environment through the whole chain with
gradients, loss = -reward of the frozen reward model. How an epoch runs its networks (chunks, compiled graphs,
the pi_old recompute) is decided once at set-up, in drlhf/plan.py; the run folder is drlhf/checkpoint.py's.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from drlhf import checkpoint, cli, distributed, evaluation, models, presets, rewards, speed, tracking
from drlhf.cli import Fraction, NonNegFloat, NonNegInt, OpenFraction, PosFloat, PosInt, Seed
from drlhf.distributed import DeviceFlag, Precision, all_reduce_sum, autocast
from drlhf.nets import Nets, build_nets, load_models
from drlhf.plan import Accumulation, EpochPlan
from drlhf.prompts import prompt_table, sample_conditions
from drlhf.ptx import PtxData
from drlhf.sampler import Reduction, Sampler, Spacing, VarianceType, action_logprob
from drlhf.toys import TOY_SAMPLING_STEPS, TOY_TRAIN_STEPS


@dataclass
class Args:
    exp: str | None = None
    """preset: a Table 6.2 column or an offline stand-in (drlhf/presets.py; listed below)"""
    seed: Seed = 0
    """base seed; rank r samples with seed + r"""
    # --- Table 6.2, one field per row, in the table's order --------------------------------------------------
    pretrained: str = "toy:digit4"
    """"Base Policy": diffusers folder, hub id, guided-diffusion:PATH or toy:digit4 / digit4-32 / digits-rgb"""
    resolution: PosInt | None = None
    """"Resolution" in pixels, checked against the base model (None = the model's)"""
    conditioning: Literal["none", "class", "text"] | None = None
    """"Cond. Type", checked against the base model (None = the model's)"""
    guidance_scale: NonNegFloat = 1.0
    """"CFG Scale": classifier-free guidance weight in rollout and update (1 = none)"""
    latent: bool | None = None
    """"Latent Diff.", checked against the base model (None = the model's)"""
    num_steps: PosInt = TOY_SAMPLING_STEPS
    """"Timesteps": denoising steps per rollout, respaced from the training steps (offline default 10; thesis 25)"""
    reward: str = "target"
    """"Reward": target, colorfulness, aesthetic, pickscore, rm (--reward-model) or module:function (README)"""
    num_envs: PosInt = 32
    """"Environments": parallel environments per epoch over all processes"""
    gamma: Fraction = 1.0
    """"GAE gamma" """
    gae_lambda: Fraction = 0.95
    """"GAE lambda" """
    clip_coef: PosFloat = 0.2
    """"PPO Clip Coeff." (also clips the value update)"""
    vf_coef: NonNegFloat = 0.5
    """"PPO VF Coeff." """
    kl_coef: NonNegFloat = 0.0
    """"KL Penalty Coeff.": beta of Eq. 5.3 (with --kl-target its start); the frozen base model is built only when > 0"""
    epochs: PosInt = 50
    """"Epochs": rollout + update rounds (offline default 50; thesis 3000)"""
    minibatch_size: PosInt = 20
    """"Minibatch Size": states per minibatch on each process (offline default 20; thesis 25)"""
    policy_lr: PosFloat = 5e-5
    """"Learning Rate Policy" (offline default 5e-5 to learn in minutes on a CPU; thesis 1e-7)"""
    policy_lr_early: PosFloat | None = None
    """"Learning Rate Policy" of Aesthetic Score: the policy LR of the first --policy-lr-early-epochs epochs (2e-7)"""
    policy_lr_early_epochs: NonNegInt = 0
    """epochs that use --policy-lr-early (Aesthetic Score: 100)"""
    vf_lr: PosFloat = 1e-3
    """"Learning Rate VF" (offline default 1e-3; thesis 1e-5)"""
    policy_warmup_steps: NonNegInt = 50
    """"Warmup Steps Policy": linear warmup in optimizer steps (offline default 50; thesis 4096)"""
    vf_warmup_steps: NonNegInt = 50
    """"Warmup Steps VF" (offline default 50; thesis 1024)"""
    adam_beta1: OpenFraction = 0.9
    """"Adam beta1" (both optimizers)"""
    adam_beta2: OpenFraction = 0.999
    """"Adam beta2" (both optimizers)"""
    adam_eps: PosFloat = 1e-5
    """"Adam epsilon" (both optimizers)"""
    weight_decay: NonNegFloat = 0.01
    """"Adam Weight Decay" (AdamW, both optimizers)"""
    grad_accum_steps: PosInt = 1
    """"Grad. Accum. Steps": minibatches per optimizer step"""
    max_grad_norm: PosFloat | None = 0.5
    """"Grad. Clip Norm", per model (None: no clipping)"""
    precision: Precision = "fp32"
    """"Precision": fp32, fp16 (autocast + GradScaler) or bf16 (autocast); log-probs always fp32"""
    tf32: bool = False
    """"Allow TF32" for matmuls and convolutions on Ampere+ GPUs"""
    # --- the method's options (thesis 5.1-5.3, its future work 8.1, and the field's variants) ---------------
    sampler: Sampler | None = None
    """thesis 5.1: ddpm (the thesis), ddim (stochastic, --eta > 0), or flow (rectified-flow models such as SD3);
    None = the model's own: flow for a rectified-flow model, else ddpm"""
    spacing: Spacing = "leading"
    """which training timesteps are kept: leading, trailing, linspace (diffusers) or guided (guided-diffusion)"""
    eta: NonNegFloat = 1.0
    """step noise: DDIM's eta (--sampler ddim) or the flow SDE's noise level a (--sampler flow; Flow-GRPO's 0.7)"""
    variance_type: VarianceType | None = None
    """policy std: fixed_small, fixed_large or learned_range (None = the model's scheduler config)"""
    logprob_reduction: Reduction = "sum"
    """thesis 5.3: sum the per-dimension action log-likelihoods (thesis) or mean (DDPO)"""
    class_labels: str | None = None
    """class models: comma-separated classes sampled uniformly per environment (None = all; thesis 6.5)"""
    prompts: str | None = None
    """text models: a .txt/.jsonl/.csv/.parquet prompt file or builtin:pink / builtin:pickscore-eval (thesis 5.3)"""
    reward_model: str | None = None
    """--reward rm: a reward-model folder written by train_reward.py (thesis 5.2)"""
    ensemble_penalty: NonNegFloat = 0.0
    """an N-head reward model (train_reward.py --ensemble N) scores mean - k x std of its heads (thesis 8.1)"""
    ensemble_reduce: Literal["penalty", "min"] = "penalty"
    """an ensemble's reward: penalty (mean - --ensemble-penalty x std) or min (the worst head)"""
    eval_reward: str | None = None
    """an extra score of the fixed-seed samples, never optimized: a --reward name or module:function (a gold score)"""
    classifier: str | None = None
    """--value-fn classifier: OpenAI's noisy-image classifier, guided-diffusion:PATH (thesis 6.5)"""
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    """--reward pickscore: the CLIP preference model, hub id or folder (thesis 6.10)"""
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """--reward pickscore: the CLIP processor, hub id or folder"""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """--reward aesthetic: the CLIP image encoder of the LAION Aesthetics Predictor V2 (thesis 6.6)"""
    aesthetic_mlp: str = rewards.AESTHETIC_MLP_URL
    """--reward aesthetic: the predictor's MLP weights (path or URL, read with weights_only)"""
    target_image: str | None = None
    """--reward target: the target image (default: the bold slanted 4 in drlhf/assets)"""
    value_fn: Literal["cnn", "encoder", "classifier", "unet", "reward", "none"] = "cnn"
    """V(x_t, t, c): cnn (appendix B), encoder, classifier (thesis 6.5), unet (the reward-model architecture),
    reward (a copy of --reward-model, Pink, thesis 6.9) or none (drlhf/value.py)"""
    value_init: Literal["classifier", "random", "reward"] = "classifier"
    """classifier (--value-fn cnn: appendix B's net pre-trained on noisy digits, thesis 6.4), random, or reward"""
    kl_target: PosFloat | None = None
    """adapt beta each epoch towards this KL per sample (Ziegler et al. 2019; thesis 8.1); None = fixed beta"""
    kl_horizon: PosFloat = 10000.0
    """--kl-target: samples over which beta may change by the controller's full step (Ziegler et al. 2019)"""
    advantage: Literal["gae", "group"] = "gae"
    """gae: the critic and GAE over the denoising steps (thesis 5.3); group: critic-free (DDPO, GRPO)"""
    group_size: PosInt = 1
    """environments per drawn prompt or class, per process: --advantage group's groups (Flow-GRPO: 12-24; 1 = thesis)"""
    norm_adv: bool = True
    """normalize advantages over the whole batch of all processes (thesis 5.3)"""
    clip_vloss: bool = True
    """clip the value loss around the rollout values (thesis 5.3)"""
    update_epochs: PosInt = 1
    """passes over the rollout buffer per epoch (thesis: 1)"""
    old_logprobs: Literal["rollout", "recompute"] = "rollout"
    """log pi_old: rollout (recorded while sampling, thesis 5.3) or recompute (fp16/bf16 GPUs; docs/performance.md)"""
    ptx_coef: NonNegFloat = 0.0
    """PPO-ptx (Ouyang et al. 2022; thesis 8.1): add this x the base model's denoising loss on --ptx-data to the
    policy loss, against collapse (0 = off; drlhf/ptx.py)"""
    ptx_data: str = "base"
    """--ptx-coef: a folder of images, or base: the base model's own samples, made once and cached"""
    ptx_samples: PosInt = 256
    """--ptx-data base: how many base-model samples"""
    minibatch_grouping: Literal["state", "trajectory"] = "state"
    """state: random states from all trajectories per minibatch (thesis 5.3); trajectory: whole ones (DDPO)"""
    algo: Literal["ppo", "backprop"] = "ppo"
    """ppo (thesis 5.3) or backprop: -reward through the sampling chain ("Macaw: Without RL", thesis 6.8)"""
    chain_checkpointing: bool = True
    """--algo backprop: recompute each step's U-Net forward in the backward pass (thesis 6.8)"""
    # --- the run: device, logging, checkpoints ----------------------------------------------------------------
    device: DeviceFlag = "auto"
    """auto (cuda if available), cpu or cuda"""
    output_dir: str | None = None
    """the run folder (default runs/<exp>); one that holds a run is refused unless --resume or --replace-run"""
    replace_run: bool = False
    """start over in an --output-dir that holds a run: the old run is moved aside to DIR.old-N first, never mixed"""
    eval_samples: PosInt = 64
    """fixed-seed samples scored before training and every --eval-every epochs"""
    eval_every: PosInt = 10
    """epochs between fixed-seed evaluations and image grids"""
    checkpoint_every: NonNegInt = 25
    """epochs between resumable checkpoints (0: only at the end)"""
    resume: str | None = None
    """continue a run folder (its latest checkpoint) or branch from a checkpoint folder (docs/failures.md)"""
    cache_dir: str | None = None
    """where offline toy models are cached (default $DRLHF_CACHE or ~/.cache/drlhf)"""
    toy_train_steps: PosInt = TOY_TRAIN_STEPS
    """training steps of an offline toy base model on first use (fewer: faster, blurrier)"""
    # --- speed and memory (not in the thesis; the same method, docs/performance.md) --------------------------
    threads: PosInt | None = None
    """CPU threads per process, fixed for the run and reused by --resume (None = $OMP_NUM_THREADS, or the usable
    cores / local processes); the numbers depend on it"""
    fused_minibatches: PosInt = 1
    """minibatches of one optimizer step run as one forward/backward pass (divides --grad-accum-steps)"""
    gradient_checkpointing: bool = False
    """recompute U-Net activations in the backward pass (thesis 5.3): less memory for ~25 % more update time"""
    compile: bool = False
    """torch.compile the policy's forward (the first epoch pays the compilation; docs/performance.md)"""
    compile_scope: Literal["model", "blocks"] = "model"
    """--compile: model (one graph per batch shape) or blocks (each repeated block on its own; docs/performance.md)"""
    cudnn_benchmark: bool = False
    """GPU: cuDNN picks the fastest convolution per shape in the first epoch (more memory; last bits may differ)"""
    lora_rank: NonNegInt = 0
    """train peft LoRA adapters of this rank instead of the whole U-Net (0 = full fine-tuning, the thesis)"""
    lora_alpha: PosFloat | None = None
    """LoRA scaling numerator (None = --lora-rank, a scale of 1)"""
    lora_targets: str | None = None
    """comma-separated module names that get adapters (None = the model family's attention projections,
    drlhf/families)"""


# ======== ALGO LOGIC: one PPO epoch, the method's step 4 (thesis 5.3), and its parts in the order they run ===
def ppo_epoch(nets: Nets, plan: EpochPlan, kl_ctl: KLController, x_T, cond, prompts, groups, args: Args,
              state: dict, gens: dict, rank: int):
    """Rollout -> terminal reward + per-step KL -> values -> GAE -> PPO update, for environments starting at x_T
    (B, C, H, W) with conditions of group ids `groups` (B,). Returns the rewards (B,), the KL (T, B), the update's
    statistics and the phase times (s). `plan` says how the networks are run (drlhf/plan.py), not what they compute."""
    T, B = nets.schedule.num_steps, len(x_T)
    timer = tracking.PhaseTimer(x_T.device)
    # 1. ROLLOUT: every environment through the reverse process, with log pi_old(a_t|s_t) of each action
    buf = plan.rollout(x_T, cond, gens["rollout"])                   # latents (T+1, B, C, H, W), logprobs (T, B)
    timer.lap("rollout")
    orders = minibatch_orders(args, T, B, gens["shuffle"], x_T.device)   # (update_epochs, T*B) the update's order
    logprobs = plan.old_logprobs(buf, orders[0])                     # (T, B) log pi_old(a_t|s_t)
    # 2. REWARD: terminal score, per-step KL to the base model (Eq. 5.3)
    scores = score_terminal(nets.reward_fn, buf.samples, cond, prompts, state["epoch"], rank)  # (B,)
    ref_logprobs = plan.ref_logprobs(buf, orders[0])                 # (T, B) log pi_base(a_t|s_t); None if beta = 0
    rewards_t, kl = compute_rewards(scores, logprobs, ref_logprobs, kl_ctl.beta)  # (T, B) each
    # 3. ADVANTAGES: GAE over the denoising steps with the critic's values (or the critic-free group baseline)
    values = plan.values(buf, orders[0])                             # (T, B) V(x_t, t, c); 0 without a critic
    if args.advantage == "group":
        advantages, returns = group_advantages(scores, groups, kl, kl_ctl.beta)                  # (T, B) each
    else:
        advantages, returns = compute_advantages(rewards_t, values, args.gamma, args.gae_lambda)  # (T, B) each
    timer.lap("scoring")
    # 4. UPDATE: PPO over all states in random minibatches
    batch = dict(latents=buf.latents, logprobs=logprobs, cond=cond, values=values, returns=returns,
                 advantages=advantages)
    stats = ppo_update(nets, plan, batch, orders, args, state)
    stats.update(explained_variance=explained_variance(values, returns), kl_coef=kl_ctl.beta,
                 ensemble_disagreement=getattr(nets.reward_fn, "ensemble", {}).get("disagreement"))
    return scores, kl, stats, timer.times


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
    all_scores, all_groups = distributed.all_gather(scores.float()), distributed.all_gather(groups)
    norm = torch.empty_like(scores, dtype=torch.float32)
    for g in groups.unique():
        pool = all_scores[all_groups == g]
        norm[groups == g] = (scores[groups == g].float() - pool.mean()) / (pool.std(correction=0) + 1e-8)
    advantages = norm[None] - kl_coef * kl.flip(0).cumsum(0).flip(0)
    return advantages, advantages


def explained_variance(values, returns) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the returns the critic explains (nan without spread)."""
    var_y = returns.var()
    return (1 - (returns - values).var() / var_y).item() if var_y > 0 else float("nan")


class KLController:
    """The owner of beta, the KL penalty's coefficient in Eq. 5.3: fixed (Table 6.2 "KL Penalty Coeff."), or with
    a target (--kl-target) adapted once per epoch by Ziegler et al. 2019's proportional controller (sec. 2.2):
    e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * samples / horizon), KL per sample summed over
    the steps. An adaptive beta is part of the resumable state (`state()`)."""

    def __init__(self, beta: float, target: float | None = None, horizon: float = 10000.0):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_samples: int):
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta = self.beta * (1.0 + error * n_samples / self.horizon)

    def state(self) -> dict:
        return {"kl_coef": self.beta} if self.target is not None else {}


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


def ppo_loss(new_logprobs, logprobs, advantages, new_values, values, returns, args: Args):
    """The clipped PPO objective of one minibatch (thesis 5.3): the clipped surrogate policy loss plus --vf-coef x
    the (clipped) value loss. new_values is None without a critic. Returns the loss and its statistics by name."""
    log_ratio = new_logprobs - logprobs                          # log pi_theta(a|s) - log pi_old(a|s)
    ratio = log_ratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    v_loss = torch.zeros((), device=ratio.device)
    if new_values is not None:
        v_loss = (new_values - returns) ** 2
        if args.clip_vloss:
            v_clipped = values + (new_values - values).clamp(-args.clip_coef, args.clip_coef)
            v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
        v_loss = 0.5 * v_loss.mean()
    with torch.no_grad():
        stats = dict(pg_loss=pg_loss, v_loss=v_loss, approx_kl=((ratio - 1) - log_ratio).mean(),  # k3 estimator
                     clipfrac=((ratio - 1).abs() > args.clip_coef).float().mean(), ratio=ratio.mean(),
                     ratio_dev=(ratio - 1).abs().max(), max_log_ratio=log_ratio.abs().max())
    return pg_loss + args.vf_coef * v_loss, stats


def ppo_update(nets: Nets, plan: EpochPlan, buf: dict, orders, args: Args, state: dict) -> dict:
    """Clipped-surrogate PPO over all states of the rollout buffer (thesis 5.3), one pass over them per row of
    `orders`, --grad-accum-steps minibatches per optimizer step. `state["global_step"]` counts optimizer steps and
    sets the warmup. Returns the statistics averaged over the minibatches, and the ratio's spread before any step."""
    T, B = buf["logprobs"].shape
    device = buf["logprobs"].device
    b_states = buf["latents"][:-1].flatten(0, 1)                 # (T*B, C, H, W), row i*B + e = step i of env e
    b_actions = buf["latents"][1:].flatten(0, 1)                 # (T*B, C, H, W)
    b_idx = torch.arange(T, device=device).repeat_interleave(B)  # (T*B,) step index of each state
    b_t = nets.schedule.on(nets.schedule.timesteps, device)[b_idx]              # (T*B,) training timestep
    b_cond = None if buf["cond"] is None else buf["cond"].repeat(T, *([1] * (buf["cond"].ndim - 1)))
    b_logprobs, b_values = buf["logprobs"].flatten(), buf["values"].flatten()   # (T*B,)
    b_returns = buf["returns"].flatten()                                         # (T*B,)
    b_advantages = whiten(buf["advantages"].flatten()) if args.norm_adv else buf["advantages"].flatten()
    nets.train()
    acc = plan.accumulation(lambda: optimizer_step(nets, args, state), state["epoch"])
    for order in orders:
        for i in plan.passes(order):  # minibatches of states (--fused-minibatches of them per pass)
            with acc:                 # the gradients of --grad-accum-steps minibatches, then an optimizer step
                with autocast(args.precision, device):
                    new_logprobs = action_logprob(nets.policy, nets.schedule, b_states[i], b_idx[i], select(b_cond, i),
                                                  b_actions[i])
                    new_values = nets.value(b_states[i], b_t[i], select(b_cond, i)).float() if nets.value else None
                loss, stats = ppo_loss(new_logprobs, b_logprobs[i], b_advantages[i], new_values, b_values[i],
                                       b_returns[i], args)
                if nets.ptx is not None:  # PPO-ptx: the base model's own objective on base-distribution images
                    stats["ptx_loss"] = nets.ptx.loss(nets.policy, len(i))
                    loss = loss + args.ptx_coef * stats["ptx_loss"]
                acc.backward(loss, stats)
    return acc.statistics(("pg_loss", "v_loss", "approx_kl", "clipfrac", "ratio") + (("ptx_loss",) if nets.ptx else ()),
                          at_start=("ratio_dev",))


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
    scores, losses, grad_norms = [], [], []
    acc = Accumulation((nets.policy,), args.grad_accum_steps, nets.scaler,
                       lambda: grad_norms.append(optimizer_step(nets, args, state).item()), state["epoch"], "loss")
    for start in range(0, B, n_img):
        i = torch.arange(start, start + n_img, device=device)
        with acc:  # the gradients of --grad-accum-steps minibatches, then an optimizer step
            with autocast(args.precision, device):
                x_0 = nets.policy(x_T[i], select(cond, i), noise[:, i])                     # (n, C, H, W)
            mb_prompts = None if prompts is None else [prompts[k] for k in i.tolist()]
            r = torch.as_tensor(nets.reward_fn(x_0.float(), select(cond, i), mb_prompts)).float().flatten()  # (n,)
            if not torch.isfinite(r).all():
                bad = (~torch.isfinite(r)).nonzero()[0].item()
                raise FloatingPointError(f"epoch {state['epoch']}: the reward of sample {start + bad} is {r[bad].item()};"
                                         " stopping before the update so that no checkpoint is written from it")
            if not r.requires_grad:
                raise ValueError(f"--algo backprop: --reward {args.reward} gives no gradient (it is not a torch "
                                 "function of the samples); use --reward rm or target, or a differentiable module:function")
            acc.backward(-r.mean(), {})  # thesis 6.8: loss = -reward
        losses.append(acc.rows[-1]["loss"].item() * args.grad_accum_steps)
        scores.append(r.detach())
    return torch.cat(scores), {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(grad_norms))}


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
        raise cli.UserError(f"--algo backprop (thesis 6.8) has no value function and no KL penalty: pass --value-fn none "
                         f"and --kl-coef 0 (got --value-fn {args.value_fn}, --kl-coef {args.kl_coef})")
    if (args.reward == "rm" or "reward" in (args.value_fn, args.value_init)) and not args.reward_model:
        raise cli.UserError(f"--reward {args.reward} / --value-fn {args.value_fn}: pass --reward-model DIR, a folder "
                         "written by train_reward.py")
    if args.ptx_coef and args.algo != "ppo":
        raise cli.UserError("--ptx-coef adds the base model's denoising loss to PPO's policy loss: it needs --algo ppo")
    if args.kl_target is not None and not args.kl_coef:
        raise cli.UserError("--kl-target adapts beta from its start: pass --kl-coef > 0 as the starting value")
    if args.advantage == "group" and args.value_fn != "none":
        raise cli.UserError(f"--advantage group has no critic: pass --value-fn none (got --value-fn {args.value_fn})")
    if args.value_fn == "classifier" and not args.classifier:
        raise cli.UserError("--value-fn classifier needs --classifier guided-diffusion:/path/to/64x64_classifier.pt "
                         "(OpenAI's noisy-image classifier); offline stand-in: --exp digits-colorfulness")
    if args.precision != "fp32" and args.old_logprobs == "rollout":
        print(f"[drlhf] warning: --precision {args.precision} with --old-logprobs rollout: on GPUs the PPO ratio and "
              "the KL then start away from 1 and 0 (see losses/ratio_dev_at_start); --old-logprobs recompute fixes it",
              file=sys.stderr)


def batch_arithmetic(args: Args, world: int) -> tuple[int, int, int]:
    """Environments, states and minibatches per process and epoch, checked for exact divisibility (Table 6.2:
    Pink on 10 GPUs = 8 environments x 16 steps = 128 states -> 8 minibatches of 16 -> 4 optimizer steps)."""
    if args.num_envs % world:
        raise cli.UserError(f"--num-envs ({args.num_envs}) must be divisible by the number of processes ({world})")
    B, T = args.num_envs // world, args.num_steps
    n_states = B * T
    if B % args.group_size:
        raise cli.UserError(f"--group-size ({args.group_size}) must divide the environments per process, --num-envs/"
                            f"processes = {B}")
    if n_states % args.minibatch_size:
        raise cli.UserError(f"--minibatch-size ({args.minibatch_size}) must divide the states per process, "
                         f"--num-envs/processes x --num-steps = {B} x {T} = {n_states}")
    if args.algo == "backprop" and args.minibatch_size % T:
        raise cli.UserError(f"--algo backprop back-propagates through whole chains: --minibatch-size ({args.minibatch_size}"
                         f" states) must be a multiple of --num-steps ({T}); Table 6.2: 100 = 4 images x 25 steps")
    if args.minibatch_grouping == "trajectory" and args.minibatch_size % T:
        raise cli.UserError(f"--minibatch-grouping trajectory needs --minibatch-size ({args.minibatch_size}) to be a "
                         f"multiple of --num-steps ({T})")
    n_minibatches = n_states // args.minibatch_size
    if n_minibatches % args.grad_accum_steps:
        raise cli.UserError(f"--grad-accum-steps ({args.grad_accum_steps}) must divide the minibatches per process "
                         f"and epoch ({n_states} states / --minibatch-size {args.minibatch_size} = {n_minibatches})")
    if args.grad_accum_steps % args.fused_minibatches:
        raise cli.UserError(f"--fused-minibatches ({args.fused_minibatches}) runs minibatches of one optimizer step "
                         f"together: it must divide --grad-accum-steps ({args.grad_accum_steps})")
    if args.algo == "backprop" and args.fused_minibatches > 1:
        raise cli.UserError(f"--fused-minibatches ({args.fused_minibatches}) is for --algo ppo; --algo backprop's "
                         "minibatches are --minibatch-size / --num-steps whole chains")
    return B, n_states, n_minibatches


def setup(args: Args, rank: int, world: int, device):
    """Seeds, TF32, batch sizes, models and networks, the epoch's plan, the prompt table and the random generators
    of one process (also what benchmarks/epoch.py times). Returns (base, nets, plan, reward_fns, prompts,
    prompt_embeds, gens, sizes)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # Table 6.2 "Allow TF32"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # no effect on CPU
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    sizes = batch_arithmetic(args, world)
    base, value_net, schedule, reward_fns = load_models(args, rank, world, device)
    nets = build_nets(args, base, value_net, schedule, reward_fns[0], world, device)
    plan = EpochPlan(args, sizes[0], nets)  # how the epoch runs its networks, decided once (drlhf/plan.py)
    if rank == 0:
        for line in plan.notes():  # what --compile and the pi_old recompute cost
            print(line)
    prompts, prompt_embeds = prompt_table(args.prompts, base) if base.conditioning == "text" else (None, None)
    gens = {"rollout": torch.Generator(device).manual_seed(args.seed + rank),
            "shuffle": torch.Generator().manual_seed(args.seed + 7919 * (rank + 1))}
    if args.ptx_coef:  # PPO-ptx's images and their minibatches (before any checkpoint: the base weights make them)
        gens["ptx"] = torch.Generator().manual_seed(args.seed + 104729 * (rank + 1))
        nets.ptx = PtxData.build(args, base, nets.schedule, device, gens["ptx"])
    return base, nets, plan, reward_fns, prompts, prompt_embeds, gens, sizes


# ======== main: set up, loop over epochs, finish ===========================================================
def train_epoch(nets: Nets, plan: EpochPlan, kl_ctl: KLController, base, args: Args, state: dict, gens: dict, prompts,
                prompt_embeds, B: int, rank: int, device):
    """One epoch of this process's B environments: conditions and initial noise drawn, then `ppo_epoch` (or
    `backprop_update` with --algo backprop). Returns the rewards (B,), the KL (T, B), statistics, phase times."""
    cond, cond_prompts = sample_conditions(base, args.class_labels, B, gens["shuffle"], prompts, prompt_embeds,
                                           args.group_size)
    cond = None if cond is None else cond.to(device)
    x_T = torch.randn((B, *base.sample_shape), generator=gens["rollout"], device=device)
    if args.algo == "ppo":  # group ids for --advantage group: the class, the prompt's row, or one group
        groups = (cond if base.conditioning == "class" else torch.tensor([prompts.index(p) for p in cond_prompts])
                  if cond_prompts else torch.zeros(B, dtype=torch.long)).to(device)
        return ppo_epoch(nets, plan, kl_ctl, x_T, cond, cond_prompts, groups, args, state, gens, rank)
    # thesis 6.8: sample with gradients, loss = -reward, no RL
    noise = torch.randn((args.num_steps, *x_T.shape), generator=gens["rollout"], device=device)  # (T, B, C, H, W)
    nets.policy_net.train()
    scores, stats = backprop_update(nets, x_T, noise, cond, cond_prompts, args, state, device)
    return scores, torch.zeros(args.num_steps, B, device=device), stats, {}


def main(argv=None):
    args, ckpt, saved = resolve_args(argv)
    rank, world, device = distributed.setup_distributed(args.device)
    # CPU threads fixed for the whole run (the numbers depend on them), saved with it and reused by --resume
    args = dataclasses.replace(args, threads=speed.setup_cpu(device, args.threads))
    out = checkpoint.claim_run_folder(args, ckpt)  # held by this run alone; never mixes a new run into an old one
    base, nets, plan, reward_fns, prompts, prompt_embeds, gens, sizes = setup(args, rank, world, device)
    args = dataclasses.replace(args, sampler=nets.schedule.cfg.sampler,  # --sampler's default: the model's own
                               lora_targets=args.lora_targets or base.family.lora_targets)  # and its family's
    B = sizes[0]
    lineage = checkpoint.start_lineage(base)  # the rounds of RLHF behind the policy this run starts from
    state = {"epoch": 0, "global_step": 0, "base": models.identity(base)}  # the base a checkpoint's policy fits
    # the fixed-seed evaluation runs eagerly: compiling its batch size too would only add warm-up
    eval_net = models.make_denoiser(base, args.guidance_scale) if args.compile else nets.policy_net
    evaluator = evaluation.FixedSeedEval(eval_net, nets.schedule, base, reward_fns, args.eval_samples, args.seed,
                                         args.precision, device, args.class_labels, prompts, prompt_embeds,
                                         ref=nets.ref_net if args.eval_reward else None)
    if args.resume:
        state = checkpoint.restore_checkpoint(ckpt, saved, base.net, nets.value_net, nets.opt_pi, nets.opt_vf,
                                              nets.scaler, gens, rank, world, adapters_only=bool(args.lora_rank))
    kl_ctl = KLController(state.get("kl_coef", args.kl_coef), args.kl_target, args.kl_horizon)  # owns beta
    state.update(kl_ctl.state())
    set_lrs(nets.opt_pi, nets.opt_vf, args, state)
    writer = tracking.start_run(out, args, base, nets.schedule, evaluator, state, sizes, world) if rank == 0 else None
    state = distributed.broadcast_object(state)  # every rank keeps rank 0's state dict (rank 0 saves it)

    epoch_times, compile_log = [], tracking.CompileLog() if args.compile else None
    bar = tqdm(range(state["epoch"], args.epochs), initial=state["epoch"], total=args.epochs, disable=rank != 0,
               desc=f"{args.algo} epochs", unit="epoch")
    for epoch in bar:
        state["epoch"] = epoch
        t0 = time.perf_counter()
        scores, kl, stats, times = train_epoch(nets, plan, kl_ctl, base, args, state, gens, prompts, prompt_embeds, B,
                                               rank, device)
        pooled = tracking.pool_rewards(scores, kl, kl_ctl.beta, B * world)  # all ranks' rewards and KL, for the logs
        mean_kl = all_reduce_sum(kl.sum().double()).item() / (B * world)    # per sample, summed over the steps
        kl_ctl.update(mean_kl, B * world)  # --kl-target: beta of the next epoch (Ziegler et al. 2019)
        state.update(kl_ctl.state())
        distributed.sync_device(device)
        epoch_times.append(time.perf_counter() - t0)
        if compile_log:
            compile_log.epoch(writer, epoch, epoch_times[-1])
        if rank == 0:
            tracking.log_ppo_epoch(writer, bar, epoch, args.algo, pooled, scores, kl, stats, state, nets.opt_pi,
                                   nets.opt_vf, times, epoch_times[-1], B * world, device)
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                evaluator.log(writer, out, epoch, state)
        if args.checkpoint_every and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
            state["epoch"] = epoch + 1
            checkpoint.save_checkpoint(out, epoch + 1, base.net, nets.value_net, nets.opt_pi, nets.opt_vf, nets.scaler,
                                       state, dataclasses.asdict(args), gens, rank, adapters_only=bool(args.lora_rank))
    state["epoch"] = args.epochs
    if rank == 0:  # the policy as a diffusers pipeline, before/after pictures, summary.json
        models.save_pipeline(models.merge_lora(base.net) if args.lora_rank else base.net, base, out / "final_policy")
        lineage = checkpoint.record_round(lineage, out, dataclasses.asdict(args), state)  # iterated RLHF: a round
        checkpoint.write_lineage(out / "final_policy", lineage)
        scores = dict(evaluator.finish(out, state, args.eval_reward), lineage=lineage)
        tracking.write_summary(out, scores, args.epochs, epoch_times, B * world, device)
        print(f"[drlhf] policy saved to {out / 'final_policy'}, summary in {out / 'summary.json'}")
        writer.close()
    distributed.cleanup_distributed()


if __name__ == "__main__":
    cli.run(main)  # bad input: one line and exit code 1 (drlhf.cli.UserError and its kin)
