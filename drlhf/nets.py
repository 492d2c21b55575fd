"""The networks of a PPO run (train_ppo.py, benchmarks/epoch.py), built once at set-up: the base model and its
rollout schedule, the trained policy (full U-Net or LoRA adapters; with --algo backprop the whole sampling chain),
the frozen reference policy, the value function, their DDP wrappers, the AdamW optimizers and the GradScaler.

    base, value_net, schedule, reward_fns = load_models(args, rank, world, device)
    nets = build_nets(args, base, value_net, schedule, reward_fns[0], world, device)

`args` is train_ppo.py's Args throughout.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from drlhf import models, rewards, speed
from drlhf.plan import reference_in_update_graph
from drlhf.prompts import check_condition_flags
from drlhf.sampler import DiffusionSchedule, ReparameterizedChain, schedule_for_model
from drlhf.value import make_value_fn


@dataclass
class Nets:
    """What an epoch trains and scores with. `policy` and `value` are what gradients go through (wrapped in
    DistributedDataParallel under torchrun; --algo backprop: the whole chain); `*_net` are the plain modules."""
    schedule: DiffusionSchedule   # the MDP: respaced timesteps, sampler, CFG scale, log-prob reduction
    reward_fn: Callable           # (samples, cond, prompts) -> (B,) terminal rewards
    policy: nn.Module             # the trained denoiser through DDP
    policy_net: nn.Module         # the plain denoiser (its U-Net is base.net, or its compiled forward)
    ref_net: nn.Module | None     # the frozen base policy pi_base (with --kl-coef > 0 or --eval-reward)
    value: nn.Module | None       # V(x_t, t, c) through DDP (None with --value-fn none)
    value_net: nn.Module | None
    opt_pi: torch.optim.Optimizer
    opt_vf: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler  # fp16 only; a no-op otherwise
    ptx: object = None            # --ptx-coef: the base distribution's images and their denoising loss (drlhf/ptx.py)

    def train(self):
        for net in (self.policy_net, self.value_net):
            if net is not None:
                net.train()


def load_models(args, rank: int, world: int, device):
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
    check_condition_flags(base.conditioning, args.pretrained, args.prompts, args.class_labels, base.num_classes)
    schedule = schedule_for_model(base.scheduler_config, base.is_latent, args.sampler, args.num_steps,
                                  args.spacing, args.eta, args.variance_type, args.guidance_scale,
                                  args.logprob_reduction, base.flow_timesteps(args.num_steps))
    reward_fns = [rewards.from_flags(spec, base, device, args, flag) for spec, flag in
                  ((args.reward, "--reward"), (args.eval_reward, "--eval-reward")) if spec]
    return base, value_net, schedule, reward_fns


def build_nets(args, base, value_net, schedule, reward_fn, world: int, device) -> Nets:
    """The trained policy (full U-Net or LoRA adapters; --algo backprop: the whole chain), the frozen reference
    policy, the value function, DDP wrappers, AdamW optimizers (Table 6.2 "General Optimization") and GradScaler."""
    base.net.requires_grad_(True).train()
    if args.gradient_checkpointing:
        base.net.enable_gradient_checkpointing()
    policy_net = models.make_denoiser(base, args.guidance_scale)
    # --compile: the KL pass through the update's graph, which guards on requires_grad and runs in training mode
    shared_ref = reference_in_update_graph(args, policy_net)  # (pi_base's weights are never given to an optimizer)
    ref_net = None
    reference = args.kl_coef > 0 or args.eval_reward  # pi_base: the KL penalty; the KL of the evaluations
    if reference and not args.lora_rank:  # full fine-tuning: a frozen copy of the base network
        ref_net = copy.deepcopy(policy_net).requires_grad_(shared_ref).train(shared_ref)
    if args.lora_rank:  # low-rank adapters on the attention projections; the base weights stay frozen
        targets = args.lora_targets or base.family.lora_targets  # the family's attention projections by default
        models.add_lora(base.net, args.lora_rank, args.lora_alpha or args.lora_rank, targets.split(","))
        if reference:  # the same frozen weights with the adapters off: no second copy of the network
            ref_net = models.AdaptersOff(policy_net)
    value_net = value_net.to(device) if value_net is not None else None
    for frozen in (ref_net, base.net if args.lora_rank else None, value_net):  # GPU fp16/bf16: weights not cast
        if frozen is not None:                                                    # at every forward (no-op on CPU)
            speed.hold_frozen_in_compute_dtype(frozen, args.precision, device)
    if args.compile:  # only the policy's forward is compiled; base.net (saved, checkpointed) stays the plain module
        policy_net.net = speed.compile_module(base.net, args.cache_dir, args.compile_scope)
    # thesis 6.8: with --algo backprop the whole sampling chain is the one differentiable forward
    trained = ReparameterizedChain(policy_net, schedule, args.chain_checkpointing) if args.algo == "backprop" else policy_net
    ids = [device] if device.type == "cuda" else None
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay,
                fused=device.type == "cuda" or None)  # GPU: one fused kernel per step instead of foreach ones
    return Nets(schedule=schedule, reward_fn=reward_fn, policy_net=policy_net, ref_net=ref_net,
                policy=DDP(trained, device_ids=ids, broadcast_buffers=False) if world > 1 else trained,
                value_net=value_net,
                value=(DDP(value_net, device_ids=ids) if world > 1 else value_net) if value_net else None,
                opt_pi=torch.optim.AdamW([p for p in base.net.parameters() if p.requires_grad], lr=args.policy_lr, **adam),
                opt_vf=torch.optim.AdamW(value_net.parameters(), lr=args.vf_lr, **adam) if value_net else None,
                scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))
