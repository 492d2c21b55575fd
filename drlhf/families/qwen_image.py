"""Qwen-Image through diffusers, the family's adapter (QwenImageFamily, drlhf.families): the rectified-flow MMDiT
(QwenImageTransformer2DModel over 2x2-packed latents, Qwen team 2025), the last hidden states of its Qwen2.5-VL text
encoder as the condition (variable length, with a mask), true classifier-free guidance with a negative prompt and
QwenImagePipeline's norm rescaling, its video-shaped VAE (one frame; latents normalised per channel), the
resolution-dependent timestep shift with a terminal sigma, and saving a policy as a QwenImagePipeline.

The MDP keeps latents as (B, C, H, W), as for every family: the adapter packs 2x2 patches into tokens for the
transformer (drlhf.families.base.pack_patches) and adds the VAE's frame axis only to decode.

The conditioning of one prompt is ONE tensor (L + 1, D): rows 0..L-1 the text states (QwenImagePipeline's
encode_prompt, zero-padded to L = 512, its max_sequence_length), row L holds the number of real tokens in its first
entry (the mask: rows below that number). D is the transformer's joint_attention_dim (3584).
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from drlhf.families.base import PackedFlowFamily, pack_patches, unpack_patches

TEXT_TOKENS = 512  # QwenImagePipeline's default max_sequence_length


def is_qwen_image(net: nn.Module) -> bool:
    from diffusers import QwenImageTransformer2DModel
    return isinstance(net, QwenImageTransformer2DModel)


def unpack(cond: torch.Tensor):
    """Packed conditioning (B, L + 1, D) -> text states (B, L, D) and their mask (B, L) bool."""
    states, count = cond[:, :-1], cond[:, -1, 0]
    return states, torch.arange(states.shape[1], device=cond.device)[None] < count[:, None]


def embed(net: nn.Module, x, t, cond):
    """The transformer's inputs: image tokens, text tokens and mask, the time embedding, the rotary embedding."""
    states, mask = unpack(cond)
    dtype = x.dtype
    h = net.img_in(pack_patches(x))
    ctx = net.txt_in(net.txt_norm(states.to(dtype)))
    temb = net.time_text_embed((t.to(dtype) / 1000).to(dtype), h)
    rotary = net.pos_embed([[(1, x.shape[2] // 2, x.shape[3] // 2)]] * len(x), max_txt_seq_len=states.shape[1],
                           device=x.device)
    return h, ctx, mask, temb, rotary


class QwenImageFamily(PackedFlowFamily):
    name = "Qwen-Image transformer"
    repeated_blocks = ("QwenImageTransformerBlock",)
    negative_prompt = " "  # the pipeline guides only with a negative prompt; Flow-GRPO's and Qwen's examples pass " "

    def owns(self, net):
        return is_qwen_image(net)

    # ---- loading -----------------------------------------------------------------------------------------------
    def claims(self, path, pipeline_class):
        return pipeline_class == "QwenImagePipeline"

    def load(self, source, path, device, weights_dtype, flag):
        """transformer/ (float32 master weights), vae/, text_encoder/ (Qwen2.5-VL) + tokenizer/, scheduler/."""
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from drlhf.models import BaseModel
        transformer = QwenImageTransformer2DModel.from_pretrained(path / "transformer", low_cpu_mem_usage=False)
        transformer = transformer.float().to(device)
        vae = AutoencoderKLQwenImage.from_pretrained(path / "vae", torch_dtype=weights_dtype, low_cpu_mem_usage=False)
        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", torch_dtype=weights_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        for module in (transformer, vae, encoder):
            module.requires_grad_(False).to(device)
        vae.eval()
        encoder.eval()
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        channels = transformer.config.in_channels // 4  # QwenImagePipeline's default 1024 px: 128 x 128 latents
        return BaseModel(source, str(path), transformer, sched_cfg, "text", (channels, 128, 128), vae=vae,
                         text_encoder=encoder, tokenizer=tokenizer, text_encoders=[(encoder, tokenizer)])

    @staticmethod
    def pipeline(base, transformer=None):
        """The base model's parts as a QwenImagePipeline (no weights copied)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config),
                                 vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                 transformer=transformer)

    # ---- the policy's network ----------------------------------------------------------------------------
    def call(self, net, x, t, cond, conditioning, guidance=None):
        """The velocity (B, C, H, W): QwenImageTransformer2DModel over the packed latents, the text masked."""
        states, mask = unpack(cond)
        out = net(hidden_states=pack_patches(x), timestep=t.to(x.dtype) / 1000, encoder_hidden_states=states.to(x.dtype),
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, x.shape[2] // 2, x.shape[3] // 2)]] * len(x),
                  return_dict=False)[0]
        return unpack_patches(out, x.shape[2], x.shape[3])

    def guide(self, out_c, out_u, scale):
        """True CFG, then each token's prediction rescaled to the norm of its conditional one (QwenImagePipeline)."""
        guided = pack_patches(super().guide(out_c, out_u, scale))
        cond_norm = pack_patches(out_c).norm(dim=-1, keepdim=True)
        return unpack_patches(guided * (cond_norm / guided.norm(dim=-1, keepdim=True)), out_c.shape[2], out_c.shape[3])

    def decode(self, vae, latents):
        """Per-channel normalised latents (B, C, h, w) -> one frame of the video VAE -> images (B, 3, H, W)."""
        c = vae.config
        mean = torch.tensor(c.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(c.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return vae.decode((latents * std + mean)[:, :, None]).sample[:, :, 0]

    # ---- identity ------------------------------------------------------------------------------------------
    def fingerprint(self, net):
        return self.hash_config_and(net, (net.img_in, net.transformer_blocks[0]))

    # ---- the encoder half: the first half of the blocks ------------------------------------------------------
    def encoder_copy(self, net):
        blocks = net.transformer_blocks
        return self.copy_with(net, {"transformer_blocks": nn.ModuleList(list(blocks)[:max(1, len(blocks) // 2)]),
                                    "norm_out": None, "proj_out": None})

    def features(self, half, x, t, conditioning, cond=None, drop=None, null=None):
        """Image tokens (B, D, N) after the kept blocks."""
        h, ctx, mask, temb, rotary = embed(half, x, t, self.text_condition(x, cond, drop, null))
        for block in half.transformer_blocks:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, temb=temb,
                           image_rotary_emb=rotary)
        return h.transpose(1, 2)

    def encoder_parts(self, half):
        return ["img_in", "txt_norm", "txt_in", "time_text_embed", f"transformer_blocks[:{len(half.transformer_blocks)}]"]

    def last_encoder_block(self, half):
        return half.transformer_blocks[-1]

    def condition_tokens(self, half, conditioning, cond):
        return cond[:, :-1]  # the text states (padding rows are zeros), not the row holding the count

    # ---- text and saving -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, base, prompts):
        """QwenImagePipeline.encode_prompt's states, zero-padded to TEXT_TOKENS, with the count row (N, 513, D)."""
        device = next(base.text_encoder.parameters()).device
        states, mask = self.pipeline(base).encode_prompt(prompts, device=device, max_sequence_length=TEXT_TOKENS)
        d = base.net.config.joint_attention_dim
        if states.shape[-1] != d:
            raise ValueError(f"a text encoder of width {states.shape[-1]} does not fit the transformer's "
                             f"joint_attention_dim {d}")
        count = mask.sum(1) if mask is not None else torch.full((len(prompts),), states.shape[1], device=states.device)
        states = F.pad(states.float(), (0, 0, 0, TEXT_TOKENS - states.shape[1]))
        row = F.pad(count.float()[:, None], (0, d - 1))
        return torch.cat([states, row[:, None]], 1)
