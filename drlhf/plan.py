"""How one PPO epoch runs its networks, decided once at set-up (speed; not in the thesis).

train_ppo.py's `ppo_epoch` says what the method computes; an `EpochPlan`, built from the arguments, the
environments per process and the networks, says how:

    plan = EpochPlan(args, B, nets)              # decided once; plan.notes() are the start-up lines
    buf = plan.rollout(x_T, cond, generator)     # the rollout, with log pi_old of every action
    logprobs = plan.old_logprobs(buf, order)     # those, or a recompute in the update's passes
    ref_logprobs = plan.ref_logprobs(buf, order) # log pi_base, None without a KL penalty
    values = plan.values(buf, order)             # V(x_t, t, c), zeros without a critic
    for i in plan.passes(order): with acc: ...   # the update's passes; acc = plan.accumulation(...)

The update evaluates the policy in passes of `pass_size` states (--minibatch-size x --fused-minibatches).
pi_old, pi_base and the values are evaluated in the same chunks, in the update's order, so that batch-dependent
GPU kernels see the same batches. Where the rollout evaluates its environments in passes of that size too (its
batch is the pass, or with --old-logprobs recompute it is split into passes, the last padded), two things are
saved without changing what the update computes:

    rollout_in_update_graph   --compile: the rollout runs the update's training graph, so one graph is compiled
    recompute (False)         --old-logprobs recompute: the rollout's log-probabilities are the recompute's, bit
                              for bit, so the pass over the epoch's states is skipped

With --compile and a KL penalty the reference policy's pass runs the update's graph too
(`reference_in_update_graph`). "Bit for bit" holds where the kernels give a state the same bits in any pass of
the same size, whatever shares it (AVX-512 oneDNN and MKL, measured); MKL's AVX2 path rounds by position in the
batch (~5e-7 relative in a log-probability), and there the skipped recompute agrees with a made one up to that
rounding. Measurements: docs/performance.md.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from drlhf import models, speed
from drlhf.distributed import autocast
from drlhf.sampler import (Rollout, StepOutput, action_logprob, gaussian_logprob, model_distribution, policy_step,
                           rollout)


# ---------------------------------------------------------------------------------------------------------
# The decisions (functions of the arguments and the networks only)
# ---------------------------------------------------------------------------------------------------------
def mode_dependent(net: nn.Module) -> bool:
    """Whether training mode changes the network's output (an active dropout or a batch norm) beyond rounding:
    where it does not, pi_old is evaluated in training mode, so that the update's first forward repeats it bit for
    bit (diffusers' ResNet blocks make their shortcut's input contiguous in training mode only, which moves a CPU
    convolution's last bits: ~1e-6 in the toy U-Net's output, 4e-4 in the ratio of a 4-step rollout)."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 or isinstance(m, nn.modules.batchnorm._BatchNorm)
               for m in net.modules())


def pass_size(args) -> int:
    """States per forward pass of the update (--fused-minibatches minibatches)."""
    return args.minibatch_size * args.fused_minibatches


def rollout_chunk(args, B: int, mode_free: bool) -> int | None:
    """The batch in which the rollout of B environments per process evaluates the policy at each step: the update's
    pass where its batch already is one, or with --old-logprobs recompute where passes of that size make its
    log-probabilities pi_old and cost no more than the recompute pass they save: ceil(B / pass) passes per step
    (the last padded) against B states of rollout plus B of recompute. None: one batch of all B. Pink: 8
    environments in passes of 16 states, the same FLOPs as the 8-state rollout and the recompute together;
    PickScore: 8 in passes of 10, 500 state evaluations per epoch instead of 800."""
    mb = pass_size(args)
    if args.algo != "ppo":
        return None
    if B == mb:
        return mb
    fits = -(-B // mb) * mb <= 2 * B
    return mb if args.old_logprobs == "recompute" and fits and (mode_free or not args.compile) else None


def reference_in_update_graph(args, net: nn.Module) -> bool:
    """--compile with a KL penalty: whether the reference policy's pass (pi_base, a frozen copy of the policy) runs
    the update's compiled training graph (gradients on, outputs detached) instead of running eagerly. A compiled
    graph takes the parameters as inputs, and dynamo guards on their dtype, shape and requires_grad, not on which
    module holds them: a copy with the same modules (no LoRA adapters on the policy), in the same mode (training
    mode must change no output) and with parameters like the policy's (fp32, requires_grad; train_ppo.py never
    gives them to an optimizer) reuses the graph, with no compilation of its own. pi_base and pi_old then come from
    the same kernels, so the KL of the first epoch is exactly 0."""
    return args.compile and args.algo == "ppo" and args.kl_coef > 0 and not args.lora_rank and not mode_dependent(net)


def in_update_graph(fn, on: bool):
    """fn run with gradients on and its output detached when `on`: a compiled policy then reuses the training
    graph of the update (same batch size, same mode) instead of compiling a no-grad one."""
    def run(*args):
        with torch.enable_grad():
            return fn(*args).detach()
    return run if on else fn


def chunked_policy_step(chunk: int):
    """sampler.policy_step with the model and the log-likelihood seeing batches of exactly `chunk` states, the last
    padded with copies of its first state, so that each state gets the numbers any other batch of `chunk` states
    would give it (batch-size-dependent kernels round differently). The noise is drawn for the B states alone."""
    def step(model, schedule, x_t, idx, cond, generator=None) -> StepOutput:
        B = len(x_t)
        pad = -B % chunk
        padded = lambda v, fill=None: v if v is None or not pad else torch.cat(  # noqa: E731
            [v, v[:1].expand(pad, *v.shape[1:]) if fill is None else v.new_full((pad, *v.shape[1:]), fill)])
        x_p, idx_p, cond_p = padded(x_t), padded(idx), padded(cond)
        starts = range(0, B + pad, chunk)
        mean, std = (torch.cat(t) for t in zip(*[
            model_distribution(model, schedule, x_p[s:s + chunk], idx_p[s:s + chunk],
                               None if cond_p is None else cond_p[s:s + chunk]) for s in starts]))  # (B + pad, ...)
        noise = torch.randn((B, *mean.shape[1:]), generator=generator, device=mean.device, dtype=torch.float32)
        action = mean + std * padded(noise, fill=0.0)
        logprob = torch.cat([gaussian_logprob(action[s:s + chunk], mean[s:s + chunk], std[s:s + chunk],
                                              schedule.cfg.logprob_reduction) for s in starts])
        return StepOutput(mean[:B], std[:B], action[:B], logprob[:B])
    return step


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------
class EpochPlan:
    """How a PPO epoch of B environments per process evaluates `nets` (train_ppo.Nets): decided here, once."""

    def __init__(self, args, B: int, nets, one_batch_rollout: bool = False):
        """one_batch_rollout: the rollout evaluates all B environments in one batch unless that batch is the
        update's pass (the decision before the rollout ran in the update's passes; benchmarks/epoch.py's A/B)."""
        self.nets, self.args, self.B = nets, args, B
        self.precision = args.precision
        self.pass_size = pass_size(args)
        self.passes_per_step = args.grad_accum_steps // args.fused_minibatches
        mode_free = not mode_dependent(nets.policy_net)
        self.rollout_chunk = rollout_chunk(args, B, mode_free)
        if one_batch_rollout:
            self.rollout_chunk = self.pass_size if args.algo == "ppo" and B == self.pass_size else None
        # pi_old in the update's training mode wherever that changes no output: the update's first forward repeats it
        self.rollout_train_mode = self.rollout_chunk is not None and mode_free
        self.rollout_in_update_graph = bool(args.compile and self.rollout_chunk is not None and mode_free)
        # the rollout's log-probs are pi_old where it evaluated the update's passes with the update's computation
        self.rollout_gives_pi_old = self.rollout_chunk is not None and (not args.compile or self.rollout_in_update_graph)
        self.recompute = args.old_logprobs == "recompute" and not self.rollout_gives_pi_old
        self.recompute_train_mode = args.compile or mode_free
        self.kl = nets.ref_net is not None and args.kl_coef > 0  # (--eval-reward alone builds pi_base for evaluations)
        self.reference_in_update_graph = reference_in_update_graph(args, nets.policy_net)
        self.reference = nets.ref_net
        if self.reference_in_update_graph:  # pi_base's weights as the inputs of the update's compiled graph
            ref = nets.ref_net
            self.reference = models.Denoiser(speed.compile_module(ref.net, args.cache_dir, args.compile_scope),
                                             ref.conditioning, ref.guidance_scale, ref.null_cond)
        self.step = chunked_policy_step(self.rollout_chunk) if self.rollout_chunk else policy_step

    # ---- the rollout and the evaluations of its states ------------------------------------------------------
    def rollout(self, x_T, cond, generator) -> Rollout:
        net = self.nets.policy_net
        net.train(self.rollout_train_mode)
        with autocast(self.precision, x_T.device):
            return rollout(in_update_graph(net, self.rollout_in_update_graph), self.nets.schedule, x_T, cond,
                           generator=generator, step=self.step)

    def old_logprobs(self, buf: Rollout, order) -> torch.Tensor:
        """log pi_old (T, B): the rollout's own, or (--old-logprobs recompute) the update's passes without gradients."""
        if not self.recompute:
            return buf.logprobs
        net, schedule = self.nets.policy_net, self.nets.schedule
        net.train(self.recompute_train_mode)
        return self.evaluate(in_update_graph(lambda x, i, c, a: action_logprob(net, schedule, x, i, c, a),
                                             self.args.compile), buf, order)

    def ref_logprobs(self, buf: Rollout, order) -> torch.Tensor | None:
        """log pi_base (T, B) of the rollout's actions; None without a KL penalty."""
        if not self.kl:
            return None
        ref, schedule = self.reference, self.nets.schedule
        return self.evaluate(in_update_graph(lambda x, i, c, a: action_logprob(ref, schedule, x, i, c, a),
                                             self.reference_in_update_graph), buf, order)

    def values(self, buf: Rollout, order) -> torch.Tensor:
        """V(x_t, t, c) (T, B) of every state, in evaluation mode; zeros without a value function."""
        value_net, schedule = self.nets.value_net, self.nets.schedule
        if value_net is None:
            return torch.zeros_like(buf.logprobs)
        value_net.eval()
        timesteps = schedule.on(schedule.timesteps, buf.latents.device)
        return self.evaluate(lambda x, i, c, a: value_net(x, timesteps[i], c), buf, order)

    @torch.no_grad()
    def evaluate(self, fn, buf: Rollout, order) -> torch.Tensor:
        """fn(states, step_index, cond, actions) over all T x B states of a rollout -> (T, B), evaluated in the
        update's passes, in its minibatch order."""
        latents, cond = buf.latents, buf.cond
        T, B = latents.shape[0] - 1, latents.shape[1]
        states, actions = latents[:-1].flatten(0, 1), latents[1:].flatten(0, 1)  # (T*B, C, H, W)
        idx = torch.arange(T, device=latents.device).repeat_interleave(B)         # (T*B,)
        flat_cond = None if cond is None else cond.repeat(T, *([1] * (cond.ndim - 1)))
        out = torch.empty(T * B, device=latents.device)
        for i in self.passes(order):
            with autocast(self.precision, latents.device):
                out[i] = fn(states[i], idx[i], None if flat_cond is None else flat_cond[i.to(flat_cond.device)],
                            actions[i]).float()
        return out.view(T, B)

    # ---- the update's passes ---------------------------------------------------------------------------------
    def passes(self, order):
        """The state indices of each forward pass, in the order of `order` (a permutation of the T*B states)."""
        for start in range(0, len(order), self.pass_size):
            yield order[start:start + self.pass_size]

    def accumulation(self, optimizer_step, epoch: int) -> "Accumulation":
        nets = self.nets
        return Accumulation((nets.policy, nets.value), self.passes_per_step, nets.scaler, optimizer_step, epoch)

    def notes(self) -> list[str]:
        """Start-up lines on what the rollout costs besides itself: with --compile, a graph of its own or none
        (docs/performance.md); with --old-logprobs recompute, an extra pass or none."""
        args, B, mb = self.args, self.B, self.pass_size
        if args.algo != "ppo":
            return []
        lines = []
        split = "" if B == mb else f" in passes of {mb} states" + (f" ({-B % mb} of them padding)" if B % mb else "")
        mode_changes = "training mode changes the policy's output (dropout or batch norm)"
        if args.compile:
            own = "a no-grad graph of its own, compiled beside the update's; "
            if self.rollout_in_update_graph:
                how = f"through the update's training graph{split}: nothing of its own to compile"
            elif B != mb:
                how = own + f"{passes_of(B, args)} would share the update's"
            else:
                how = own + mode_changes
            lines.append(f"[drlhf] --compile: the rollout ({B} environments) runs {how}")
            if args.kl_coef > 0:
                eager = "eagerly: " + ("the LoRA policy's graph has adapters pi_base lacks" if args.lora_rank else
                                       mode_changes)
                how = ("through the update's training graph too: nothing of its own to compile (pi_base's weights "
                       "kept in fp32 for it)") if self.reference_in_update_graph else eager
                lines.append(f"[drlhf] --compile: the KL's reference-policy pass runs {how}")
        if args.old_logprobs == "recompute":
            if not self.recompute and B == mb:
                how = f"none: the rollout's batch of {B} is the update's pass, so its log-probs are pi_old already"
            elif not self.recompute:
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
    The phrase ends in a comma where it names flags, as the sentences of `EpochPlan.notes` go on after it."""
    fused, per_step = args.fused_minibatches, args.minibatch_size * args.grad_accum_steps
    whole = args.minibatch_grouping == "state" or (B // fused) % args.num_steps == 0  # trajectory: whole chains
    if B % fused == 0 and per_step % (B // fused) == 0 and per_step // (B // fused) % fused == 0 and whole:
        return (f"--minibatch-size {B // fused} --grad-accum-steps {per_step // (B // fused)}, the same update of "
                f"{per_step} states per optimizer step,")
    return f"update passes of {B} states (--minibatch-size x --fused-minibatches)"


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation over the update's passes
# ---------------------------------------------------------------------------------------------------------
class Accumulation:
    """One pass of the update per `with acc:` block. A pass's loss counts 1 / passes_per_step of an optimizer
    step's gradient (Table 6.2 "Grad. Accum. Steps", --fused-minibatches minibatches per pass); DDP all-reduces
    only on a step's last pass (no_sync on the others); at the end of that pass the step's losses are checked for
    NaN/inf (one GPU sync per step, not per pass) and `optimizer_step()` runs. Statistics are kept by name."""

    def __init__(self, modules, passes_per_step: int, scaler, optimizer_step, epoch: int, what: str = "PPO loss"):
        self.modules, self.what = [m for m in modules if m is not None], what
        self.n, self.scaler, self.optimizer_step, self.epoch = passes_per_step, scaler, optimizer_step, epoch
        self.j, self.rows, self.checked = 0, [], 0

    def __enter__(self):
        self.last = (self.j + 1) % self.n == 0  # the optimizer step's last pass: gradients all-reduced
        self.stack = contextlib.ExitStack()
        for m in self.modules:
            if isinstance(m, DDP) and not self.last:
                self.stack.enter_context(m.no_sync())
        return self

    def backward(self, loss: torch.Tensor, stats: dict):
        """Accumulate this pass's share of the step's gradient; keep its statistics (tensors, read once per step)."""
        loss = loss / self.n
        self.scaler.scale(loss).backward()
        self.rows.append(dict(loss=loss.detach().float(), **{k: v.detach().float() for k, v in stats.items()}))

    def __exit__(self, exc_type, exc, tb):
        self.stack.close()
        if exc_type is None and self.last:  # a non-finite loss stops training before the step it would spoil
            self.check_finite()
            self.optimizer_step()
        self.j += 1
        return False

    def check_finite(self):
        block = self.rows[self.checked:]
        losses = torch.stack([r["loss"] for r in block]).cpu()
        bad = (~torch.isfinite(losses)).nonzero().flatten()
        self.checked = len(self.rows)
        if len(bad):
            row = ", ".join(f"{k} {v.item():.3g}" for k, v in block[bad[0]].items())
            raise FloatingPointError(f"epoch {self.epoch}: non-finite {self.what} ({row}); try --logprob-reduction "
                                     "mean or a lower --policy-lr")

    def statistics(self, names, at_start=()) -> dict:
        """The mean over all passes of each statistic in `names`, and the first pass's `at_start` ones (before any
        optimizer step) as NAME_at_start."""
        table = {k: torch.stack([r[k] for r in self.rows]).cpu() for k in (*names, *at_start)}
        return {k: table[k].double().mean().item() for k in names} | {f"{k}_at_start": table[k][0].item() for k in at_start}
