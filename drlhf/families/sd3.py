"""SD3-class models through diffusers, the family's adapter (SD3Family, drlhf.families): the rectified-flow
transformer (SD3Transformer2DModel, Esser et al. 2024), its three text encoders, one conditioning tensor per
prompt, the transformer's first half as a feature extractor, and saving a policy as a StableDiffusion3Pipeline.

The conditioning of one prompt is ONE tensor (L + 1, D), so that the rollout buffers, minibatches, classifier-free
guidance and the reward model index it as they index SD1.5's text states:

    rows 0..76      CLIP-L and CLIP-G penultimate hidden states side by side (768 + 1280), zero-padded to D
    rows 77..L-1    T5-XXL's hidden states (256 tokens; zeros when the pipeline has no T5, as diffusers does)
    row  L          the pooled projection (CLIP-L's and CLIP-G's text_embeds side by side, 2048), zero-padded to D

D is the transformer's joint_attention_dim (4096). `unpack` splits it again for the transformer's call. FLUX.1 (one
CLIP, one T5, a guidance input instead of CFG) would be a family of its own beside this one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from drlhf.families.base import Family, JointTransformerFamily

TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def is_sd3(net: nn.Module) -> bool:
    """An SD3-class transformer (velocity prediction, joint attention over image and text tokens)."""
    from diffusers import SD3Transformer2DModel
    return isinstance(net, SD3Transformer2DModel)


def load_parts(path: Path, weights_dtype, device):
    """transformer, vae and the [(text encoder, tokenizer)] of a StableDiffusion3Pipeline folder (text_encoder_3 may
    be absent: SD3 then conditions on zeros in the T5 rows)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", low_cpu_mem_usage=False).float().to(device)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=weights_dtype, low_cpu_mem_usage=False).to(device).eval()
    texts = []
    for (enc, tok), cls in zip(TEXT_PARTS, (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)):
        if (path / enc).exists():
            texts.append((cls.from_pretrained(path / enc, torch_dtype=weights_dtype).to(device).eval(),
                          AutoTokenizer.from_pretrained(path / tok)))
        elif enc != "text_encoder_3":
            raise FileNotFoundError(f"{path / enc} is missing (an SD3 pipeline has two CLIP text encoders)")
    return transformer, vae, texts


@torch.no_grad()
def encode_prompts(texts, joint_dim: int, prompts: list[str]) -> torch.Tensor:
    """Prompts -> packed conditioning (N, 77 + 256 + 1, joint_dim), float32 (see the module docstring)."""
    clip_states, pooled = [], []
    for encoder, tokenizer in texts[:2]:  # CLIP-L, CLIP-G: penultimate layer (SD3's clip_skip None), text_embeds
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        clip_states.append(out.hidden_states[-2].float())
        pooled.append(out.text_embeds.float())
    clip = torch.cat(clip_states, -1)                                            # (N, 77, 768 + 1280)
    if len(texts) > 2:
        encoder, tokenizer = texts[2]
        ids = tokenizer(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(encoder.device)
        t5 = encoder(ids)[0].float()                                              # (N, 256, 4096)
    else:
        t5 = clip.new_zeros(len(prompts), T5_TOKENS, joint_dim)
    pooled = torch.cat(pooled, -1)                                                # (N, 2048)
    if clip.shape[-1] > joint_dim or pooled.shape[-1] > joint_dim or t5.shape[-1] != joint_dim:
        raise ValueError(f"text encoders of widths {clip.shape[-1]}/{t5.shape[-1]} do not fit the transformer's "
                         f"joint_attention_dim {joint_dim}")
    embeds = torch.cat([F.pad(clip, (0, joint_dim - clip.shape[-1])), t5], 1)    # (N, 333, joint_dim)
    return torch.cat([embeds, F.pad(pooled, (0, joint_dim - pooled.shape[-1]))[:, None]], 1)


def unpack(cond: torch.Tensor, pooled_dim: int):
    """Packed conditioning (B, L + 1, D) -> text states (B, L, D) and the pooled projection (B, pooled_dim)."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def call_transformer(net: nn.Module, x, t, cond, pooled_dim: int) -> torch.Tensor:
    """The velocity v(x_t, t, c) (B, C, H, W) of an SD3 transformer."""
    embeds, pooled = unpack(cond, pooled_dim)
    dtype = x.dtype
    return net(hidden_states=x, timestep=t, encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
               return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------------
# The first half of the transformer: the reward model's and value function's backbone (thesis 5.2 carried over)
# ---------------------------------------------------------------------------------------------------------
def first_half(net: nn.Module) -> nn.Module:
    """A copy of the transformer with its first half of joint blocks and without its output layers (the rest is
    left out of the copy, not copied and dropped)."""
    blocks = net.transformer_blocks
    return Family.copy_with(net, {"transformer_blocks": nn.ModuleList(list(blocks)[:max(1, len(blocks) // 2)]),
                                  "norm_out": None, "proj_out": None})


def run_first_half(half: nn.Module, x, t, cond) -> torch.Tensor:
    """Image tokens (B, D, N) after the kept joint blocks: patch embedding, time + pooled-text embedding, the
    context embedder over the text states, then the blocks (image and text attend jointly)."""
    embeds, pooled = unpack(cond, half.config.pooled_projection_dim)
    h = half.pos_embed(x)                                                          # (B, N, D)
    temb = half.time_text_embed(t.to(x.dtype), pooled.to(x.dtype))
    ctx = half.context_embedder(embeds.to(x.dtype))
    for block in half.transformer_blocks:
        ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
    return h.transpose(1, 2)                                                       # (B, D, N), as a U-Net's (B, C, h*w)


# ---------------------------------------------------------------------------------------------------------
# Saving a policy
# ---------------------------------------------------------------------------------------------------------
def save_pipeline(transformer: nn.Module, base, folder: Path):
    """Write a StableDiffusion3Pipeline folder: the trained transformer with the base model's other parts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    parts = {}
    for (enc, tok), (encoder, tokenizer) in zip(TEXT_PARTS, base.text_encoders + [(None, None)] * 3):
        parts[enc], parts[tok] = encoder, tokenizer
    StableDiffusion3Pipeline(transformer=transformer, vae=base.vae, **parts,
                             scheduler=FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config)
                             ).save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------
class SD3Family(JointTransformerFamily):
    name = "SD3 transformer"
    repeated_blocks = ("JointTransformerBlock",)

    def owns(self, net):
        return is_sd3(net)

    def claims(self, path, pipeline_class):
        return (pipeline_class or "").startswith("StableDiffusion3") or (pipeline_class is None and
                                                                          (path / "transformer").is_dir())

    def load(self, source, path, device, weights_dtype, flag):
        """The transformer (the policy network, float32 master weights), its VAE and three text encoders (frozen,
        in weights_dtype)."""
        from drlhf.models import BaseModel
        transformer, vae, texts = load_parts(path, weights_dtype, device)
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        for module in [transformer, vae] + [enc for enc, _ in texts]:
            module.requires_grad_(False)
        c = transformer.config
        return BaseModel(source, str(path), transformer, sched_cfg, "text", (c.in_channels, c.sample_size, c.sample_size),
                         vae=vae, text_encoder=texts[0][0], tokenizer=texts[0][1], text_encoders=texts)

    def call(self, net, x, t, cond, conditioning, guidance=None):
        return call_transformer(net, x, t, cond, net.config.pooled_projection_dim)

    def sample_shape(self, net, shape, resolution, source):
        """Patches: any multiple of 8 x the patch size, up to the position-embedding table's size."""
        c, patch = net.config, net.config.patch_size
        if resolution % (8 * patch) or resolution // 8 > c.pos_embed_max_size * patch:
            raise ValueError(f"--resolution {resolution}: {source} takes multiples of {8 * patch} up to "
                             f"{8 * c.pos_embed_max_size * patch}")
        return (shape[0], resolution // 8, resolution // 8)

    def fingerprint(self, net):
        return self.hash_config_and(net, (net.pos_embed, net.transformer_blocks[0]))

    def encoder_copy(self, net):
        return first_half(net)

    def features(self, half, x, t, conditioning, cond=None, drop=None, null=None):
        return run_first_half(half, x, t, self.text_condition(x, cond, drop, null))

    def encoder_parts(self, half):
        return ["pos_embed", "time_text_embed", "context_embedder", f"transformer_blocks[:{len(half.transformer_blocks)}]"]

    def last_encoder_block(self, half):
        return half.transformer_blocks[-1]

    def encode_prompts(self, base, prompts):
        return encode_prompts(base.text_encoders, base.net.config.joint_attention_dim, prompts)

    def save_pipeline(self, net, base, folder):
        save_pipeline(net, base, folder)
