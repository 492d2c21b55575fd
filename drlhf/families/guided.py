"""OpenAI's guided-diffusion U-Net (drlhf/guided_diffusion.py; the ImageNet 64x64 model of thesis 6.5-6.8): class-
conditional, learned-range variance, its own key names. The encoder half is the input blocks and the middle block;
the policy is saved as guided_unet.safetensors in the original key names, readable by upstream."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from drlhf.families.base import Family
from drlhf.files import default_cache_dir, download_once, save_safetensors
from drlhf.guided_diffusion import GuidedUNet, timestep_embedding

GUIDED_64X64 = dict(image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
                    attention_resolutions=[32, 16, 8], channel_mult=[1, 2, 3, 4], num_classes=1000,
                    num_head_channels=64)  # the model flags OpenAI publishes for 64x64_diffusion.pt
GUIDED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt"
GUIDED_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, variance_type="learned_range",
                        prediction_type="epsilon", clip_sample=True)  # cosine schedule, learned range (thesis 6.5)


class GuidedFamily(Family):
    name = "guided-diffusion U-Net"
    repeated_blocks = ("ResBlock", "AttentionBlock")
    reward_model = False  # its reward model is OpenAI's noisy-image classifier (train_reward.py --backbone classifier)
    spec_prefix = "guided-diffusion:"  # --pretrained guided-diffusion:PATH (a .pt file, not a diffusers folder)

    def owns(self, net):
        return isinstance(net, GuidedUNet)

    def load_spec(self, spec, device, cache_dir, flag):
        """OpenAI's class-conditional ImageNet U-Net from a .pt file (or its URL, fetched into the cache), read with
        torch.load(weights_only=True): no pickled code runs. A sidecar FILE.json may give other constructor kwargs."""
        from drlhf.models import BaseModel, ModelLoadError
        src = spec.split(":", 1)[1]
        if src == "64x64":
            src = str(Path(cache_dir or default_cache_dir()) / "guided-diffusion" / "64x64_diffusion.pt")
        if src.startswith(("http://", "https://")):
            path = Path(cache_dir or default_cache_dir()) / "guided-diffusion" / src.rsplit("/", 1)[1]
            try:
                download_once(src, path)
            except OSError as e:
                raise ModelLoadError(f"{flag} {spec}: could not download it ({e}); fetch {src} elsewhere and pass "
                                     f"{flag} guided-diffusion:/path/to/64x64_diffusion.pt") from None
            src = str(path)
        path = Path(src)
        if not path.is_file():
            raise ModelLoadError(f"{flag} {spec}: {path} does not exist. Download OpenAI's ImageNet 64x64 model "
                                 f"({GUIDED_URL}, and for the value function/reward model 64x64_classifier.pt next to it) "
                                 f"and pass {flag} guided-diffusion:/path/to/64x64_diffusion.pt, or put it at "
                                 f"{Path(cache_dir or default_cache_dir()) / 'guided-diffusion'}")
        kwargs = dict(GUIDED_64X64)
        if path.with_suffix(".json").exists():
            kwargs.update(json.loads(path.with_suffix(".json").read_text()))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            unet = GuidedUNet(**{**kwargs, "attention_resolutions": tuple(kwargs["attention_resolutions"]),
                                 "channel_mult": tuple(kwargs["channel_mult"])})
            # strict; dropout 0: the policy must be deterministic for PPO ratios
            unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{flag} {spec}: could not load {path} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]})") from None
        unet = unet.to(device).requires_grad_(False)
        return BaseModel(spec, str(path), unet, dict(GUIDED_SCHEDULER), "class",
                         (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]), kwargs["num_classes"])

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
