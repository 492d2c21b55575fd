"""Model loading shared by the scripts: base diffusion models, offline toy models, value functions.

`--pretrained` accepts
- a local diffusers folder: a pipeline (`model_index.json` with `unet/`, `scheduler/`, and for Stable
  Diffusion `vae/`, `text_encoder/`, `tokenizer/`) or a bare `UNet2DModel` folder;
- a hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`), read from the local hub cache;
- an offline toy model trained in-repo on scikit-learn's bundled digits on first use and cached:
    toy:digit4      unconditional 16x16 grey "4"s (Experiment 1's setting, thesis 6.4, at 16x16)
    toy:digit4-32   the same at 32x32, the thesis's resolution
    toy:digits-rgb  class-conditional 16x16 digits 0-9 drawn in random colours (a stand-in for the
                    class-conditional ImageNet model of Experiments 2-5 that has colour to optimize)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TOY_MODELS = {
    "digit4": dict(digits=[4], rgb=False, resolution=16, class_cond=False),
    "digit4-32": dict(digits=[4], rgb=False, resolution=32, class_cond=False),
    "digits-rgb": dict(digits=list(range(10)), rgb=True, resolution=16, class_cond=True),
}
TOY_TRAIN_STEPS = 500  # DESIGN.md recipe: clean, varied digits after ~500 AdamW steps at batch 128


def default_cache_dir() -> Path:
    return Path(os.environ.get("DRLHF_CACHE", Path.home() / ".cache" / "drlhf"))


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which flag or file to fix."""


# ---------------------------------------------------------------------------------------------------------
# Offline toy data and base models (plumbing for the offline presets)
# ---------------------------------------------------------------------------------------------------------
def toy_digits(digits, resolution: int, rgb: bool, seed: int = 0):
    """scikit-learn's 1797 8x8 digits as white-on-black (or random-hue-on-black) images in [-1, 1]."""
    from sklearn.datasets import load_digits
    data = load_digits()
    keep = np.isin(data.target, digits)
    x = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8) ink in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(data.target[keep], dtype=torch.long)
    if rgb:  # ink colour: a random fully saturated hue per image
        g = torch.Generator().manual_seed(seed)
        hue = torch.rand(len(x), generator=g)[:, None] * 6
        k = (torch.tensor([5.0, 3.0, 1.0]) + hue) % 6
        colour = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)  # HSV -> RGB with S = V = 1
        x = x * colour[:, :, None, None]
    return x * 2 - 1, labels


def toy_unet(channels: int, resolution: int, class_cond: bool):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                       block_out_channels=(32, 64, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       num_class_embeds=11 if class_cond else None)  # class 10 = "no class" for CFG


def train_toy_model(name: str, out_dir: Path, steps: int = TOY_TRAIN_STEPS, seed: int = 0, batch_size: int = 64,
                    lr: float = 1e-3, cond_drop: float = 0.1):
    """Train a toy DDPM (cosine schedule, epsilon prediction) and save it as a diffusers DDPMPipeline.
    Runs on the GPU when there is one (the result then differs in the last bits from a CPU-trained model)."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from tqdm.auto import tqdm
    spec = TOY_MODELS[name]
    torch.manual_seed(seed)
    x, labels = toy_digits(spec["digits"], spec["resolution"], spec["rgb"], seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = toy_unet(x.shape[1], spec["resolution"], spec["class_cond"]).to(device)
    x, labels = x.to(device), labels.to(device)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=f"training base model toy:{name} (first use, cached)", unit="step"):
        i = torch.randint(len(x), (batch_size,), generator=g).to(device)
        x0, y = x[i], labels[i]
        x0 = torch.roll(x0, shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
        kwargs = {}
        if spec["class_cond"]:  # class 10 = "no class" with probability cond_drop, for classifier-free guidance
            kwargs["class_labels"] = torch.where(torch.rand(batch_size, generator=g).to(device) < cond_drop, 10, y)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, **kwargs).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet = unet.cpu()
    _atomic_save(out_dir, lambda d: (DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(d),
                                      (Path(d) / "drlhf_toy.json").write_text(json.dumps(
                                          dict(name=name, steps=steps, seed=seed, final_loss=loss.item(),
                                               num_classes=10 if spec["class_cond"] else 0, **spec), indent=1))))


def _atomic_save(out_dir: Path, write):
    """Write into a temporary sibling folder, then rename: an interrupted save leaves nothing half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def toy_model_dir(name: str, cache_dir: Path | None = None, steps: int = TOY_TRAIN_STEPS) -> Path:
    """The cached toy model folder, trained on first use."""
    if name not in TOY_MODELS:
        raise ModelLoadError(f"unknown toy model 'toy:{name}'; choose one of "
                             + ", ".join(f"toy:{k}" for k in TOY_MODELS))
    path = Path(cache_dir or default_cache_dir()) / f"toy-{name}-s{steps}-b64"
    if not (path / "model_index.json").exists():
        train_toy_model(name, path, steps)
    return path


# ---------------------------------------------------------------------------------------------------------
# Loading base models
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BaseModel:
    """Everything the sampler and the rewards need to know about a base diffusion model."""
    source: str                    # what --pretrained said
    path: str                      # where it was loaded from
    unet: nn.Module
    scheduler_config: dict
    conditioning: str              # none | class | text
    sample_shape: tuple            # (C, H, W) of x_t: pixels or latents
    num_classes: int = 0           # class models: labels 0..num_classes-1 (and num_classes = "no class" if trained so)
    vae: nn.Module | None = None   # latent models only
    text_encoder: nn.Module | None = None
    tokenizer: object = None
    extra: dict = field(default_factory=dict)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (N, L, D) for a list of prompts ("" is the unconditional one)."""
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0].float()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Finished samples -> images in [-1, 1], shape (B, 3 or 1, H, W), float32. Differentiable (the VAE is
        frozen): --algo backprop sends reward gradients back through it."""
        if not self.is_latent:
            return samples.float().clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(samples.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)


GUIDED_64X64 = dict(image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
                    attention_resolutions=[32, 16, 8], channel_mult=[1, 2, 3, 4], num_classes=1000,
                    num_head_channels=64)  # the README flags of OpenAI's 64x64_diffusion.pt
GUIDED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt"
GUIDED_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, variance_type="learned_range",
                        prediction_type="epsilon", clip_sample=True)  # cosine schedule, learned range (thesis 6.5)


def download_once(url: str, path: Path):
    """Fetch url to path unless it is there; a partial download never takes the final name. Raises OSError."""
    if path.exists():
        return
    import urllib.request
    path.parent.mkdir(parents=True, exist_ok=True)
    urllib.request.urlretrieve(url, path.with_suffix(".part"))
    path.with_suffix(".part").rename(path)


def load_guided_diffusion(spec: str, device="cpu", cache_dir=None) -> "BaseModel":
    """OpenAI's class-conditional ImageNet U-Net from a .pt file (or its URL, fetched into the cache), read with
    torch.load(weights_only=True): no pickled code runs. A sidecar FILE.json may give other constructor kwargs."""
    import torch
    from drlhf.guided_diffusion import GuidedUNet
    src = spec.split(":", 1)[1]
    if src == "64x64":
        src = str(Path(cache_dir or default_cache_dir()) / "guided-diffusion" / "64x64_diffusion.pt")
    if src.startswith(("http://", "https://")):
        path = Path(cache_dir or default_cache_dir()) / "guided-diffusion" / src.rsplit("/", 1)[1]
        try:
            download_once(src, path)
        except OSError as e:
            raise ModelLoadError(f"--pretrained {spec}: could not download it ({e}); fetch {src} elsewhere and pass "
                                 "--pretrained guided-diffusion:/path/to/64x64_diffusion.pt") from None
        src = str(path)
    path = Path(src)
    if not path.is_file():
        raise ModelLoadError(f"--pretrained {spec}: {path} does not exist. Download OpenAI's ImageNet 64x64 model "
                             f"({GUIDED_URL}, and for the value function/reward model 64x64_classifier.pt next to it) "
                             "and pass --pretrained guided-diffusion:/path/to/64x64_diffusion.pt, or put it at "
                             f"{Path(cache_dir or default_cache_dir()) / 'guided-diffusion'}")
    kwargs = dict(GUIDED_64X64)
    if path.with_suffix(".json").exists():
        kwargs.update(json.loads(path.with_suffix(".json").read_text()))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        unet = GuidedUNet(**{**kwargs, "attention_resolutions": tuple(kwargs["attention_resolutions"]),
                             "channel_mult": tuple(kwargs["channel_mult"])})
        unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)  # dropout 0: the policy must be
    except Exception as e:  # noqa: BLE001                                            deterministic for PPO ratios
        raise ModelLoadError(f"--pretrained {spec}: could not load {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    unet = unet.to(device).requires_grad_(False)
    return BaseModel(spec, str(path), unet, dict(GUIDED_SCHEDULER), "class",
                     (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]), kwargs["num_classes"])


GUIDED_CLASSIFIER_64X64 = dict(image_size=64, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=4,
                               attention_resolutions=[32, 16, 8], channel_mult=[1, 2, 3, 4], num_head_channels=64)


# the offline stand-in: OpenAI's classifier architecture at toy size, for the 16x16 colour digits (10 classes)
TOY_CLASSIFIER = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                      attention_resolutions=[4], channel_mult=[1, 2, 2], num_head_channels=32)


def toy_guided_classifier(cache_dir=None, steps: int = 300, seed: int = 0):
    """OpenAI's noisy-image classifier architecture trained on noisy toy:digits-rgb images (cosine schedule, as
    the toy base model), cached; the offline stand-in of 64x64_classifier.pt for value functions and reward models."""
    from safetensors.torch import load_file, save_file
    from drlhf.guided_diffusion import GuidedClassifier
    clf = GuidedClassifier(**{**TOY_CLASSIFIER, "attention_resolutions": (4,), "channel_mult": (1, 2, 2)})
    path = Path(cache_dir or default_cache_dir()) / f"toy-classifier-digits-rgb-s{steps}.safetensors"
    if path.exists():
        clf.load_state_dict(load_file(path))
        return clf
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    spec = TOY_MODELS["digits-rgb"]
    x, y = toy_digits(spec["digits"], spec["resolution"], spec["rgb"], seed)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="training the toy noisy-image classifier (first use, cached)", unit="step"):
        i = torch.randint(len(x), (64,), generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        loss = F.cross_entropy(clf(sched.add_noise(x[i], torch.randn(x[i].shape, generator=g), t), t), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return clf


def load_guided_classifier(spec: str, cache_dir=None):
    """OpenAI's noisy-image classifier (64x64_classifier.pt) from guided-diffusion:PATH, read with
    torch.load(weights_only=True); a sidecar FILE.json may give other constructor kwargs. toy:digits-rgb is the
    offline stand-in (the same architecture trained here on the colour digits)."""
    import torch
    from drlhf.guided_diffusion import GuidedClassifier
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


class ClassifierValue(nn.Module):
    """The noisy-image classifier with a new linear layer from its 1000 logits to one scalar (thesis 6.5: the
    value function of Experiments 2-4, given x_t and the timestep, no class)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.head = nn.Linear(classifier.out[-1].c_proj.out_channels, 1)  # on the attention pool's logits

    def forward(self, x, t, cond=None):
        return self.head(self.classifier(x, t))[:, 0]


def _resolve(source: str, cache_dir, toy_train_steps: int) -> Path:
    """--pretrained value -> local folder (toy models are trained here on first use)."""
    if source.startswith("toy:"):
        return toy_model_dir(source[4:], cache_dir, toy_train_steps)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--pretrained {source}: expected a diffusers folder (with model_index.json "
                                 "or config.json), got a file")
        return path
    if source.count("/") == 1 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:  # the local hub cache only when offline; a download otherwise
            return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        except Exception as e:  # noqa: BLE001 - any hub failure gets the same actionable message
            raise ModelLoadError(
                f"--pretrained {source}: not a local folder, and the hub id could not be fetched "
                f"({type(e).__name__}). On a machine with network run `huggingface-cli download {source} "
                f"--local-dir DIR` (or `hf download`) and pass --pretrained DIR.") from None
    raise ModelLoadError(f"--pretrained {source}: no such folder. Give a diffusers folder, a hub id "
                         "(owner/name) or one of " + ", ".join(f"toy:{k}" for k in TOY_MODELS))


def load_base_model(source: str, device="cpu", cache_dir=None, weights_dtype=torch.float32,
                    toy_train_steps: int = TOY_TRAIN_STEPS) -> BaseModel:
    """Load a base diffusion model from a toy name, a local diffusers folder or a hub id."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    if source.startswith("guided-diffusion:"):
        return load_guided_diffusion(source, device, cache_dir)
    path = _resolve(source, cache_dir, toy_train_steps)
    index = path / "model_index.json"
    try:
        if index.exists():
            unet_dir, sched_path = path / "unet", path / "scheduler" / "scheduler_config.json"
        else:
            unet_dir, sched_path = path, path / "scheduler_config.json"
        cfg_file = unet_dir / "config.json"
        if not cfg_file.exists():
            raise ModelLoadError(f"--pretrained {source}: {cfg_file} is missing; expected a diffusers pipeline "
                                 "folder (model_index.json, unet/, scheduler/) or a UNet folder")
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
        unet_cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(cls_name)
        if unet_cls is None:
            raise ModelLoadError(f"--pretrained {source}: unsupported U-Net class {cls_name!r} in {cfg_file}")
        unet = unet_cls.from_pretrained(unet_dir, low_cpu_mem_usage=False).to(device)
        sched_cfg = json.loads(sched_path.read_text()) if sched_path.exists() else {}
        vae = text_encoder = tokenizer = None
        if (path / "vae").exists():
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=weights_dtype, low_cpu_mem_usage=False).to(device).eval()
        if (path / "text_encoder").exists():
            from transformers import CLIPTextModel, CLIPTokenizer
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=weights_dtype)
            text_encoder = text_encoder.to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt/incomplete files of any kind
        raise ModelLoadError(f"--pretrained {source}: could not read the model in {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). The files are incomplete or corrupt: re-download "
                             "them, or for a toy model delete that folder to retrain it.") from None
    for p in list(unet.parameters()) + [p for m in (vae, text_encoder) if m is not None for p in m.parameters()]:
        p.requires_grad_(False)
    toy = json.loads((path / "drlhf_toy.json").read_text()) if (path / "drlhf_toy.json").exists() else {}
    c = unet.config
    if text_encoder is not None:
        conditioning, num_classes = "text", 0
    elif getattr(c, "num_class_embeds", None):
        # toy models reserve their last class embedding for "no class" (CFG); other models use them all
        conditioning, num_classes = "class", toy.get("num_classes", c.num_class_embeds)
    elif getattr(c, "class_embed_type", None) is not None:
        raise ModelLoadError(f"--pretrained {source}: class_embed_type={c.class_embed_type!r} is not supported")
    else:
        conditioning, num_classes = "none", 0
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return BaseModel(source, str(path), unet, sched_cfg, conditioning, (c.in_channels, size, size), num_classes,
                     vae, text_encoder, tokenizer, extra=toy)


class Denoiser(nn.Module):
    """The policy network: (x_t, t, c) -> model output, with classifier-free guidance in one batched forward.

    `cond` is None (unconditional), class labels (B,) or text-encoder hidden states (B, L, D). With
    guidance_scale w != 1 the conditional and unconditional inputs go through the U-Net as one batch of 2B
    and eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022); learned variance channels come from the
    conditional branch (GLIDE's choice).
    """

    def __init__(self, unet: nn.Module, conditioning: str, guidance_scale: float = 1.0, null_cond=None):
        super().__init__()
        self.unet, self.conditioning, self.guidance_scale = unet, conditioning, guidance_scale
        if guidance_scale != 1.0 and conditioning == "none":
            raise ValueError("--guidance-scale needs a conditional model; this base model is unconditional")
        self.register_buffer("null_cond", null_cond, persistent=False)

    def _unet(self, x, t, cond):
        if not hasattr(self.unet, "config"):  # OpenAI's U-Net (drlhf.guided_diffusion): a plain tensor out
            return self.unet(x, t, cond)
        if self.conditioning == "none":
            return self.unet(x, t).sample
        if self.conditioning == "class":
            return self.unet(x, t, class_labels=cond).sample
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def forward(self, x, t, cond=None):
        x = x.to(next(self.unet.parameters()).dtype) if not torch.is_autocast_enabled() else x
        if self.guidance_scale == 1.0:
            return self._unet(x, t, cond)
        null = self.null_cond.expand(len(x), *self.null_cond.shape[1:])
        out = self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        out_c, out_u = out.float().chunk(2)
        c = x.shape[1]
        guided = out_u[:, :c] + self.guidance_scale * (out_c[:, :c] - out_u[:, :c])
        return torch.cat([guided, out_c[:, c:]], 1)


def make_denoiser(base: BaseModel, guidance_scale: float = 1.0) -> Denoiser:
    null = None
    if base.conditioning == "class" and guidance_scale != 1.0:
        if getattr(getattr(base.unet, "config", None), "num_class_embeds", 0) <= base.num_classes:
            raise ValueError(f"--guidance-scale {guidance_scale}: {base.source} has no unconditional class embedding "
                             "to guide with; use --guidance-scale 1")
        null = torch.tensor([base.num_classes])
    elif base.conditioning == "text":
        null = base.encode_prompts([""])
    return Denoiser(base.unet, base.conditioning, guidance_scale, null).to(next(base.unet.parameters()).device)


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: list[str]):
    """Freeze the U-Net and inject LoRA adapters (Hu et al. 2021, through peft) into the named modules, in place.
    B starts at zero, so the adapted U-Net is exactly the base model at the start (PPO ratio 1)."""
    from peft import LoraConfig, inject_adapter_in_model
    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                           init_lora_weights="gaussian"), unet)
    except ValueError as e:
        raise ValueError(f"--lora-targets {','.join(targets)}: {str(e).splitlines()[0][:200]}") from None
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    print(f"[drlhf] LoRA rank {rank} on {','.join(targets)}: {n:,} trainable of "
          f"{sum(p.numel() for p in unet.parameters()):,} parameters")
    return unet


def merge_lora(unet: nn.Module) -> nn.Module:
    """A plain copy of a LoRA-adapted U-Net with W + (alpha / r) B A merged into each adapted weight, in the
    original key names, so that it saves and loads as an ordinary diffusers U-Net."""
    import copy
    from peft.tuners.tuners_utils import BaseTunerLayer
    merged = copy.deepcopy(unet)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if "lora_" not in k}
    plain = type(unet).from_config(unet.config) if hasattr(unet, "config") else copy.deepcopy(unet)
    plain.load_state_dict(state)
    return plain.to(next(unet.parameters()).device)


def save_pipeline(unet: nn.Module, base: BaseModel, out_dir: Path):
    """Save a policy U-Net as a diffusers pipeline next to the base model's other components."""
    from diffusers import DDPMPipeline, DDPMScheduler

    if not hasattr(unet, "config"):  # OpenAI's U-Net: its weights in the original key names, readable by upstream
        def write_guided(d):
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()},
                      Path(d) / "guided_unet.safetensors")
        _atomic_save(Path(out_dir), write_guided)
        return

    def write(d):
        sched = DDPMScheduler.from_config(base.scheduler_config) if base.scheduler_config else DDPMScheduler()
        if base.text_encoder is not None:
            from diffusers import StableDiffusionPipeline
            StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                    unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(d)
        else:
            DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(d)
        if base.extra:
            (Path(d) / "drlhf_toy.json").write_text(json.dumps(base.extra, indent=1))
    _atomic_save(Path(out_dir), write)


# ---------------------------------------------------------------------------------------------------------
# Value functions V(x_t, t, c) for the small experiments
# ---------------------------------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int = 16, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sinusoidal features of the training timestep, (B,) -> (B, dim) (Vaswani et al. 2017)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = (t.float() / num_train_timesteps * 1000)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class CriticCNN(nn.Module):
    """Appendix B's value network (conv 3x3 to 6C channels, ReLU, max-pool 2, FC 24, ReLU, FC), with the
    timestep's sinusoidal features concatenated to the flattened features so it can value noisy states."""

    def __init__(self, in_channels: int = 1, resolution: int = 16, out_dim: int = 1, t_dim: int = 16):
        super().__init__()
        self.t_dim = t_dim
        self.conv = nn.Conv2d(in_channels, in_channels * 6, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(in_channels * 6 * (resolution // 2) ** 2 + t_dim, 24)
        self.fc2 = nn.Linear(24, out_dim)

    def forward(self, x, t, cond=None):
        h = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        h = F.relu(self.fc1(torch.cat([h, timestep_features(t, self.t_dim)], 1)))
        out = self.fc2(h)
        return out[:, 0] if out.shape[1] == 1 else out


class EncoderValue(nn.Module):
    """A small convolutional encoder with timestep (and optional class) embedding -> one scalar; the toy
    counterpart of the noisy-image-classifier value function of Experiments 2-5 (thesis 6.5)."""

    def __init__(self, in_channels: int = 3, width: int = 32, num_classes: int = 0, t_dim: int = 64):
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, width * 2), nn.SiLU(), nn.Linear(width * 2, width * 2))
        self.class_emb = nn.Embedding(num_classes + 1, width * 2) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down1 = nn.Conv2d(width, width * 2, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(8, width * 2), nn.GroupNorm(8, width * 2)
        self.out = nn.Linear(width * 2, 1)

    def forward(self, x, t, cond=None):
        emb = self.t_mlp(timestep_features(t, self.t_dim))
        if self.class_emb is not None and cond is not None:
            emb = emb + self.class_emb(cond)
        h = F.silu(self.conv_in(x))
        h = F.silu(self.norm1(self.down1(h)) + emb[:, :, None, None])
        h = F.silu(self.norm2(self.down2(h)))
        return self.out(h.mean((2, 3)))[:, 0]


def pretrain_critic_classifier(in_channels: int, resolution: int, cache_dir=None, steps: int = 400, seed: int = 0):
    """Appendix B's CNN trained as a noisy-digit classifier on all ten digits (thesis 6.4: the value function
    was initialized from an MNIST classifier). Cached as safetensors; returns the state dict."""
    from safetensors.torch import load_file, save_file
    path = Path(cache_dir or default_cache_dir()) / f"critic-classifier-c{in_channels}-r{resolution}-s{steps}.safetensors"
    if path.exists():
        return load_file(path)
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    x, y = toy_digits(list(range(10)), resolution, in_channels == 3, seed)
    net = CriticCNN(in_channels, resolution, out_dim=10)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="pre-training the value network as a digit classifier (cached)"):
        i = torch.randint(len(x), (128,), generator=g)
        t = torch.randint(0, 1000, (128,), generator=g) * (torch.rand(128, generator=g) < 0.75)
        xt = sched.add_noise(x[i], torch.randn(x[i].shape, generator=g), t)
        loss = F.cross_entropy(net(xt, t), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp)
    os.replace(tmp, path)
    return state
