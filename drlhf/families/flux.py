"""FLUX.1 through diffusers, the family's adapter (FluxFamily, drlhf.families): the rectified-flow transformer
(FluxTransformer2DModel: double-stream then single-stream blocks over 2x2-packed latents, Black Forest Labs 2024),
CLIP-L's pooled output and T5-XXL's states as the condition, FLUX.1-dev's distilled guidance input (one pass, no
classifier-free doubling; FLUX.1-schnell has none), the resolution-dependent timestep shift, and saving a policy as
a FluxPipeline.

The MDP keeps latents as (B, C, H, W), as for every family: the adapter packs each 2x2 patch into one token for the
transformer's call and unpacks its output (a permutation, so the Gaussian policy's log-likelihood is unchanged).

The conditioning of one prompt is ONE tensor (L + 1, D), as for SD3 (drlhf.families.sd3):

    rows 0..L-1   T5's hidden states (L = 512 tokens, FluxPipeline's max_sequence_length)
    row  L        CLIP-L's pooled output (768), zero-padded to D

D is the transformer's joint_attention_dim (4096). Prompts are encoded by FluxPipeline.encode_prompt itself.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from drlhf.families.base import PackedFlowFamily, pack_patches, unpack_patches

T5_TOKENS = 512  # FluxPipeline's default max_sequence_length
FEATURE_GUIDANCE = 1.0  # the guidance input the encoder half sees (a reward model has no guidance scale of its own)


def is_flux(net: nn.Module) -> bool:
    from diffusers import FluxTransformer2DModel
    return isinstance(net, FluxTransformer2DModel)


def unpack(cond: torch.Tensor, pooled_dim: int):
    """Packed conditioning (B, L + 1, D) -> T5 states (B, L, D) and CLIP's pooled output (B, pooled_dim)."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """The rotary position ids of the (h/2) x (w/2) image tokens: (0, row, column) each, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)


def embed(net: nn.Module, x, t, cond, guidance):
    """The transformer's inputs: image tokens, text tokens, the time (+ guidance) + pooled-text embedding and the
    rotary embedding of text then image positions."""
    embeds, pooled = unpack(cond, net.config.pooled_projection_dim)
    dtype = x.dtype
    h = net.x_embedder(pack_patches(x))
    time = (t.to(dtype) / 1000).to(dtype) * 1000  # as the forward sees the pipeline's timestep / 1000
    if net.config.guidance_embeds:
        g = torch.full((len(x),), guidance, device=x.device, dtype=torch.float32).to(dtype) * 1000
        temb = net.time_text_embed(time, g, pooled.to(dtype))
    else:
        temb = net.time_text_embed(time, pooled.to(dtype))
    ctx = net.context_embedder(embeds.to(dtype))
    ids = torch.cat([torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
                     image_ids(x.shape[2], x.shape[3], x.device, dtype)])
    return h, ctx, temb, net.pos_embed(ids)


class FluxFamily(PackedFlowFamily):
    name = "FLUX.1 transformer"
    repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    def owns(self, net):
        return is_flux(net)

    # ---- loading -----------------------------------------------------------------------------------------------
    def claims(self, path, pipeline_class):
        return pipeline_class == "FluxPipeline"

    def load(self, source, path, device, weights_dtype, flag):
        """transformer/ (float32 master weights), vae/, text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ +
        tokenizer_2/ (T5), scheduler/."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from drlhf.models import BaseModel
        transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", low_cpu_mem_usage=False)
        transformer = transformer.float().to(device)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=weights_dtype, low_cpu_mem_usage=False)
        texts = [(CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=weights_dtype),
                  CLIPTokenizer.from_pretrained(path / "tokenizer")),
                 (T5EncoderModel.from_pretrained(path / "text_encoder_2", torch_dtype=weights_dtype),
                  T5TokenizerFast.from_pretrained(path / "tokenizer_2"))]
        for module in [transformer, vae] + [enc for enc, _ in texts]:
            module.requires_grad_(False).to(device)
        vae.eval()
        for enc, _ in texts:
            enc.eval()
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        channels = vae.config.latent_channels  # FluxPipeline's default 1024 px: 128 x 128 latents
        return BaseModel(source, str(path), transformer, sched_cfg, "text", (channels, 128, 128), vae=vae,
                         text_encoder=texts[0][0], tokenizer=texts[0][1], text_encoders=texts)

    @staticmethod
    def pipeline(base, transformer=None):
        """The base model's parts as a FluxPipeline (no weights copied)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
        (clip, tok), (t5, tok_2) = base.text_encoders
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config), vae=base.vae,
                            text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok_2,
                            transformer=transformer)

    # ---- the policy's network ----------------------------------------------------------------------------
    def call(self, net, x, t, cond, conditioning, guidance=None):
        """The velocity (B, C, H, W): FluxTransformer2DModel over the packed latents, timestep and guidance as
        FluxPipeline gives them (/ 1000; the transformer scales both back)."""
        embeds, pooled = unpack(cond, net.config.pooled_projection_dim)
        g = None
        if net.config.guidance_embeds:
            g = torch.full((len(x),), FEATURE_GUIDANCE if guidance is None else guidance, device=x.device,
                           dtype=torch.float32)
        out = net(hidden_states=pack_patches(x), timestep=t.to(x.dtype) / 1000, guidance=g,
                  pooled_projections=pooled.to(x.dtype), encoder_hidden_states=embeds.to(x.dtype),
                  txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                  img_ids=image_ids(x.shape[2], x.shape[3], x.device, x.dtype), return_dict=False)[0]
        return unpack_patches(out, x.shape[2], x.shape[3])

    def guidance_input(self, net):
        return bool(net.config.guidance_embeds)  # FLUX.1-dev: yes; FLUX.1-schnell: no (and no guidance at all)

    # ---- identity ------------------------------------------------------------------------------------------
    def fingerprint(self, net):
        return self.hash_config_and(net, (net.x_embedder, net.transformer_blocks[0]))

    # ---- the encoder half: the first half of all blocks (double-stream first, then single-stream) --------------
    def encoder_copy(self, net):
        double, single = list(net.transformer_blocks), list(net.single_transformer_blocks)
        keep = max(1, (len(double) + len(single)) // 2)
        return self.copy_with(net, {"transformer_blocks": nn.ModuleList(double[:keep]),
                                    "single_transformer_blocks": nn.ModuleList(single[:max(0, keep - len(double))]),
                                    "norm_out": None, "proj_out": None})

    def features(self, half, x, t, conditioning, cond=None, drop=None, null=None):
        """Image tokens (B, D, N) after the kept blocks (guidance input FEATURE_GUIDANCE)."""
        h, ctx, temb, rotary = embed(half, x, t, self.text_condition(x, cond, drop, null), FEATURE_GUIDANCE)
        for block in list(half.transformer_blocks) + list(half.single_transformer_blocks):
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb, image_rotary_emb=rotary)
        return h.transpose(1, 2)

    def encoder_parts(self, half):
        return ["x_embedder", "time_text_embed", "context_embedder", f"transformer_blocks[:{len(half.transformer_blocks)}]",
                f"single_transformer_blocks[:{len(half.single_transformer_blocks)}]"]

    def last_encoder_block(self, half):
        return (list(half.transformer_blocks) + list(half.single_transformer_blocks))[-1]

    # ---- text and saving -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, base, prompts):
        """FluxPipeline.encode_prompt's T5 states and CLIP pooled output, packed (N, 513, D) float32."""
        device = next(base.text_encoders[1][0].parameters()).device
        embeds, pooled, _ = self.pipeline(base).encode_prompt(prompts, prompts, device=device,
                                                              max_sequence_length=T5_TOKENS)
        d = base.net.config.joint_attention_dim
        if embeds.shape[-1] != d or pooled.shape[-1] > d:
            raise ValueError(f"text encoders of widths {pooled.shape[-1]}/{embeds.shape[-1]} do not fit the "
                             f"transformer's joint_attention_dim {d}")
        pooled = torch.nn.functional.pad(pooled.float(), (0, d - pooled.shape[-1]))
        return torch.cat([embeds.float(), pooled[:, None]], 1)
