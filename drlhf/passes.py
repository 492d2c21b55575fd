"""Which passes a PPO epoch makes over the policy, and through which graph (speed; not in the thesis).

The update evaluates the policy in passes of `pass_size` states. Where the rollout's batch of environments per
process is that pass, two passes can be saved, each without changing a number:

    rollout_in_update_graph   --compile: the rollout runs the update's training graph, so one graph is compiled
    rollout_is_recompute      --old-logprobs recompute: the rollout's log-probabilities are the recompute's, bit
                              for bit, so the pass over the epoch's states is skipped

train_ppo.py's epoch asks both; `rollout_notes` says the answers at start-up (and in benchmarks/epoch.py's JSON),
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


def rollout_in_update_graph(net: nn.Module, B: int, args) -> bool:
    """--compile: whether the rollout can run the update's compiled training graph (gradients on, outputs detached)
    instead of compiling a no-grad graph of its own: its batch of B environments must have the update's pass size,
    and training mode must change no output (no active dropout, no batch norm). One graph fewer to compile, and the
    rollout's log-probabilities come from the kernels the update's ratio is computed with."""
    mode_dependent = any(isinstance(m, nn.Dropout) and m.p > 0 or isinstance(m, nn.modules.batchnorm._BatchNorm)
                         for m in net.modules())
    return args.compile and args.algo == "ppo" and B == pass_size(args) and not mode_dependent


def rollout_is_recompute(net: nn.Module, B: int, args) -> bool:
    """--old-logprobs recompute: whether the rollout already computed pi_old the way the recompute pass would, so
    that the pass is skipped. It did where its batch of B environments has the update's pass size and ran the same
    computation: eagerly, evaluation mode without gradients (as the recompute); with --compile, the update's graph.
    The same kernels on the same shapes then give each state's log-probability bit for bit (tests/test_ppo.py)."""
    if args.algo != "ppo" or B != pass_size(args):
        return False
    return not args.compile or rollout_in_update_graph(net, B, args)


def rollout_notes(net: nn.Module, B: int, args) -> list[str]:
    """Start-up lines on what the rollout of B environments per process costs besides itself: with --compile, a
    graph of its own or none (docs/performance.md); with --old-logprobs recompute, an extra pass or none."""
    if args.algo != "ppo":
        return []
    mb, lines = pass_size(args), []
    if args.compile:
        own = "a no-grad graph of its own, compiled beside the update's; "
        if rollout_in_update_graph(net, B, args):
            how = "through the update's training graph: nothing of its own to compile"
        elif B != mb:
            how = own + f"{passes_of(B, args)} would share the update's"
        else:
            how = own + "training mode changes the policy's output (dropout or batch norm)"
        lines.append(f"[drlhf] --compile: the rollout ({B} environments) runs {how}")
    if args.old_logprobs == "recompute":
        if rollout_is_recompute(net, B, args):
            how = f"none: the rollout's batch of {B} is the update's pass, so its log-probs are pi_old already"
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
