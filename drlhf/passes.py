"""Which passes a PPO epoch makes over the policy, and through which graph (speed; not in the thesis).

The update evaluates the policy in passes of `pass_size` states. Where the rollout evaluates its environments in
passes of that size too (`rollout_chunk`: its batch is the pass, or with --old-logprobs recompute, it is split into
passes, the last padded), two things can be saved, each without changing what the update computes:

    rollout_in_update_graph   --compile: the rollout runs the update's training graph, so one graph is compiled
    rollout_is_recompute      --old-logprobs recompute: the rollout's log-probabilities are the recompute's, bit
                              for bit, so the pass over the epoch's states is skipped

The reference policy's KL pass is made in the update's passes anyway; with --compile it can run the update's graph
too (`reference_in_update_graph`), so that it is compiled without a graph of its own.

train_ppo.py's epoch asks these; `rollout_notes` says the answers at start-up (and in benchmarks/epoch.py's JSON),
naming the flags that would give the same update in passes of the rollout's batch (docs/performance.md).
`args` is train_ppo.py's Args throughout.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def pass_size(args) -> int:
    """States per forward pass of the update (--fused-minibatches minibatches); pi_old, the values and the reference
    policy are evaluated in the same chunks, so that batch-dependent GPU kernels see the same batches."""
    return args.minibatch_size * args.fused_minibatches


def update_graph(fn, on: bool):
    """fn run with gradients on and its output detached when `on`: a compiled policy then reuses the training
    graph of the update (same batch size, same mode) instead of compiling a no-grad one, and pi_old comes from the
    very computation the update's first minibatch repeats."""
    def run(*args):
        with torch.enable_grad():
            return fn(*args).detach()
    return run if on else fn


def mode_dependent(net: nn.Module) -> bool:
    """Whether training mode changes the network's output (an active dropout or a batch norm) beyond rounding:
    where it does not, pi_old is evaluated in training mode, so that the update's first forward repeats it bit for
    bit (diffusers' ResNet blocks make their shortcut's input contiguous in training mode only, which moves a CPU
    convolution's last bits: ~1e-6 in the toy U-Net's output, 4e-4 in the ratio of a 4-step rollout)."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 or isinstance(m, nn.modules.batchnorm._BatchNorm)
               for m in net.modules())


def rollout_chunk(net: nn.Module, B: int, args) -> int | None:
    """The batch in which the rollout of B environments per process evaluates the policy at each step: the update's
    pass (`pass_size`) where its batch already is one, or with --old-logprobs recompute where passes of that size
    make its log-probabilities pi_old and cost no more than the recompute pass they save: ceil(B / pass) passes per
    step (the last padded) against B states of rollout plus B of recompute. None: one batch of all B (the rollout
    and the update then round differently). Pink: 8 environments in passes of 16 states, the same FLOPs as the
    8-state rollout and the recompute together; PickScore: 8 in passes of 10, 500 state evaluations per epoch
    instead of 800."""
    mb = pass_size(args)
    if args.algo != "ppo":
        return None
    if B == mb:
        return mb
    fits = -(-B // mb) * mb <= 2 * B
    return mb if args.old_logprobs == "recompute" and fits and not (args.compile and mode_dependent(net)) else None


def rollout_in_update_graph(net: nn.Module, B: int, args) -> bool:
    """--compile: whether the rollout can run the update's compiled training graph (gradients on, outputs detached)
    instead of compiling a no-grad graph of its own: it must evaluate the policy in the update's passes
    (`rollout_chunk`), and training mode must change no output (no active dropout, no batch norm). One graph fewer
    to compile, and the rollout's log-probabilities come from the kernels the update's ratio is computed with."""
    return args.compile and rollout_chunk(net, B, args) is not None and not mode_dependent(net)


def rollout_is_recompute(net: nn.Module, B: int, args) -> bool:
    """--old-logprobs recompute: whether the rollout already computed pi_old the way the recompute pass would, so
    that the pass is skipped. It did where it evaluated the policy in the update's passes (`rollout_chunk`) and ran
    the same computation: eagerly, without gradients in the recompute's mode (train_ppo.py: the update's training
    mode wherever that changes no output); with --compile, the update's graph. The same kernels on the same shapes
    then give each state's log-probability bit for bit, whatever the other states of its pass (tests/test_ppo.py)."""
    if rollout_chunk(net, B, args) is None:
        return False
    return not args.compile or rollout_in_update_graph(net, B, args)


def reference_in_update_graph(net: nn.Module, args) -> bool:
    """--compile with a KL penalty: whether the reference policy's pass (pi_base, a frozen copy of the policy) runs
    the update's compiled training graph (gradients on, outputs detached) instead of running eagerly. A compiled
    graph takes the parameters as inputs, and dynamo guards on their dtype, shape and requires_grad, not on which
    module holds them: a copy with the same modules (no LoRA adapters on the policy), in the same mode (training
    mode must change no output) and with parameters like the policy's (fp32, requires_grad; train_ppo.py never
    gives them to an optimizer) reuses the graph, with no compilation of its own. pi_base and pi_old then come from
    the same kernels, so the KL of the first epoch is exactly 0."""
    return args.compile and args.algo == "ppo" and args.kl_coef > 0 and not args.lora_rank and not mode_dependent(net)


def rollout_notes(net: nn.Module, B: int, args) -> list[str]:
    """Start-up lines on what the rollout of B environments per process costs besides itself: with --compile, a
    graph of its own or none (docs/performance.md); with --old-logprobs recompute, an extra pass or none."""
    if args.algo != "ppo":
        return []
    mb, lines = pass_size(args), []
    split = "" if B == mb else f" in passes of {mb} states" + (f" ({-B % mb} of them padding)" if B % mb else "")
    if args.compile:
        own = "a no-grad graph of its own, compiled beside the update's; "
        mode_changes = "training mode changes the policy's output (dropout or batch norm)"
        if rollout_in_update_graph(net, B, args):
            how = f"through the update's training graph{split}: nothing of its own to compile"
        elif B != mb:
            how = own + f"{passes_of(B, args)} would share the update's"
        else:
            how = own + mode_changes
        lines.append(f"[drlhf] --compile: the rollout ({B} environments) runs {how}")
        if args.kl_coef > 0:
            eager = "eagerly: " + ("the LoRA policy's graph has adapters pi_base lacks" if args.lora_rank else mode_changes)
            how = ("through the update's training graph too: nothing of its own to compile (pi_base's weights kept in "
                   "fp32 for it)") if reference_in_update_graph(net, args) else eager
            lines.append(f"[drlhf] --compile: the KL's reference-policy pass runs {how}")
    if args.old_logprobs == "recompute":
        skipped = rollout_is_recompute(net, B, args)
        if skipped and B == mb:
            how = f"none: the rollout's batch of {B} is the update's pass, so its log-probs are pi_old already"
        elif skipped:
            how = f"none: the rollout evaluates its {B} environments{split}, so its log-probs are pi_old already"
        elif B != mb:
            how = f"one over the epoch's states ({passes_of(B, args)} would make the rollout's log-probs exact)"
        else:
            how = "one over the epoch's states"
        lines.append(f"[drlhf] --old-logprobs recompute: extra no-grad passes: {how}")
    return lines


def passes_of(B: int, args) -> str:
    """The flags that make the update's passes B states (--minibatch-size x --fused-minibatches) with the same
    update: the same states per optimizer step (--minibatch-size x --grad-accum-steps), only other rounding.
    The phrase ends in a comma where it names flags, as the sentences of `rollout_notes` go on after it."""
    fused, per_step = args.fused_minibatches, args.minibatch_size * args.grad_accum_steps
    whole = args.minibatch_grouping == "state" or (B // fused) % args.num_steps == 0  # trajectory: whole chains
    if B % fused == 0 and per_step % (B // fused) == 0 and per_step // (B // fused) % fused == 0 and whole:
        return (f"--minibatch-size {B // fused} --grad-accum-steps {per_step // (B // fused)}, the same update of "
                f"{per_step} states per optimizer step,")
    return f"update passes of {B} states (--minibatch-size x --fused-minibatches)"
