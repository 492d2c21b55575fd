"""Model families: one adapter per family of denoising networks, one file each, behind one registry.

    family = family_of(net)                      # the adapter of a network (a U-Net, a transformer, ...)
    family.call(net, x, t, cond, conditioning)   # the denoiser's raw output
    family.encoder_copy(net); family.features(half, x, t, conditioning, cond, drop, null)   # reward/value backbone
    family.fingerprint(net); family.save_pipeline(net, base, folder); family.encode_prompts(base, prompts)

The interface is drlhf/families/base.py. Families: diffusers U-Nets (the toys, DDPM and flow; SD v1.5/2.x;
unet.py), OpenAI's guided-diffusion U-Net (guided.py), SD3-class transformers (sd3.py), FLUX.1 (flux.py) and
Qwen-Image (qwen_image.py). Adding a family: its file here with a `Family` subclass, one line in FAMILIES, one line
in tests/test_contract.py's MODELS (docs/design.md, "Adding a model family").
"""
from __future__ import annotations

import json
from pathlib import Path

from drlhf.families.base import Family
from drlhf.families.flux import FluxFamily
from drlhf.families.guided import GuidedFamily
from drlhf.families.qwen_image import QwenImageFamily
from drlhf.families.sd3 import SD3Family
from drlhf.families.unet import UNetFamily

# the first family that owns a network (or claims a folder) is its family: the U-Nets' adapter claims any folder
# the others do not, so it comes after them
FAMILIES: tuple[Family, ...] = (FluxFamily(), QwenImageFamily(), SD3Family(), UNetFamily(), GuidedFamily())


def family_of(net) -> Family:
    """The adapter of a denoising network (a torch.compile wrapper's: that of the module it wraps)."""
    net = getattr(net, "_orig_mod", net)
    for family in FAMILIES:
        if family.owns(net):
            return family
    raise ValueError(f"no model family takes a {type(net).__name__}; the families are "
                     f"{', '.join(f.name for f in FAMILIES)} (drlhf/families)")


def family_for_folder(path: Path) -> Family:
    """The family whose adapter reads the local model folder `path` (by model_index.json's pipeline class, else by
    what the folder holds; the first family that claims it)."""
    index = Path(path) / "model_index.json"
    pipeline_class = json.loads(index.read_text()).get("_class_name") if index.exists() else None
    return next(family for family in FAMILIES if family.claims(Path(path), pipeline_class))


def family_for_spec(source: str) -> Family | None:
    """The family whose --pretrained prefix `source` starts with (guided-diffusion:PATH), or None (a folder, a hub id
    or a toy)."""
    return next((f for f in FAMILIES if f.spec_prefix and source.startswith(f.spec_prefix)), None)


def repeated_blocks() -> tuple[str, ...]:
    """The class names of the blocks every family repeats (--compile-scope blocks)."""
    return tuple(name for family in FAMILIES for name in family.repeated_blocks)
