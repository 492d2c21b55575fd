"""OpenAI's guided-diffusion U-Net and noisy-image classifier (Dhariwal & Nichol 2021), re-implemented compactly
with the original state-dict key names, so that `64x64_diffusion.pt` and `64x64_classifier.pt` load with
`load_state_dict(strict=True)` (thesis Experiments 2-5).

Written from the architecture description in tests/fixtures/guided_diffusion/README.json (scale-shift norm,
resblock up/down, "new" and legacy attention orders, [cos, sin] timestep features, attention pooling) and checked
against the reference outputs there; no upstream code is copied.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 and cast back to the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def norm(ch):
    return GroupNorm32(32, ch)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features with the cosines first: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch=None, up=False, down=False, scale_shift=True, dropout=0.0):
        super().__init__()
        out_ch = out_ch or ch
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2, 2)
        return x

    def forward(self, x, emb):
        if self.up or self.down:  # resample between the norm/activation and the convolution
            h = self._resample(self.in_layers[:-1](x))
            x = self._resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def qkv_attention(qkv, heads, legacy: bool):
    """qkv (B, 3C, T) -> (B, C, T). New order: [Q | K | V] blocks; legacy: per head [q_h | k_h | v_h]."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, ch, head_channels=64, legacy=False):
        super().__init__()
        self.heads, self.legacy = ch // head_channels, legacy
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, emb=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(x)), self.heads, self.legacy))
        return (x + h).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


def _encoder(module, image_size, in_ch, mc, mult, num_res, attn_res, head_ch, legacy, scale_shift, dropout):
    """The input blocks and middle block shared by the U-Net and the classifier; returns skip channel counts."""
    emb_ch = 4 * mc
    attn_ds = {image_size // r for r in attn_res}
    module.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_ch, mc, 3, padding=1))])
    chans, ch, ds = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(num_res):
            layers = [ResBlock(ch, emb_ch, m * mc, scale_shift=scale_shift, dropout=dropout)]
            ch = m * mc
            if ds in attn_ds:
                layers.append(AttentionBlock(ch, head_ch, legacy))
            module.input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(mult) - 1:
            module.input_blocks.append(TimestepEmbedSequential(
                ResBlock(ch, emb_ch, ch, down=True, scale_shift=scale_shift, dropout=dropout)))
            chans.append(ch)
            ds *= 2
    module.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, scale_shift=scale_shift, dropout=dropout),
                                                  AttentionBlock(ch, head_ch, legacy),
                                                  ResBlock(ch, emb_ch, scale_shift=scale_shift, dropout=dropout))
    return chans, ch, ds, attn_ds


class GuidedUNet(nn.Module):
    """The class-conditional U-Net with learned-range variance (out_channels = 2 * in_channels)."""

    def __init__(self, image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
                 attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4), num_classes=1000, num_head_channels=64,
                 use_scale_shift_norm=True, dropout=0.0, legacy_attention=False):
        super().__init__()
        mc, emb_ch = model_channels, 4 * model_channels
        self.model_channels, self.num_classes = mc, num_classes
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(num_classes, emb_ch) if num_classes else None
        chans, ch, ds, attn_ds = _encoder(self, image_size, in_channels, mc, channel_mult, num_res_blocks,
                                          attention_resolutions, num_head_channels, legacy_attention,
                                          use_scale_shift_norm, dropout)
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_ch, m * mc, scale_shift=use_scale_shift_norm, dropout=dropout)]
                ch = m * mc
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, num_head_channels, legacy_attention))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, up=True, scale_shift=use_scale_shift_norm, dropout=dropout))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self):
        """Recompute each block's activations in the backward pass (upstream's use_checkpoint, per block)."""
        self.gradient_checkpointing = True

    def _block(self, block, h, emb):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x, t, y=None):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = self._block(block, h, emb)
            hs.append(h)
        h = self._block(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._block(block, torch.cat([h, hs.pop()], 1), emb)  # current features first, then the skip
        return self.out(h)


class AttentionPool2d(nn.Module):
    """Mean token prepended to the flattened map, positional embedding (C, 1 + HW), new-order attention, and the
    output of the mean token projected to the classes (CLIP-style pooling)."""

    def __init__(self, spatial, dim, head_channels, out_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(dim, spatial ** 2 + 1) / dim ** 0.5)
        self.qkv_proj = nn.Conv1d(dim, 3 * dim, 1)
        self.c_proj = nn.Conv1d(dim, out_dim, 1)
        self.heads = dim // head_channels

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(-1, keepdim=True), x], -1) + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(qkv_attention(self.qkv_proj(x), self.heads, legacy=False))
        return x[:, :, 0]


class GuidedClassifier(nn.Module):
    """The noisy-image classifier: U-Net encoder + attention pooling; classifier(x, t) -> logits."""

    def __init__(self, image_size=64, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=2,
                 attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4), num_head_channels=64,
                 use_scale_shift_norm=True, dropout=0.0):
        super().__init__()
        mc, emb_ch = model_channels, 4 * model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        _, ch, ds, _ = _encoder(self, image_size, in_channels, mc, channel_mult, num_res_blocks, attention_resolutions,
                                num_head_channels, True, use_scale_shift_norm, dropout)  # legacy order in its blocks
        self.out = nn.Sequential(norm(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels,
                                                                      out_channels))

    def features(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.middle_block(h, emb)

    def forward(self, x, t):
        return self.out(self.features(x, t))
