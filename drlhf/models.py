"""Loading base diffusion models, the policy network with classifier-free guidance, LoRA, and saving a policy.

`--pretrained` accepts
- a local diffusers folder, read by the adapter of the family that claims it (drlhf.families): a pipeline
  (`model_index.json` with `unet/`, `scheduler/`, and for Stable Diffusion `vae/`, `text_encoder/`, `tokenizer/`),
  a bare `UNet2DModel` folder, a `StableDiffusion3Pipeline`, `FluxPipeline` or `QwenImagePipeline` folder;
- a hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`, `black-forest-labs/FLUX.1-dev`), read from the
  local hub cache;
- `guided-diffusion:/path/to/64x64_diffusion.pt`: OpenAI's ImageNet 64x64 model (drlhf.guided_diffusion);
- an offline toy model (`toy:digit4`, `toy:digit4-32`, `toy:digits-rgb`, the rectified-flow `toy:digit4-flow`;
  drlhf.toys), trained on first use.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from drlhf.cli import ModelLoadError  # noqa: F401 - part of this module's interface (raised here)
from drlhf.families import family_for_folder, family_for_spec, family_of
# OpenAI's U-Net's published flags, URL and scheduler live with its adapter; here for the callers of models
from drlhf.families.guided import GUIDED_64X64, GUIDED_SCHEDULER, GUIDED_URL  # noqa: F401
from drlhf.files import atomic_write, default_cache_dir
from drlhf.guided_diffusion import GuidedClassifier
from drlhf.sampler import is_flow_model
from drlhf.toys import TOY_MODELS, TOY_TRAIN_STEPS, toy_guided_classifier, toy_model_dir

DECODE_CHUNK = 8  # latents the VAE decodes at once (BaseModel.decode)
LINEAGE_FILE = "drlhf_lineage.json"  # a fine-tuned policy's lineage (drlhf.checkpoint), beside its weights


# ---------------------------------------------------------------------------------------------------------
# Loading base models
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BaseModel:
    """Everything the sampler and the rewards need to know about a base diffusion model."""
    source: str                    # what --pretrained said
    path: str                      # where it was loaded from
    net: nn.Module                 # the denoising network: a U-Net or a transformer (its family: drlhf.families)
    scheduler_config: dict
    conditioning: str              # none | class | text
    sample_shape: tuple            # (C, H, W) of x_t: pixels or latents
    num_classes: int = 0           # class models: labels 0..num_classes-1 (and num_classes = "no class" if trained so)
    vae: nn.Module | None = None   # latent models only
    text_encoder: nn.Module | None = None
    tokenizer: object = None
    extra: dict = field(default_factory=dict)
    text_encoders: list = field(default_factory=list)  # SD3: [(CLIP-L, tok), (CLIP-G, tok), (T5, tok)]
    lineage: dict = field(default_factory=dict)  # a fine-tuned policy's drlhf_lineage.json (drlhf.checkpoint)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def family(self):
        """The adapter of this model's family (drlhf.families): everything that differs between families."""
        return family_of(self.net)

    @property
    def any_size(self) -> bool:
        """Whether it samples at any resolution (a transformer over patches) rather than at its own."""
        return self.family.any_size

    def expect(self, resolution: int | None = None, conditioning: str | None = None, latent: bool | None = None):
        """Stop with the flag's name when the model is not what a preset says (Table 6.2 "Resolution", "Cond.
        Type", "Latent Diff."); None = whatever the model is."""
        res = self.sample_shape[1] * (8 if self.is_latent else 1)
        if resolution is not None and resolution != res and self.any_size:
            self.sample_shape, res = self.family.sample_shape(self.net, self.sample_shape, resolution, self.source), resolution
        for flag, want, have in (("resolution", resolution, res), ("conditioning", conditioning, self.conditioning),
                                 ("latent", latent, self.is_latent)):
            if want is not None and want != have:
                raise ValueError(f"--{flag} {want}: the base model {self.source} has {flag} {have}")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The conditioning (N, L, D) of a list of prompts ("" is the unconditional one), as the family packs it
        (SD v1.5: CLIP's hidden states; SD3: drlhf.families.sd3's packed tensor)."""
        return self.family.encode_prompts(self, prompts)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Finished samples -> images in [-1, 1], shape (B, 3 or 1, H, W), float32, DECODE_CHUNK at a time (a 512 px
        image takes 0.4 GB of the SD3/FLUX.1 VAE's activations, 0.8 GB of Qwen-Image's: docs/performance.md).
        Differentiable (the VAE is frozen): --algo backprop sends reward gradients back through it."""
        if not self.is_latent:
            return samples.float().clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        return torch.cat([self.family.decode(self.vae, chunk.to(vae_dtype)).float().clamp(-1, 1)
                          for chunk in samples.split(DECODE_CHUNK)])

    def flow_timesteps(self, num_steps) -> dict:
        """The sigmas and mu the model's pipeline gives its flow scheduler at this sample shape (the resolution-
        dependent shift of FLUX.1 and Qwen-Image); {} where there is nothing to give (drlhf.sampler.schedule_for_model)."""
        if not is_flow_model(self.scheduler_config) or not str(num_steps).isdigit():
            return {}
        return self.family.flow_timesteps(self.net, self.scheduler_config, self.sample_shape, int(num_steps))


GUIDED_CLASSIFIER_64X64 = dict(image_size=64, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=4,
                               attention_resolutions=[32, 16, 8], channel_mult=[1, 2, 3, 4], num_head_channels=64)


# the offline stand-in: OpenAI's classifier architecture at toy size, for the 16x16 colour digits (10 classes)

def load_guided_classifier(spec: str, cache_dir=None):
    """OpenAI's noisy-image classifier (64x64_classifier.pt) from guided-diffusion:PATH, read with
    torch.load(weights_only=True); a sidecar FILE.json may give other constructor kwargs. toy:digits-rgb is the
    offline stand-in (the same architecture trained here on the colour digits)."""
    if spec.startswith("toy:"):
        if spec != "toy:digits-rgb":
            raise ModelLoadError(f"--classifier {spec}: the only offline classifier is toy:digits-rgb")
        return toy_guided_classifier(cache_dir)
    src = spec.split(":", 1)[1] if spec.startswith("guided-diffusion:") else spec
    if src == "64x64":
        src = str(Path(cache_dir or default_cache_dir()) / "guided-diffusion" / "64x64_classifier.pt")
    path = Path(src)
    if not path.is_file():
        raise ModelLoadError(f"--classifier {spec}: {path} does not exist. Download OpenAI's "
                             f"{GUIDED_URL.replace('64x64_diffusion', '64x64_classifier')} and pass --classifier "
                             "guided-diffusion:/path/to/64x64_classifier.pt")
    kwargs = dict(GUIDED_CLASSIFIER_64X64)
    if path.with_suffix(".json").exists():
        kwargs.update(json.loads(path.with_suffix(".json").read_text()))
    try:
        clf = GuidedClassifier(**{**kwargs, "attention_resolutions": tuple(kwargs["attention_resolutions"]),
                                  "channel_mult": tuple(kwargs["channel_mult"])})
        clf.load_state_dict({k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()},
                            strict=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"--classifier {spec}: could not load {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    return clf


# what a pipeline folder needs from the hub: configs, tokenizers and the components' weights (not the single-file
# checkpoints, safety checker or separate text-encoder files some repositories also hold at the top level)
HUB_FILES = ["*.json", "*.txt", "*.model", *(f"{part}/*.safetensors" for part in (
    "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"))]


def resolve_source(source: str, cache_dir, toy_train_steps: int, flag: str = "--pretrained") -> Path:
    """--pretrained value (or `flag`'s) -> local folder (toy models are trained here on first use)."""
    if source.startswith("toy:"):
        return toy_model_dir(source[4:], cache_dir, toy_train_steps)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{flag} {source}: expected a diffusers folder (with model_index.json "
                                 "or config.json), got a file")
        return path
    if source.count("/") == 1 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:  # the local hub cache only when offline; a download otherwise
            return Path(snapshot_download(source, allow_patterns=HUB_FILES))
        except Exception as e:  # noqa: BLE001 - any hub failure gets the same actionable message
            raise ModelLoadError(
                f"{flag} {source}: not a local folder, and the hub id could not be fetched "
                f"({type(e).__name__}). On a machine with network run `huggingface-cli download {source} "
                f"--local-dir DIR` (or `hf download`) and pass {flag} DIR.") from None
    raise ModelLoadError(f"{flag} {source}: no such folder. Give a diffusers folder, a hub id "
                         "(owner/name) or one of " + ", ".join(f"toy:{k}" for k in TOY_MODELS))


def load_base_model(source: str, device="cpu", cache_dir=None, weights_dtype=torch.float32,
                    toy_train_steps: int = TOY_TRAIN_STEPS, flag: str = "--pretrained") -> BaseModel:
    """Load a base diffusion model from a toy name, a local diffusers folder or a hub id (its family's adapter reads
    the folder, drlhf.families.family_for_folder); errors name `flag`."""
    family = family_for_spec(source)  # a model file named by its family's prefix (guided-diffusion:PATH)
    if family is not None:
        return family.load_spec(source, device, cache_dir, flag)
    path = resolve_source(source, cache_dir, toy_train_steps, flag)
    family = family_for_folder(path)
    try:
        base = family.load(source, path, device, weights_dtype, flag)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - missing, incomplete or corrupt files of any kind
        raise ModelLoadError(f"{flag} {source}: could not read the {family.name} model in {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). The files are incomplete or corrupt: download them "
                             "again, or for a toy model delete that folder to retrain it.") from None
    base.lineage = json.loads((path / LINEAGE_FILE).read_text()) if (path / LINEAGE_FILE).exists() else {}
    return base


# ---------------------------------------------------------------------------------------------------------
# The policy network: (x_t, t, c) -> model output, with classifier-free guidance
# ---------------------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """The policy network: (x_t, t, c) -> model output, with classifier-free guidance in one batched forward.

    `cond` is None (unconditional), class labels (B,) or the family's text conditioning (B, L, D) (SD3: the packed
    tensor of drlhf.families.sd3, for a transformer whose output is the velocity); the network is called through
    its family's adapter. With guidance_scale w != 1 the conditional and unconditional inputs go through the
    network as one batch of 2B and eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022; the family may rescale it,
    Family.guide); learned variance channels come from the conditional branch (GLIDE's choice). A guidance-distilled
    network (FLUX.1-dev) takes w as an input instead: one pass of B.
    """

    def __init__(self, net: nn.Module, conditioning: str, guidance_scale: float = 1.0, null_cond=None):
        super().__init__()
        self.net, self.conditioning, self.guidance_scale = net, conditioning, guidance_scale
        self.family = family_of(net)  # kept: `net` may be swapped for its compiled forward later
        self.distilled = self.family.guidance_input(net)
        if guidance_scale != 1.0 and conditioning == "none":
            raise ValueError("--guidance-scale needs a conditional model; this base model is unconditional")
        self.register_buffer("null_cond", null_cond, persistent=False)

    def forward(self, x, t, cond=None, guided: bool = True):
        """guided=False: the conditional prediction alone (the model's training objective, drlhf/ptx.py)."""
        x = x.to(next(self.net.parameters()).dtype) if not torch.is_autocast_enabled() else x
        if self.distilled:  # the scale is an input of the network (FLUX.1-dev): one pass, no unconditional branch
            return self.family.call(self.net, x, t, cond, self.conditioning, guidance=self.guidance_scale)
        if self.guidance_scale == 1.0 or not guided:
            return self.family.call(self.net, x, t, cond, self.conditioning)
        null = self.null_cond.expand(len(x), *self.null_cond.shape[1:])
        out = self.family.call(self.net, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), self.conditioning)
        out_c, out_u = out.float().chunk(2)
        c = x.shape[1]
        guided = self.family.guide(out_c[:, :c], out_u[:, :c], self.guidance_scale)
        return torch.cat([guided, out_c[:, c:]], 1)


class AdaptersOff(nn.Module):
    """pi_base of a LoRA run: the policy's own network called with its LoRA adapters switched off, in eval mode, so
    that the frozen base weights are not held twice (a second FLUX.1 transformer is 24 GB in bf16). peft's layers
    then compute their base layer alone: the same numbers as a copy of the network taken before the adapters went
    in. The network is held outside this module's parameters: freezing, moving or casting this module leaves the
    policy alone."""

    def __init__(self, policy: Denoiser):
        super().__init__()
        from peft.tuners.tuners_utils import BaseTunerLayer
        plain = Denoiser(policy.net, policy.conditioning, policy.guidance_scale, policy.null_cond)
        object.__setattr__(self, "policy", plain)  # not a submodule
        self.conditioning, self.guidance_scale = policy.conditioning, policy.guidance_scale
        self.lora_layers = [m for m in policy.net.modules() if isinstance(m, BaseTunerLayer)]
        if not self.lora_layers:
            raise ValueError("AdaptersOff needs a network with LoRA adapters (models.add_lora)")

    def forward(self, *args, **kwargs):
        modes = [(m, m.training) for m in self.policy.net.modules()]
        for layer in self.lora_layers:
            layer._disable_adapters = True  # peft's switch, set directly: enable_adapters() would also freeze them
        self.policy.net.train(False)
        try:
            return self.policy(*args, **kwargs)
        finally:
            for layer in self.lora_layers:
                layer._disable_adapters = False
            for m, mode in modes:
                m.training = mode


def make_denoiser(base: BaseModel, guidance_scale: float = 1.0) -> Denoiser:
    null = None
    if base.conditioning == "class" and guidance_scale != 1.0:
        if not base.family.has_null_class(base.net, base.num_classes):
            raise ValueError(f"--guidance-scale {guidance_scale}: {base.source} has no unconditional class embedding "
                             "to guide with; use --guidance-scale 1")
        null = torch.tensor([base.num_classes])
    elif base.conditioning == "text" and not base.family.guidance_input(base.net):
        null = base.encode_prompts([base.family.negative_prompt])  # classifier-free guidance's other branch
    return Denoiser(base.net, base.conditioning, guidance_scale, null).to(next(base.net.parameters()).device)


# ---------------------------------------------------------------------------------------------------------
# LoRA and saving a policy
# ---------------------------------------------------------------------------------------------------------
def add_lora(net: nn.Module, rank: int, alpha: float, targets: list[str]):
    """Freeze the U-Net and inject LoRA adapters (Hu et al. 2021, through peft) into the named modules, in place.
    B starts at zero, so the adapted U-Net is exactly the base model at the start (PPO ratio 1)."""
    from peft import LoraConfig, inject_adapter_in_model
    net.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                           init_lora_weights="gaussian"), net)
    except ValueError as e:
        raise ValueError(f"--lora-targets {','.join(targets)}: {str(e).splitlines()[0][:200]}") from None
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print(f"[drlhf] LoRA rank {rank} on {','.join(targets)}: {n:,} trainable of "
          f"{sum(p.numel() for p in net.parameters()):,} parameters")
    return net


def merge_lora(net: nn.Module) -> nn.Module:
    """A plain copy of a LoRA-adapted U-Net with W + (alpha / r) B A merged into each adapted weight, in the
    original key names, so that it saves and loads as an ordinary diffusers U-Net."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    merged = copy.deepcopy(net)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.get_base_layer().float()  # held in fp16/bf16 while training on a GPU: merge in fp32, not there
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if "lora_" not in k}
    plain = family_of(net).plain_copy(net)
    plain.load_state_dict(state)
    return plain.to(next(net.parameters()).device)


def save_pipeline(net: nn.Module, base: BaseModel, out_dir: Path):
    """Save a policy network as its family's pipeline next to the base model's other components (SD v1.5: a
    StableDiffusionPipeline; the toys: a DDPMPipeline; SD3: a StableDiffusion3Pipeline; OpenAI's:
    guided_unet.safetensors), written whole or not at all."""
    atomic_write(Path(out_dir), lambda d: family_of(net).save_pipeline(net, base, d), folder=True)


def base_fingerprint(net: nn.Module) -> str | None:
    """Identity of a base network (drlhf.families: its config and the values of its input layer and first block);
    None for a family without a config (OpenAI's U-Net)."""
    return family_of(net).fingerprint(net)


def identity(base: BaseModel) -> dict:
    """What a loaded model is, for putting it beside another: its source and path, its fingerprint (None where the
    network has no config: OpenAI's U-Net), the root of the RLHF rounds behind it (itself for a base model), its
    conditioning, sample shape and whether it is a rectified-flow model. JSON-ready (checkpoints store it)."""
    fp = base_fingerprint(base.net)
    root = base.lineage.get("root") if base.lineage else {"base_model": base.source, "path": base.path, "fingerprint": fp}
    return dict(source=base.source, path=base.path, fingerprint=fp, root=root, conditioning=base.conditioning,
                sample_shape=list(base.sample_shape), any_size=base.any_size, flow=is_flow_model(base.scheduler_config))


def describe(model: dict) -> str:
    """An identity (`identity`) in a few words: source, root base model, kind, samples, fingerprint."""
    root = model.get("root") or {}
    came = f", fine-tuned from {root.get('base_model')}" if root.get("base_model") not in (None, model.get("source")) else ""
    return (f"{model.get('source')}{came}: {'flow' if model.get('flow') else 'DDPM-trained'}, {model.get('conditioning')}-"
            f"conditioned, samples {model.get('sample_shape')}, root fingerprint {root.get('fingerprint')}")


def misfits(model: dict, base: dict, same_base: bool = True) -> list[str]:
    """How a model (an identity) does not fit beside `base`: another sampler family, conditioning or sample shape,
    or (same_base) another root base model, by fingerprint where both have one, else by path. Keys a model does not
    record are not compared. Empty when it fits."""
    shape = "sample_shape" if not base.get("any_size") else None  # a transformer samples at any size: not compared
    out = [f"{key} {model[key]} against {base[key]}" for key in ("flow", "conditioning", shape)
           if key and model.get(key) is not None and model[key] != base[key]]
    mine, theirs = model.get("root") or {}, base.get("root") or {}
    if not same_base:
        return out
    if mine.get("fingerprint") and theirs.get("fingerprint"):
        if mine["fingerprint"] != theirs["fingerprint"]:
            out.append(f"root fingerprint {mine['fingerprint']} against {theirs['fingerprint']}")
    elif mine.get("path") and theirs.get("path") and Path(mine["path"]).resolve() != Path(theirs["path"]).resolve():
        out.append(f"root base model {mine['path']} against {theirs['path']}")
    return out


def check_fits(model: dict, base: dict, what: str, base_flag: str = "--pretrained", same_base: bool = True):
    """Refuse to put a model (an identity, or what a checkpoint recorded of its base) beside the base model `base`
    when they do not fit (`misfits`): one line naming both and what differs. `what` names the flag and value;
    same_base: the model must come from base's root base model (a policy trained from it), not only be of its kind."""
    problems = misfits(model, base, same_base)
    if problems:
        raise ModelLoadError(f"{what} ({describe(model)}) does not fit {base_flag} {base['source']} ({describe(base)}): "
                             f"{'; '.join(problems)}; pass the {base_flag} it was trained from, or another model")


def check_dataset_base(dataset: Path, meta: dict, base: BaseModel):
    """Refuse a base model other than the one a labeling dataset was sampled from (its dataset.json `meta`, or its
    lineage's root for a fine-tuned policy's samples), naming both: source, path, fingerprint, conditioning, shape."""
    root = meta.get("lineage", {}).get("root")
    want_fp = root.get("fingerprint") if root else meta.get("base_fingerprint")
    have_fp = base_fingerprint(base.net)
    want_shape = None if root else meta.get("sample_shape")
    if (want_fp and have_fp and want_fp != have_fp) or (want_shape and list(base.sample_shape) != want_shape) or \
            (meta.get("conditioning") and meta["conditioning"] != base.conditioning):
        source, path = (root["base_model"], root["path"]) if root else (meta.get("base_model"), meta.get("base_model_path"))
        was = f"{source} (path {path}, fingerprint {want_fp}, {meta.get('conditioning')}, samples {want_shape or '?'})"
        now = (f"{base.source} (path {base.path}, fingerprint {have_fp}, {base.conditioning}, samples "
               f"{list(base.sample_shape)})")
        raise ModelLoadError(f"--dataset {dataset} was sampled from the base model {was}, not the one loaded now, "
                             f"{now}; pass the dataset's --pretrained and --toy-train-steps, or train on datasets of "
                             "one base model")
