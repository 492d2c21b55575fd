"""One PPO update through train_ppo.ppo_update, single-process or under torchrun; rank 0 saves the weights.

    python tests/ddp_check.py OUT.safetensors                              # one process, all 4 environments
    torchrun --nproc_per_node=2 tests/ddp_check.py OUT.safetensors         # 2 ranks, 2 environments each
    ... OUT.safetensors backprop                                           # the same for --algo backprop
    ... OUT.safetensors group                                              # PPO with --advantage group

The rollout buffer is the same in both cases (built from fixed seeds), each rank takes its share of the
environments, and each rank's minibatch is all of its states, so the DDP-averaged gradient must equal the
single-process gradient on the union.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ppo  # noqa: E402
from drlhf import distributed, models, toys, value  # noqa: E402
from drlhf.plan import EpochPlan  # noqa: E402
from drlhf.sampler import DiffusionSchedule, SamplerConfig, make_betas, rollout, space_timesteps  # noqa: E402

T, B_ALL = 5, 4
world = int(os.environ.get("WORLD_SIZE", 1))
rank = int(os.environ.get("RANK", 0))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
unet = toys.toy_unet(1, 16, class_cond=False)
value_net = value.CriticCNN(1, 16)
policy_net = models.Denoiser(unet, "none")
schedule = DiffusionSchedule(make_betas("squaredcos_cap_v2"), space_timesteps(1000, T), SamplerConfig(num_steps=T))
x_T = torch.randn(B_ALL, 1, 16, 16, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    buf = rollout(policy_net, schedule, x_T, None, generator=torch.Generator().manual_seed(2))
    scores = torch.randn(B_ALL, generator=torch.Generator().manual_seed(3))
    rewards_t, _ = train_ppo.compute_rewards(scores, buf.logprobs, None, 0.0)
    values = torch.stack([value_net(buf.latents[i], schedule.timesteps[i].repeat(B_ALL)) for i in range(T)])
    advantages, returns = train_ppo.compute_advantages(rewards_t, values, 1.0, 0.95)
share = slice(rank * B_ALL // world, (rank + 1) * B_ALL // world)
local = dict(latents=buf.latents[:, share], logprobs=buf.logprobs[:, share], cond=None, values=values[:, share],
             returns=returns[:, share], advantages=advantages[:, share])
args = train_ppo.Args(minibatch_size=T * B_ALL // world, grad_accum_steps=1, policy_lr=1.0, vf_lr=1.0,
                      policy_warmup_steps=1, vf_warmup_steps=1, max_grad_norm=0.5)
# SGD: the weight change is the (clipped) gradient itself; Adam's first step, lr * g / (|g| + eps), would turn
# float rounding in near-zero gradients into full-size sign flips
opt_pi = torch.optim.SGD(unet.parameters(), lr=args.policy_lr)
opt_vf = torch.optim.SGD(value_net.parameters(), lr=args.vf_lr)
scaler = torch.amp.GradScaler("cpu", enabled=False)
policy = DDP(policy_net, broadcast_buffers=False) if world > 1 else policy_net
value_fn = DDP(value_net) if world > 1 else value_net
init = {f"policy.{k}": v.clone() for k, v in unet.state_dict().items()}
init.update({f"value.{k}": v.clone() for k, v in value_net.state_dict().items()})
if sys.argv[2:] == ["group"]:  # --advantage group: each reward standardized within its group over all ranks
    groups = torch.tensor([0, 1, 0, 1])
    local["advantages"], _ = train_ppo.group_advantages(scores[share], groups[share], torch.zeros(T, B_ALL // world), 0.0)
if sys.argv[2:] == ["backprop"]:  # thesis 6.8: the reward's gradient through the chain, the same arithmetic
    from drlhf import rewards
    target = rewards.load_target(16, 1)
    from drlhf.sampler import ReparameterizedChain
    chain = ReparameterizedChain(policy_net, schedule)
    chain = DDP(chain, broadcast_buffers=False) if world > 1 else chain
    noise = torch.randn((T, *x_T.shape), generator=torch.Generator().manual_seed(4))
    args.algo, args.reward, args.max_grad_norm = "backprop", "target", None
    nets = train_ppo.Nets(schedule, lambda x, c, p: rewards.target_image_reward(x, target), chain, policy_net,
                          ref_net=None, value=None, value_net=None, opt_pi=opt_pi, opt_vf=None, scaler=scaler)
    train_ppo.backprop_update(nets, x_T[share], noise[:, share], None, None, args, {"epoch": 0, "global_step": 0},
                              torch.device("cpu"))
else:
    orders = torch.arange(T * B_ALL // world)[None]  # one minibatch holding all of this rank's states
    nets = train_ppo.Nets(schedule, None, policy, policy_net, ref_net=None, value=value_fn, value_net=value_net,
                          opt_pi=opt_pi, opt_vf=opt_vf, scaler=scaler)
    plan = EpochPlan(args, B_ALL // world, nets)
    train_ppo.ppo_update(nets, plan, local, orders, args, {"epoch": 0, "global_step": 0})
if rank == 0:
    out = {f"policy.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    out.update({f"value.{k}": v.contiguous() for k, v in value_net.state_dict().items()})
    save_file(out, sys.argv[1])
    save_file(init, sys.argv[1] + ".init")
if world > 1:
    dist.destroy_process_group()
distributed.exit_process(0)  # a torchrun worker skips the interpreter's teardown (drlhf.distributed.exit_process)
