"""Diffusers U-Nets: UNet2DModel (the offline toys, DDPM- and flow-trained) and UNet2DConditionModel (Stable
Diffusion v1.5/2.x, the tests' tiny SD pipeline). The encoder half is conv_in, the down blocks and the mid block
(thesis 5.2: the reward model reuses it); the policy is saved as a DDPMPipeline or a StableDiffusionPipeline."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from drlhf.families.base import Family

DECODER = ("up_blocks", "conv_norm_out", "conv_act", "conv_out")  # what the encoder half leaves out


class UNetFamily(Family):
    name = "diffusers U-Net"
    repeated_blocks = ("BasicTransformerBlock", "ResnetBlock2D")

    def owns(self, net):
        return hasattr(net, "config") and hasattr(net, "down_blocks") and hasattr(net, "conv_in")

    def claims(self, path, pipeline_class):
        return True  # the last folder family: a pipeline with unet/, a bare U-Net folder (or an error naming them)

    def load(self, source, path, device, weights_dtype, flag):
        """A pipeline folder (model_index.json, unet/, scheduler/, and for Stable Diffusion vae/, text_encoder/,
        tokenizer/) or a bare UNet2DModel folder (config.json, scheduler_config.json beside it)."""
        from diffusers import UNet2DConditionModel, UNet2DModel

        from drlhf.models import BaseModel, ModelLoadError
        if (path / "model_index.json").exists():
            unet_dir, sched_path = path / "unet", path / "scheduler" / "scheduler_config.json"
        else:
            unet_dir, sched_path = path, path / "scheduler_config.json"
        cfg_file = unet_dir / "config.json"
        if not cfg_file.exists():
            raise ModelLoadError(f"{flag} {source}: {cfg_file} is missing; expected a diffusers pipeline "
                                 "folder (model_index.json, unet/ or transformer/, scheduler/) or a UNet folder")
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
        unet_cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(cls_name)
        if unet_cls is None:
            raise ModelLoadError(f"{flag} {source}: unsupported U-Net class {cls_name!r} in {cfg_file}")
        unet = unet_cls.from_pretrained(unet_dir, low_cpu_mem_usage=False).to(device)
        sched_cfg = json.loads(sched_path.read_text()) if sched_path.exists() else {}
        vae = text_encoder = tokenizer = None
        if (path / "vae").exists():
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=weights_dtype, low_cpu_mem_usage=False)
            vae = vae.to(device).eval()
        if (path / "text_encoder").exists():
            from transformers import CLIPTextModel, CLIPTokenizer
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=weights_dtype)
            text_encoder = text_encoder.to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.requires_grad_(False)
        toy = json.loads((path / "drlhf_toy.json").read_text()) if (path / "drlhf_toy.json").exists() else {}
        c = unet.config
        if text_encoder is not None:
            conditioning, num_classes = "text", 0
        elif getattr(c, "num_class_embeds", None):
            # toy models reserve their last class embedding for "no class" (CFG); other models use them all
            conditioning, num_classes = "class", toy.get("num_classes", c.num_class_embeds)
        elif getattr(c, "class_embed_type", None) is not None:
            raise ModelLoadError(f"{flag} {source}: class_embed_type={c.class_embed_type!r} is not supported")
        else:
            conditioning, num_classes = "none", 0
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return BaseModel(source, str(path), unet, sched_cfg, conditioning, (c.in_channels, size, size), num_classes,
                         vae, text_encoder, tokenizer, extra=toy)

    def call(self, net, x, t, cond, conditioning, guidance=None):
        if conditioning == "none":
            return net(x, t).sample
        if conditioning == "class":
            return net(x, t, class_labels=cond).sample
        return net(x, t, encoder_hidden_states=cond).sample

    def has_null_class(self, net, num_classes):
        return (getattr(net.config, "num_class_embeds", None) or 0) > num_classes  # the toys reserve the last one

    def plain_copy(self, net):
        return type(net).from_config(net.config)

    def fingerprint(self, net):
        return self.hash_config_and(net, (net.conv_in, net.down_blocks[0]))

    def encoder_copy(self, net):
        return self.copy_without(net, DECODER)

    def features(self, half, x, t, conditioning, cond=None, drop=None, null=None):
        emb = half.time_embedding(half.time_proj(t).to(x.dtype))
        ehs = None
        if conditioning == "class" and cond is not None:
            class_emb = half.class_embedding(cond).to(emb.dtype)
            emb = emb + (class_emb if drop is None else torch.where(drop[:, None], torch.zeros_like(class_emb), class_emb))
        elif conditioning == "text":
            ehs = self.text_condition(x, cond, drop, null)
        return run_encoder(half, x, emb, ehs)

    def encoder_dims(self, net, conditioning):
        cond_dim = {"text": getattr(net.config, "cross_attention_dim", None),
                    "class": net.time_embedding.linear_2.out_features if conditioning == "class" else None
                    }.get(conditioning)
        return net.config.block_out_channels[-1], cond_dim

    def encoder_parts(self, half):
        return ["conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block"]

    def last_encoder_block(self, half):
        return half.mid_block

    def condition_tokens(self, half, conditioning, cond):
        if conditioning == "class":
            return half.class_embedding(cond)[:, None]
        return cond if conditioning == "text" else None

    @torch.no_grad()
    def encode_prompts(self, base, prompts):
        """CLIP's last hidden states (N, 77, D), as StableDiffusionPipeline conditions."""
        if base.text_encoder is None:
            return super().encode_prompts(base, prompts)
        device = next(base.text_encoder.parameters()).device
        ids = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return base.text_encoder(ids)[0].float()

    def save_pipeline(self, net, base, folder: Path):
        from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler
        from drlhf.sampler import is_flow_model
        cls = FlowMatchEulerDiscreteScheduler if is_flow_model(base.scheduler_config) else DDPMScheduler
        sched = cls.from_config(base.scheduler_config) if base.scheduler_config else DDPMScheduler()
        if base.text_encoder is not None:
            from diffusers import StableDiffusionPipeline
            StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                    unet=net, scheduler=sched, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(folder)
        else:
            DDPMPipeline(unet=net, scheduler=sched).save_pretrained(folder)
        if base.extra:  # a toy's record of how it was trained
            (Path(folder) / "drlhf_toy.json").write_text(json.dumps(base.extra, indent=1))


def run_encoder(unet: nn.Module, x, emb, ehs=None):
    """The encoder half of a diffusers U-Net (conv_in, down blocks, mid block) given the time (+ class) embedding
    emb and the text states ehs (None for models without cross-attention) -> mid-block features (B, C, h, w)."""
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if unet.mid_block is not None:
        # contiguous: torch 2.13's CPU GroupNorm backward crashes (SIGSEGV) on a channels-last input (the down
        # blocks' convolutions may leave one) that needs no gradient while its weights do (--trainable mid)
        h = h.contiguous()
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs) if getattr(unet.mid_block, "has_cross_attention", False) \
            else unet.mid_block(h, emb)
    return h
