"""Model families behind one registry (drlhf/families): every network the project trains has one adapter, the
adapter answers what differs between families, and no module outside drlhf/families tests a network's type."""
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from drlhf import models, toys
from drlhf.families import FAMILIES, family_of
from drlhf.guided_diffusion import GuidedUNet


def _guided():
    torch.manual_seed(0)
    return GuidedUNet(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                      attention_resolutions=(8,), channel_mult=(1, 2), num_classes=10, num_head_channels=16).eval()


def _sd3():
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def _unet():
    torch.manual_seed(0)
    return toys.toy_unet(3, 16, class_cond=True).eval()


def _flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def _qwen():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()


NETWORKS = {"diffusers U-Net": _unet, "guided-diffusion U-Net": _guided, "SD3 transformer": _sd3,
            "FLUX.1 transformer": _flux, "Qwen-Image transformer": _qwen}
TEXT = ("SD3 transformer", "FLUX.1 transformer", "Qwen-Image transformer")
CHANNELS = {"FLUX.1 transformer": 4, "Qwen-Image transformer": 4}  # latents: 2x2 patches are packed by the adapter


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_has_one_family_and_its_encoder_half_runs(name):
    net = NETWORKS[name]()
    owners = [f.name for f in FAMILIES if f.owns(net)]
    assert owners == [name]
    family = family_of(net)
    assert family_of(torch.compile(net)) is family  # a compiled wrapper: the family of what it wraps
    half = family.encoder_copy(net)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in net.parameters())
    assert family.last_encoder_block(half) is not None and family.encoder_parts(half)
    channels = CHANNELS.get(name) or (net.config.in_channels if hasattr(net, "config") else 3)
    x, t = torch.randn(2, channels, 16, 16), torch.tensor([3, 500])
    null = torch.zeros(1, 5, 32) if name in TEXT else None
    with torch.no_grad():
        h = family.features(half, x[:, :, :8, :8] if name in TEXT else x, t, "text" if name in TEXT else "class",
                            null=null)
    assert h.ndim >= 3 and torch.isfinite(h).all()
    copy = family.plain_copy(net)
    assert type(copy) is type(net) and set(copy.state_dict()) == set(net.state_dict())
    fingerprint = family.fingerprint(net)
    assert (fingerprint is None) == (name == "guided-diffusion U-Net")
    if fingerprint:  # a changed first block changes it; the same weights give the same one
        assert family.fingerprint(NETWORKS[name]()) == fingerprint
        next(p for n, p in net.named_parameters() if n.startswith(("conv_in", "pos_embed", "x_embedder", "img_in"))
             ).data += 1  # the input layer
        assert family.fingerprint(net) != fingerprint


def test_the_denoiser_calls_the_network_through_its_family():
    net = _unet()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(models.Denoiser(net, "class")(x, t, y), net(x, t, class_labels=y).sample)
        guided = _guided()
        assert torch.equal(models.Denoiser(guided, "class")(x, t, y), guided(x, t, y))


def test_no_family_check_outside_the_families():
    """`hasattr(net, "config")`, a family's is_* test, an isinstance of a family's network class, a family's name
    or config key in an `if` decide nothing outside drlhf/families: the method asks the adapter."""
    pattern = re.compile(r"hasattr\([^)]*[\"']config[\"']\)|is_transformer|is_sd3|is_flux|is_qwen_image|"
                         r"isinstance\([^)]*(GuidedUNet|UNet2D|SD3Transformer|FluxTransformer|QwenImageTransformer)|"
                         r"family\.name\s*[=!]=\s*[\"']|if .*(Family|guidance_embeds|pooled_projection_dim|FluxPipeline|"
                         r"QwenImagePipeline|StableDiffusion3Pipeline)")
    files = [p for p in [*ROOT.glob("*.py"), *(ROOT / "drlhf").glob("*.py")] if p.name != "guided_diffusion.py"]
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == [], hits
    assert {p.stem for p in (ROOT / "drlhf" / "families").glob("*.py")} >= {"__init__", "base", "unet", "guided", "sd3"}
    assert Path(models.__file__).parent.name == "drlhf"
