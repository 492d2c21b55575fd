"""Table 6.2 as data: the thesis's seven experiments and the offline stand-ins, one row each, read by
sample.py, train_reward.py and train_ppo.py through `--exp NAME`.

A row holds
    about         one line for `--help`: which thesis section or stand-in it is
    diffusion     the sampling settings that the labeling dataset (sample.py) and the PPO rollouts
                  (train_ppo.py) of the experiment share, written once so that they cannot drift apart;
    sample, train_reward, train_ppo
                  what each script overrides on top of its `Args` defaults (a script without an entry has no
                  preset of that name).
Keys are `Args` field names; precedence is default < preset < command line (drlhf.cli), and a key that is
not a field of the script's `Args` is an error. tests/test_ppo.py checks every Table 6.2 cell against this table
(tests/fixtures/table_6_2.md).
"""
from __future__ import annotations

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD35M = "stabilityai/stable-diffusion-3.5-medium"
FLUX1_DEV = "black-forest-labs/FLUX.1-dev"
QWEN_IMAGE = "Qwen/Qwen-Image"
ATTENTION = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # a joint block's image and text
FLUX_LORA = ATTENTION + ",ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"  # + both feed-forwards
QWEN_LORA = ATTENTION + ",img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2"  # + both MLPs
IMAGENET64 = dict(pretrained="guided-diffusion:64x64", spacing="guided", variance_type="learned_range")  # thesis 6.5
# rows shared by every Table 6.2 PPO column
ADAM = dict(adam_beta1=0.9, adam_beta2=0.999)
PPO_RL = dict(gamma=1.0, gae_lambda=0.95, clip_coef=0.2)
# what the PickScore presets on flow models share (Flow-GRPO's base config with the thesis's method: critic + GAE +
# per-step KL); each row adds its batch arithmetic and LoRA
PICKSCORE_FLOW = dict(conditioning="text", latent=True, reward="pickscore", gamma=1.0, gae_lambda=0.95, clip_coef=1e-4,
                      logprob_reduction="mean", kl_coef=0.001, vf_coef=0.5, value_fn="unet", epochs=1000,
                      policy_lr=3e-4, vf_lr=1e-4, policy_warmup_steps=0, vf_warmup_steps=0, **ADAM, adam_eps=1e-8,
                      weight_decay=1e-4, max_grad_norm=1.0, tf32=True, gradient_checkpointing=True,
                      old_logprobs="recompute", eval_samples=16, eval_every=25)

EXPERIMENTS = {
    # ----- Table 6.2, the thesis's seven experiments ---------------------------------------------------------
    "target": dict(  # thesis 6.4, Algorithm 1: the MNIST "4" pulled toward a target image
        about="Table 6.2 Target Image (thesis 6.4): the 32x32 toy 4 pulled toward a target image",
        diffusion=dict(pretrained="toy:digit4-32", num_steps=25, guidance_scale=1.0),
        train_ppo=dict(resolution=32, conditioning="none", latent=False, reward="target", num_envs=32, **PPO_RL,
                       vf_coef=0.5, kl_coef=0.0, epochs=3000, minibatch_size=25, policy_lr=1e-7, vf_lr=1e-5,
                       policy_warmup_steps=4096, vf_warmup_steps=1024, **ADAM, adam_eps=1e-5, weight_decay=0.01,
                       grad_accum_steps=1, max_grad_norm=0.5, precision="fp32", tf32=False, value_fn="cnn",
                       value_init="classifier")),
    "colorfulness": dict(  # thesis 6.5, appendix A
        about="Table 6.2 Colorfulness (thesis 6.5): OpenAI's ImageNet 64x64 model, --pretrained guided-diffusion:PATH",
        diffusion=dict(**IMAGENET64, num_steps=32, guidance_scale=1.0),
        train_ppo=dict(resolution=64, conditioning="class", latent=False, reward="colorfulness", num_envs=32, **PPO_RL,
                       vf_coef=0.5, kl_coef=0.02, epochs=400, minibatch_size=32, policy_lr=1e-6, vf_lr=1e-5,
                       policy_warmup_steps=8192, vf_warmup_steps=1024, **ADAM, adam_eps=1e-8, weight_decay=0.0,
                       grad_accum_steps=1, max_grad_norm=0.5, precision="fp32", tf32=False, value_fn="classifier",
                       classifier="guided-diffusion:64x64")),
    "aesthetic": dict(  # thesis 6.6, LAION Aesthetics Predictor V2
        about="Table 6.2 Aesthetic Score (thesis 6.6): ImageNet 64x64, LAION Aesthetics Predictor V2 (--aesthetic-mlp)",
        diffusion=dict(**IMAGENET64, num_steps=50, guidance_scale=1.0),
        train_ppo=dict(resolution=64, conditioning="class", latent=False, reward="aesthetic", num_envs=32, **PPO_RL,
                       vf_coef=0.5, kl_coef=0.03, epochs=500, minibatch_size=25, policy_lr=5e-7, policy_lr_early=2e-7,
                       policy_lr_early_epochs=100, vf_lr=1e-5, policy_warmup_steps=8192, vf_warmup_steps=1024, **ADAM,
                       adam_eps=1e-8, weight_decay=0.0, grad_accum_steps=1, max_grad_norm=0.5, precision="fp32",
                       tf32=False, value_fn="classifier", classifier="guided-diffusion:64x64")),
    "macaw": dict(  # thesis 6.7: K = 5 tasks of class 88 (macaw), the classifier-based reward model
        about="Table 6.2 Macaw (thesis 6.7): class 88, K = 5, the noisy-image classifier as reward model",
        diffusion=dict(**IMAGENET64, class_labels="88", num_steps=25, guidance_scale=1.0),
        sample=dict(num_tasks=200, k=5, instructions="builtin:macaw"),  # Table 6.3 instructions
        train_reward=dict(epochs=1000, batch_tasks=8, lr=1e-4, cond_drop=0.0, backbone="classifier",
                          classifier="guided-diffusion:64x64", standardize=False),  # outputs not standardized
        train_ppo=dict(resolution=64, conditioning="class", latent=False, reward="rm", num_envs=32, **PPO_RL,
                       vf_coef=0.5, kl_coef=0.02, epochs=250, minibatch_size=25, policy_lr=1e-6, vf_lr=1e-5,
                       policy_warmup_steps=8192, vf_warmup_steps=1024, **ADAM, adam_eps=1e-8, weight_decay=0.0,
                       grad_accum_steps=1, max_grad_norm=0.5, precision="fp32", tf32=False, value_fn="classifier",
                       classifier="guided-diffusion:64x64")),
    "macaw-norl": dict(  # thesis 6.8: the Macaw reward back-propagated through the chain, no RL
        about="Table 6.2 Macaw: Without RL (thesis 6.8): the reward back-propagated through the chain",
        diffusion=dict(**IMAGENET64, class_labels="88", num_steps=25, guidance_scale=1.0),
        train_ppo=dict(algo="backprop", resolution=64, conditioning="class", latent=False, reward="rm", num_envs=32,
                       kl_coef=0.0, value_fn="none", epochs=750, minibatch_size=100, policy_lr=1e-6,
                       policy_warmup_steps=100, **ADAM, adam_eps=1e-8, weight_decay=0.01, grad_accum_steps=8,
                       max_grad_norm=None, precision="fp32", tf32=False)),
    "pink": dict(  # thesis 6.9: Table 6.5 prompts, K = 8, the U-Net reward model; value function = its copy
        about="Table 6.2 Pink (thesis 6.9): SD v1.5, Table 6.5 prompts, K = 8, the U-Net reward model",
        diffusion=dict(pretrained=SD15, prompts="builtin:pink", num_steps=16, guidance_scale=7.5, precision="fp16"),
        sample=dict(num_tasks=120, k=8, instructions="builtin:pink", batch_size=16),  # Table 6.6 instructions
        train_reward=dict(epochs=40, batch_tasks=4, lr=1e-4, precision="fp16"),
        train_ppo=dict(resolution=512, conditioning="text", latent=True, reward="rm", num_envs=80, **PPO_RL,
                       vf_coef=0.1, kl_coef=0.0, epochs=25500, minibatch_size=16, policy_lr=1e-7, vf_lr=1e-6,
                       policy_warmup_steps=4096, vf_warmup_steps=1024, **ADAM, adam_eps=1e-8, weight_decay=0.01,
                       grad_accum_steps=2, max_grad_norm=1.0, tf32=True, value_fn="reward",
                       old_logprobs="recompute")),
    "pickscore": dict(  # thesis 6.10: PickScore v1 as the reward, appendix D evaluation prompts
        about="Table 6.2 PickScore (thesis 6.10): SD v1.5 with PickScore v1 as the reward",
        diffusion=dict(pretrained=SD15, prompts="builtin:pickscore-eval", num_steps=50, guidance_scale=7.5,
                       precision="fp16"),
        train_ppo=dict(resolution=512, conditioning="text", latent=True, reward="pickscore", num_envs=80, **PPO_RL,
                       vf_coef=0.1, kl_coef=0.0, epochs=20850, minibatch_size=10, policy_lr=5e-7, vf_lr=1e-6,
                       policy_warmup_steps=4096, vf_warmup_steps=1024, **ADAM, adam_eps=1e-8, weight_decay=0.01,
                       grad_accum_steps=4, max_grad_norm=1.0, tf32=True, value_fn="unet", old_logprobs="recompute")),

    # ----- offline stand-ins: learn within minutes on 2 CPU cores (learning rates differ from the thesis) -------
    "digits": dict(sample=dict(), train_reward=dict(),  # the Args defaults: grey "4"s of toy:digit4
                   about="offline: the grey 4s of toy:digit4 (the defaults)"),
    "digits-target": dict(train_ppo=dict(),               # the Args defaults: target-image reward on toy:digit4
                          about="offline stand-in for target: toy:digit4, target-image reward (the defaults)"),
    "digits-rgb": dict(diffusion=dict(pretrained="toy:digits-rgb"), sample=dict(num_tasks=40, k=5),
                       about="offline: class-conditional colour digits (toy:digits-rgb)"),
    # colour digits: the thesis's beta = 0.02 let the summed KL (~1e3 per trajectory here) swamp the reward at
    # these learning rates, so the stand-in uses beta = 0.002
    "digits-colorfulness": dict(
        about="offline stand-in for colorfulness: the colour digits, beta 0.002",
        diffusion=dict(pretrained="toy:digits-rgb", num_steps=25),
        train_ppo=dict(reward="colorfulness", value_fn="encoder", value_init="random", kl_coef=0.002,
                       minibatch_size=25, epochs=40, adam_eps=1e-8, weight_decay=0.0)),
    # Aesthetic Score on the colour digits with the toy classifier as value function: needs --aesthetic-clip and
    # --aesthetic-mlp (the real ones, or any CLIP vision model with an MLP of the predictor's layout); beta and
    # the learning rates scaled as in digits-colorfulness
    "digits-aesthetic": dict(
        about="offline stand-in for aesthetic: the colour digits (--aesthetic-clip, --aesthetic-mlp)",
        diffusion=dict(pretrained="toy:digits-rgb", num_steps=25),
        train_ppo=dict(reward="aesthetic", value_fn="classifier", classifier="toy:digits-rgb", kl_coef=0.003,
                       minibatch_size=25, epochs=30, policy_lr_early=2e-5, policy_lr_early_epochs=5, adam_eps=1e-8,
                       weight_decay=0.0)),
    # Macaw on class 4 of the colour digits: the toy classifier (OpenAI's architecture) + a linear layer as reward
    # model; its 10 logits are too few for a linear probe (66 % validation accuracy on ink rankings), so the middle
    # block and attention pool train too (96 %)
    "digits-macaw": dict(
        about="offline stand-in for macaw: class 4 of the colour digits, the toy classifier as reward model",
        diffusion=dict(pretrained="toy:digits-rgb", class_labels="4", num_steps=25),
        sample=dict(num_tasks=100, k=5),
        train_reward=dict(epochs=60, batch_tasks=8, lr=1e-3, cond_drop=0.0, backbone="classifier",
                          classifier="toy:digits-rgb", standardize=False, trainable="mid",
                          dataset="datasets/digits-macaw"),
        train_ppo=dict(reward="rm", reward_model="runs/reward-digits-macaw", value_fn="classifier",
                       classifier="toy:digits-rgb", kl_coef=0.002, minibatch_size=25, epochs=30, adam_eps=1e-8,
                       weight_decay=0.0)),
    "digits-macaw-norl": dict(
        about="offline stand-in for macaw-norl: class 4, the reward back-propagated through the chain",
        diffusion=dict(pretrained="toy:digits-rgb", class_labels="4", num_steps=25),
        train_ppo=dict(algo="backprop", reward="rm", reward_model="runs/reward-digits-macaw", value_fn="none",
                       kl_coef=0.0, num_envs=32, minibatch_size=100, grad_accum_steps=8, epochs=30, policy_lr=1e-4,
                       policy_warmup_steps=5, adam_eps=1e-8, weight_decay=0.01, max_grad_norm=None)),

    # ----- rectified-flow models (SD3 class, --sampler flow): the same method; docs/design.md "The rectified-flow MDP"
    # Experiment 1's analogue on the offline flow toy: the target-image reward, critic + GAE, Flow-GRPO's noise level
    "target-flow": dict(about="offline, rectified flow: Experiment 1's analogue on toy:digit4-flow (all four steps)",
                        diffusion=dict(pretrained="toy:digit4-flow", sampler="flow", eta=0.7),
                        sample=dict(), train_reward=dict(), train_ppo=dict()),
    # the peers' headline task (Flow-GRPO's pickscore_sd3) with the thesis's method: critic + GAE + per-step KL.
    # Equal work to Flow-GRPO on one GPU: 48 images = 4 prompts x 12 per epoch, 10 SDE steps at noise level 0.7,
    # CFG 4.5, 512 px, LoRA r 32 / alpha 64 on the attention, fp16, 2 optimizer steps per epoch, lr 3e-4. Their
    # log-prob is the mean over dimensions with clip 1e-4; their KL lacks the 1/|dt| of the step's variance, so their
    # beta 0.01 is ~0.001 on our per-step k3 (docs/experiments.md "SD3.5-Medium"). --advantage group: critic-free.
    "pickscore-sd3": dict(
        about="SD3.5-Medium with PickScore: Flow-GRPO's pickscore_sd3 task, critic + GAE + per-step KL",
        diffusion=dict(pretrained=SD35M, sampler="flow", eta=0.7, num_steps=10, guidance_scale=4.5, resolution=512,
                       prompts="builtin:pickscore-diverse", precision="fp16"),
        train_ppo=dict(**PICKSCORE_FLOW, num_envs=48, group_size=12, minibatch_size=12, grad_accum_steps=20,
                       lora_rank=32, lora_alpha=64.0)),
    # Flow-GRPO's pickscore_flux (32 GPUs) at its work per GPU: 36 images an epoch (12 batches of 3), 2 optimizer
    # steps, 6 SDE steps at noise level 0.9, FLUX.1-dev's guidance input 3.5 (one pass, no CFG), 512 px, LoRA r 64 /
    # alpha 128 on the attention and feed-forward projections, bf16, lr 3e-4, clip 1e-4. Theirs: groups of 24 across
    # GPUs, 5 of the 6 steps trained, beta 0 (no KL), T5 cut at 128 tokens (ours: FluxPipeline's 512), EMA
    # (docs/experiments.md "FLUX.1 and Qwen-Image").
    "pickscore-flux": dict(
        about="FLUX.1-dev with PickScore: Flow-GRPO's pickscore_flux task, critic + GAE + per-step KL",
        diffusion=dict(pretrained=FLUX1_DEV, sampler="flow", eta=0.9, num_steps=6, guidance_scale=3.5, resolution=512,
                       prompts="builtin:pickscore-diverse", precision="bf16"),
        train_ppo=dict(**PICKSCORE_FLOW, num_envs=36, group_size=12, minibatch_size=3, grad_accum_steps=36,
                       lora_rank=64, lora_alpha=128.0, lora_targets=FLUX_LORA)),
    # Flow-GRPO's pickscore_qwenimage (32 GPUs) at its work per GPU: 16 images an epoch (4 batches of 4), 2 optimizer
    # steps, 10 steps, true CFG 4 with the negative prompt " ", 512 px, LoRA r 64 / alpha 128 on the attention and MLP
    # projections, bf16, lr 3e-4, clip 1e-4. Theirs: the SDE (noise level 1.2) on 2 of the 10 steps, the rest
    # deterministic; the thesis's MDP needs a stochastic policy at every step: noise level 0.7 on all 10, as for SD3.
    "pickscore-qwen-image": dict(
        about="Qwen-Image with PickScore: Flow-GRPO's pickscore_qwenimage task, critic + GAE + per-step KL",
        diffusion=dict(pretrained=QWEN_IMAGE, sampler="flow", eta=0.7, num_steps=10, guidance_scale=4.0,
                       resolution=512, prompts="builtin:pickscore-diverse", precision="bf16"),
        train_ppo=dict(**PICKSCORE_FLOW, num_envs=16, group_size=16, minibatch_size=4, grad_accum_steps=20,
                       lora_rank=64, lora_alpha=128.0, lora_targets=QWEN_LORA)),
}
SCRIPTS = ("sample", "train_reward", "train_ppo")
SAMPLING_SCRIPTS = ("sample", "train_ppo")  # the scripts that take the diffusion settings


def about(name: str) -> str:
    """What the preset `name` is, in one line (`--help` lists it)."""
    return EXPERIMENTS[name].get("about", "")


def for_script(script: str) -> dict[str, dict]:
    """{preset name: overrides} for one script: the rows that have an entry for it, with the shared diffusion
    settings first for the sampling scripts."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; presets exist for {', '.join(SCRIPTS)}")
    return {name: {**(row.get("diffusion", {}) if script in SAMPLING_SCRIPTS else {}), **row[script]}
            for name, row in EXPERIMENTS.items() if script in row}
