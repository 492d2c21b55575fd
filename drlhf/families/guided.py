"""OpenAI's guided-diffusion U-Net (drlhf/guided_diffusion.py; the ImageNet 64x64 model of thesis 6.5-6.8): class-
conditional, learned-range variance, its own key names. The encoder half is the input blocks and the middle block;
the policy is saved as guided_unet.safetensors in the original key names, readable by upstream."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from drlhf.families.base import Family
from drlhf.files import save_safetensors
from drlhf.guided_diffusion import GuidedUNet, timestep_embedding


class GuidedFamily(Family):
    name = "guided-diffusion U-Net"
    repeated_blocks = ("ResBlock", "AttentionBlock")
    reward_model = False  # its reward model is OpenAI's noisy-image classifier (train_reward.py --backbone classifier)

    def owns(self, net):
        return isinstance(net, GuidedUNet)

    def call(self, net, x, t, cond, conditioning, guidance=None):
        return net(x, t, cond)  # a plain tensor: the noise and the variance interpolation channels

    def encoder_copy(self, net):
        return self.copy_without(net, ("output_blocks", "out"))

    def features(self, half, x, t, conditioning, cond=None, drop=None, null=None):
        """The middle block's output, unconditioned (the class embedding is not added)."""
        emb, h = half.time_embed(timestep_embedding(t, half.model_channels)), x
        for block in half.input_blocks:
            h = block(h, emb)
        return half.middle_block(h, emb)

    def encoder_parts(self, half):
        return ["time_embed", "input_blocks", "middle_block"]

    def last_encoder_block(self, half: nn.Module) -> nn.Module:
        return half.middle_block

    def save_pipeline(self, net, base, folder: Path):
        save_safetensors(net.state_dict(), Path(folder) / "guided_unet.safetensors")
