"""The interface of a model family's adapter (drlhf.families): everything that differs between the denoising
networks the method trains. The method asks its network's adapter (`family_of(net)`) instead of testing the
network's type; each family implements these in its own file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn


class Family:
    name = "family"
    any_size = False        # a transformer over patches samples at any multiple of its patch grid
    repeated_blocks = ()    # class names of the blocks the network repeats (--compile-scope blocks compiles each)
    reward_model = True     # the U-Net-encoder reward model (thesis 5.2) can be built on it

    lora_targets = "to_q,to_k,to_v,to_out.0"  # --lora-targets' default: the attention projections
    negative_prompt = ""    # the unconditional branch of classifier-free guidance for a text model

    def owns(self, net: nn.Module) -> bool:
        """Whether `net` is this family's denoising network."""
        raise NotImplementedError

    # ---- loading -----------------------------------------------------------------------------------------------
    spec_prefix: str | None = None  # a --pretrained that names a model file by prefix (guided-diffusion:PATH)

    def load_spec(self, spec: str, device, cache_dir, flag: str):
        """The BaseModel of a --pretrained that starts with spec_prefix."""
        raise NotImplementedError

    def claims(self, path: Path, pipeline_class: str | None) -> bool:
        """Whether the local folder `path` holds this family's model; pipeline_class is model_index.json's
        _class_name (None for a folder without one)."""
        return False

    def load(self, source: str, path: Path, device, weights_dtype, flag: str):
        """The folder's BaseModel (drlhf.models): the denoising network in float32 (the policy's master weights),
        the frozen parts (VAE, text encoders) in weights_dtype, everything frozen. Errors name `flag`."""
        raise NotImplementedError

    # ---- the policy's network ----------------------------------------------------------------------------
    def guidance_input(self, net: nn.Module) -> bool:
        """Whether the network takes the guidance scale as an input (guidance distillation, FLUX.1-dev) instead
        of classifier-free guidance's two passes."""
        return False

    def guide(self, out_c: torch.Tensor, out_u: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance from the conditional and unconditional outputs (B, C, H, W), float32:
        out_u + w (out_c - out_u) (Ho & Salimans 2022)."""
        return out_u + scale * (out_c - out_u)

    def flow_timesteps(self, net: nn.Module, scheduler_config: dict, sample_shape: tuple, num_steps: int) -> dict:
        """What the family's pipeline gives its flow scheduler besides the number of steps: sigmas (a list) and
        mu (the resolution-dependent shift); {} for the scheduler's own (drlhf.sampler.FlowSchedule.for_model)."""
        return {}

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) through the family's VAE, in the VAE's dtype (SD3's and
        FLUX's VAE: latents = (z - shift_factor) * scaling_factor)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift).sample

    # ---- the policy's network ----------------------------------------------------------------------------
    def call(self, net: nn.Module, x, t, cond, conditioning: str, guidance: float | None = None) -> torch.Tensor:
        """The network's raw output (B, C', H, W) for x_t (B, C, H, W), timesteps t (B,) and the condition (None,
        class labels (B,) or the packed text conditioning (B, L, D)); guidance: the scale a guidance-distilled
        network takes as input (guidance_input)."""
        raise NotImplementedError

    def has_null_class(self, net: nn.Module, num_classes: int) -> bool:
        """Whether a class model has an unconditional class embedding to guide with (classifier-free guidance)."""
        return False

    def sample_shape(self, net: nn.Module, shape: tuple, resolution: int, source: str) -> tuple:
        """The (C, H, W) of x_t for an image of `resolution` pixels (a latent model's VAE downsamples by 8);
        only families with any_size change it (others are checked against their own size by the caller)."""
        return shape

    def plain_copy(self, net: nn.Module) -> nn.Module:
        """A fresh module of the same architecture (merging LoRA adapters writes into it)."""
        import copy
        return copy.deepcopy(net)

    # ---- identity ------------------------------------------------------------------------------------------
    def fingerprint(self, net: nn.Module) -> str | None:
        """Identity of a base network: its config and the values of its input layer and first block (None where
        the family has no config to read)."""
        return None

    @staticmethod
    def hash_config_and(net: nn.Module, first: tuple) -> str:
        """The fingerprint of a diffusers network: its config (private keys left out) and the parameters of its
        input layer and the first four of its first block."""
        h = hashlib.sha256(json.dumps({k: v for k, v in dict(net.config).items() if not k.startswith("_")},
                                      sort_keys=True, default=str).encode())
        for p in list(first[0].parameters()) + list(first[1].parameters())[:4]:
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- the encoder half: the reward model's, the value function's and the diversity's backbone --------------
    @staticmethod
    def copy_with(net: nn.Module, replaced: dict) -> nn.Module:
        """A deep copy of `net` with its submodules named in `replaced` swapped for the given modules (None: left
        out; a shorter ModuleList: the first blocks only). What is replaced is never copied; `net` is unchanged."""
        import copy
        kept = {n: getattr(net, n) for n in replaced}
        try:
            for n, module in replaced.items():
                setattr(net, n, module)
            return copy.deepcopy(net)
        finally:
            for n, module in kept.items():
                setattr(net, n, module)

    @classmethod
    def copy_without(cls, net: nn.Module, names: tuple) -> nn.Module:
        """A deep copy of `net` without its submodules `names` (left out of the copy, not copied and dropped)."""
        return cls.copy_with(net, {n: None for n in names if isinstance(getattr(net, n, None), nn.Module)})

    def encoder_copy(self, net: nn.Module) -> nn.Module:
        """A copy of the network's encoder half (what is dropped is left out of the copy, not copied and dropped)."""
        raise NotImplementedError

    def features(self, half: nn.Module, x, t, conditioning: str, cond=None, drop=None, null=None) -> torch.Tensor:
        """Encoder features (B, C, h, w) or tokens (B, D, N) of inputs x at timesteps t. cond: the condition or
        None (unconditioned); drop (B,) bool: inputs whose condition is replaced by the null one (`null`, the
        empty prompt's conditioning, or no class embedding)."""
        raise NotImplementedError

    @staticmethod
    def text_condition(x, cond, drop, null) -> torch.Tensor:
        """The text conditioning a features() call sees: `cond` (B, L, D), with the null conditioning (1, L, D) in
        the rows `drop` marks; the null one for every input where there is no condition."""
        c = null.expand(len(x), -1, -1).to(x.dtype if cond is None else cond.dtype)
        if cond is None:
            return c
        return cond if drop is None else torch.where(drop[:, None, None], c, cond)

    def encoder_dims(self, net: nn.Module, conditioning: str) -> tuple[int, int | None]:
        """(feature width, width of the condition tokens or None) of the encoder half."""
        raise NotImplementedError

    def encoder_parts(self, half: nn.Module) -> list[str]:
        """The names of the encoder half's parts, for a reward model's config.json."""
        raise NotImplementedError

    def last_encoder_block(self, half: nn.Module) -> nn.Module:
        """What `--trainable mid` trains: the last block of the encoder half."""
        raise NotImplementedError

    def condition_tokens(self, half: nn.Module, conditioning: str, cond) -> torch.Tensor | None:
        """The tokens the reward head attends to beside the image features (B, L, width): the text states, or a
        class's embedding; None unconditioned."""
        return None

    # ---- text and saving -------------------------------------------------------------------------------------
    def encode_prompts(self, base, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the one conditioning tensor per prompt the buffers carry (N, L, D), float32."""
        raise ValueError(f"{base.source} takes no text")

    def save_pipeline(self, net: nn.Module, base, folder: Path):
        """Write the policy `net` with the base model's other parts into `folder` (already created), as this
        family's own pipeline format."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# What the diffusers MMDiT transformers share (SD3, FLUX.1, Qwen-Image)
# ---------------------------------------------------------------------------------------------------------
class JointTransformerFamily(Family):
    """A transformer over image patches with joint image-text attention blocks: it samples at any size, LoRA goes
    on both streams' attention projections, its encoder half gives tokens as wide as its attention, and the reward
    head attends to the packed text conditioning."""
    any_size = True
    lora_targets = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # image and text projections

    def plain_copy(self, net):
        return type(net).from_config(net.config)

    def encoder_dims(self, net, conditioning):
        return net.config.num_attention_heads * net.config.attention_head_dim, net.config.joint_attention_dim

    def condition_tokens(self, half, conditioning, cond):
        return cond


class PackedFlowFamily(JointTransformerFamily):
    """FLUX.1 and Qwen-Image: 2x2-packed latents of an 8x VAE, and a pipeline that gives its flow scheduler sigmas
    evenly from 1 to 1/T and a shift mu from the image's token count. `pipeline(base, transformer)` is the family's
    diffusers pipeline of the base model's parts."""

    @staticmethod
    def pipeline(base, transformer=None):
        raise NotImplementedError

    def sample_shape(self, net, shape, resolution, source):
        """Any multiple of 16 pixels (8x the VAE, 2x2 patches)."""
        if resolution % 16:
            raise ValueError(f"--resolution {resolution}: {source} takes multiples of 16")
        return (shape[0], resolution // 8, resolution // 8)

    def flow_timesteps(self, net, scheduler_config, sample_shape, num_steps):
        from drlhf.sampler import calculate_shift
        tokens = (sample_shape[1] // 2) * (sample_shape[2] // 2)
        return dict(sigmas=torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).tolist(),
                    mu=calculate_shift(tokens, scheduler_config))

    def save_pipeline(self, net, base, folder: Path):
        self.pipeline(base, net).save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# 2x2 patches: the token layout of FLUX.1's and Qwen-Image's transformers (the MDP keeps latents as (B, C, H, W))
# ---------------------------------------------------------------------------------------------------------
def pack_patches(x: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> tokens (B, H/2 * W/2, 4C): each 2x2 patch one token, channel-major within it."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * (w // 2), 4 * c)


def unpack_patches(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack_patches: tokens (B, h/2 * w/2, 4C) -> latents (B, C, h, w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)
