"""Fixed reward functions of Experiments 1 and 2: images (B, C, H, W) in [-1, 1] -> rewards (B,) float32.

    target        Algorithm 1 (thesis 6.4): adjusted RMSE to a bold, slanted target "4", times -10
    colorfulness  appendix A (thesis 6.5): share of vivid pixels x entropy of their hue histogram
    aesthetic     LAION Aesthetics Predictor V2 (thesis 6.6): CLIP ViT-L/14 embedding into a linear MLP
    pickscore     PickScore v1 (thesis 6.10), or any CLIP-based preference model of image-prompt pairs
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import torch
import torch.nn.functional as F

from drlhf.cli import UserError
from drlhf.files import atomic_write, default_cache_dir
from drlhf.files import download_once
from drlhf.reward_model import load_reward_model

TARGET_PNG = Path(__file__).parent / "assets" / "target_4.png"


def make_target_four(size: int = 64):
    """Draw the target "4": heavy strokes, slanted to the right (thesis Figure 6.1 describes it as a digit
    with significant font weight and a slanted appearance). Returns a greyscale PIL image, white on black."""
    from PIL import Image, ImageDraw
    s = size / 64
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    w = round(9 * s)
    d.line([(40 * s, 8 * s), (14 * s, 40 * s)], fill=255, width=w)          # the diagonal
    d.line([(12 * s, 40 * s), (52 * s, 40 * s)], fill=255, width=w)         # the bar
    d.line([(40 * s, 8 * s), (40 * s, 58 * s)], fill=255, width=round(10 * s))  # the stem
    shear = 0.25  # x' = x + shear * (y - size/2): the top leans right
    return img.transform(img.size, Image.AFFINE, (1, shear, -shear * size / 2, 0, 1, 0),
                         resample=Image.BICUBIC)


def load_target(resolution: int, channels: int, path: str | Path | None = None) -> torch.Tensor:
    """The target image in [0, 1], shape (1, channels, resolution, resolution)."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path or TARGET_PNG)
    try:
        img = Image.open(path).convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"--target-image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--target-image {path}: not a readable image ({e})") from None
    x = torch.tensor(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).expand(1, channels, resolution, resolution).contiguous()


def target_image_reward(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: normalize to [0, 1]; squared error; add error * target / mean(target) so that ink
    pixels weigh more and an all-black image is not a local optimum; mean over (C, H, W); sqrt; x -10."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    target = target.to(x.device, x.dtype)
    loss = (x - target) ** 2
    loss = loss + loss * target / target.mean()
    return -10 * loss.mean((1, 2, 3)).sqrt()


def colorfulness_reward(images: torch.Tensor, vivid_threshold: float = 10.0, n_hue_bins: int = 7) -> torch.Tensor:
    """Appendix A (after Pinto et al. 2023): in CIE Lab, the share of pixels with a^2 + b^2 above a threshold
    times the base-2 entropy of the hue angle atan2(b, a) in n bins over [-pi, pi]. Batched."""
    from skimage.color import rgb2lab
    if images.shape[1] != 3:
        raise ValueError(f"the colorfulness reward needs RGB images, got {images.shape[1]} channel(s): a "
                         "greyscale model has no colour to reward; use an RGB base model (e.g. toy:digits-rgb)")
    rgb = (images.detach().float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    lab = rgb2lab(rgb, channel_axis=-1)                                   # (B, H, W, 3)
    a, b = lab[..., 1], lab[..., 2]
    vivid_ratio = (a ** 2 + b ** 2 > vivid_threshold).mean((1, 2))
    hue = np.arctan2(b, a).reshape(len(rgb), -1)
    bins = np.clip(((hue + np.pi) / (2 * np.pi) * n_hue_bins).astype(np.int64), 0, n_hue_bins - 1)
    counts = (bins[..., None] == np.arange(n_hue_bins)).sum(1)           # (B, n_hue_bins)
    probs = counts / counts.sum(1, keepdims=True)
    entropy = -(probs * np.log2(probs + np.finfo(np.float64).eps)).sum(1)
    return torch.tensor(vivid_ratio * entropy, dtype=torch.float32, device=images.device)


class CLIPPreferenceReward:
    """PickScore v1 (Kirstain et al. 2023) and other CLIP-based preference models of images and prompts, through
    transformers' CLIPModel: score = logit_scale * cos(image embedding, text embedding) for each image-prompt pair."""

    def __init__(self, model: str, processor: str, device="cpu"):
        from transformers import AutoProcessor, CLIPModel
        try:
            self.processor = AutoProcessor.from_pretrained(processor)
            self.model = CLIPModel.from_pretrained(model).eval().requires_grad_(False).to(device)
        except OSError as e:
            raise ValueError(f"--pickscore-model {model} / --pickscore-processor {processor}: cannot load them "
                             f"({type(e).__name__}). They are hub ids or local folders; offline, download them first "
                             "(`hf download yuvalkirstain/PickScore_v1` and `hf download "
                             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) and pass the folders") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        from PIL import Image
        if prompts is None or isinstance(prompts, torch.Tensor):
            raise ValueError("--reward pickscore scores image-prompt pairs: it needs a text-conditional base model")
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pil = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in x]
        inputs = self.processor(images=pil, text=list(prompts), padding=True, truncation=True,
                                return_tensors="pt").to(self.device)
        out = self.model(**inputs)  # image_embeds and text_embeds are L2-normalized by CLIPModel
        return (self.model.logit_scale.exp() * (out.image_embeds * out.text_embeds).sum(-1)).float().to(images.device)


# LAION Aesthetics Predictor V2 (github.com/christophschuhmann/improved-aesthetic-predictor): the MLP's weights
AESTHETIC_MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     "sac%2Blogos%2Bava1-l14-linearMSE.pth")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP


def fetch(spec: str, cache_dir=None, flag: str = "--aesthetic-mlp") -> Path:
    """A local path, or a URL downloaded once into the cache; offline, a message with the URL and the flag."""
    if not spec.startswith(("http://", "https://")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {spec}: no such file")
        return path
    path = Path(cache_dir or default_cache_dir()) / "downloads" / unquote(spec.rsplit("/", 1)[1])
    try:
        download_once(spec, path)
    except OSError as e:
        raise FileNotFoundError(f"{flag} {spec}: could not download it ({e}); fetch it on a machine with network "
                                f"and pass {flag} /path/to/{path.name}") from None
    return path


class AestheticReward:
    """LAION Aesthetics Predictor V2 (thesis 6.6): the CLIP ViT-L/14 image embedding, L2-normalized, into a stack of
    linear layers (1024-128-64-16-1, no activations; dropout only in its training) -> a 1-10 aesthetic score.

    The images are resized to CLIP's input size and normalized in torch (PIL's bicubic, as CLIP's preprocessing;
    the upstream code resizes uint8 PIL images, which differs in rounding only), so the score is differentiable
    and serves --algo backprop too. The MLP's weights are read with torch.load(weights_only=True)."""

    def __init__(self, clip_model: str, mlp_weights: str, device="cpu", cache_dir=None):
        from transformers import CLIPModel
        try:  # the whole CLIPModel: its top-level projection_dim is the one the predictor was trained on
            self.clip = CLIPModel.from_pretrained(clip_model).eval().requires_grad_(False).to(device)
        except OSError as e:
            raise ValueError(f"--aesthetic-clip {clip_model}: cannot load it ({type(e).__name__}); it is a hub id or a "
                             "local folder; offline, download it first (`hf download openai/clip-vit-large-patch14`) "
                             "and pass the folder") from None
        path = fetch(mlp_weights, cache_dir)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
            linears = [torch.nn.Linear(*state[f"layers.{i}.weight"].shape[::-1]) for i in layers]
            for i, lin in zip(layers, linears):
                lin.load_state_dict({"weight": state[f"layers.{i}.weight"], "bias": state[f"layers.{i}.bias"]})
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--aesthetic-mlp {path}: not the predictor's weights (a state dict with layers.N.weight/"
                             f"bias; {type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        self.mlp = torch.nn.Sequential(*linears).eval().requires_grad_(False).to(device)
        dim = self.clip.config.projection_dim
        if linears[0].in_features != dim or linears[-1].out_features != 1:
            raise ValueError(f"--aesthetic-mlp {path} takes {linears[0].in_features}-dimensional embeddings, "
                             f"--aesthetic-clip {clip_model} gives {dim} (the predictor is for CLIP ViT-L/14: 768)")
        self.size = self.clip.config.vision_config.image_size
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, cond=None) -> torch.Tensor:
        x = (images.float() / 2 + 0.5).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # antialias=True: torch's PIL-compatible bicubic (a = -0.5), as CLIP's own PIL preprocessing
        x = F.interpolate(x.to(self.mean.device), size=(self.size, self.size), mode="bicubic", align_corners=False,
                          antialias=True)
        emb = self.clip.get_image_features(pixel_values=(x.clamp(0, 1) - self.mean) / self.std)
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb)[:, 0].float().to(images.device)


def get_reward_fn(name: str, resolution: int, channels: int, target_image=None, pickscore_model=None,
                  pickscore_processor=None, device="cpu", aesthetic_clip=None, aesthetic_mlp=None, cache_dir=None):
    """Reward name (`--reward`) -> function (images, prompts or class labels) -> rewards."""
    if name == "pickscore":
        return CLIPPreferenceReward(pickscore_model, pickscore_processor, device)
    if name == "aesthetic":
        return AestheticReward(aesthetic_clip or "openai/clip-vit-large-patch14", aesthetic_mlp or AESTHETIC_MLP_URL,
                               device, cache_dir)
    if name == "target":
        target = load_target(resolution, channels, target_image)
        return lambda images, cond=None: target_image_reward(images, target)
    if name == "colorfulness":
        if channels != 3:
            raise ValueError(f"--reward colorfulness needs an RGB base model; this one has {channels} channel(s)")
        return lambda images, cond=None: colorfulness_reward(images)
    raise ValueError(f"--reward {name!r} is not available here; built-in rewards: target, colorfulness, aesthetic, "
                     "pickscore, rm (a trained reward model), or module:function")


class RewardFunctionError(UserError):
    """A reward function that cannot be used or gave no usable scores; the message names the flag."""


def build(spec: str, base, device="cpu", reward_model=None, target_image=None,
          pickscore_model="yuvalkirstain/PickScore_v1",
          pickscore_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", cache_dir=None, aesthetic_clip=None,
          aesthetic_mlp=None, flag: str = "--reward", ensemble_penalty: float = 0.0, ensemble_reduce: str = "penalty"):
    """A reward by name for a base model (models.BaseModel) -> fn(samples, cond, prompts=None) -> (B,) scores.

    rm scores the samples themselves (latents for latent models; thesis 5.2); every other reward sees the decoded
    images in [-1, 1] and the condition in human terms: the prompts of text models, the class labels otherwise.
    Every reward's output is checked to be one number per sample; `flag` names the option in messages. A reward
    model with N heads (train_reward.py --ensemble N) gives mean - ensemble_penalty * std over its heads, or with
    ensemble_reduce="min" the worst head (conservative reward-model ensembles, Coste et al. 2023); the heads'
    mean std of the last call is in fn.ensemble["disagreement"].
    """
    if spec == "rm":
        if not reward_model:
            raise ValueError(f"{flag} rm needs --reward-model DIR, a folder written by train_reward.py")
        rm, config = load_reward_model(reward_model, base, device, cache_dir=cache_dir)
        rm.eval().requires_grad_(False)  # frozen; --algo backprop sends gradients through it, never into it
        if rm.ensemble == 1 and (ensemble_penalty > 0 or ensemble_reduce != "penalty"):
            raise RewardFunctionError(f"--reward-model {reward_model} has one head: --ensemble-penalty / "
                                      "--ensemble-reduce need an ensemble (train_reward.py --ensemble N)")
        ensemble = {}

        def fn(samples, cond, prompts=None):
            r = rm(samples.float(), None, cond, guidance=config.get("guidance_weight", 1.0))  # (B,) or (B, N)
            if r.ndim == 2:
                std = r.std(1)
                ensemble["disagreement"] = std.mean().item()
                r = r.min(1).values if ensemble_reduce == "min" else r.mean(1) - ensemble_penalty * std
            return r
        scored = checked(fn, spec, flag, model=rm)
        scored.ensemble = ensemble
        return scored
    if ":" in spec:  # module:function, e.g. a custom scoring function of images (and conditions)
        image_fn = import_function(spec, flag)
        fn = lambda samples, cond, prompts=None: image_fn(base.decode(samples), prompts if prompts is not None else cond)  # noqa: E731
        return checked(fn, spec, flag, user_code=True)
    c, h, _ = base.sample_shape
    image_fn = get_reward_fn(spec, h * (8 if base.is_latent else 1), 3 if base.is_latent else c, target_image,
                             pickscore_model, pickscore_processor, device, aesthetic_clip, aesthetic_mlp, cache_dir)
    return checked(lambda samples, cond, prompts=None: image_fn(base.decode(samples), prompts if prompts is not None
                                                               else cond), spec, flag)


def import_function(spec: str, flag: str):
    """module:function -> the function. The module must be importable: a file MODULE.py in the working directory
    or in a folder on PYTHONPATH (PYTHONPATH=/path/to/folder python train_ppo.py --reward MODULE:FUNCTION)."""
    mod, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:  # `python path/to/script.py` puts the script's folder first, not the working one
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise RewardFunctionError(f"{flag} {spec}: cannot import module {mod!r} ({e}); it must be importable: put "
                                  f"{mod}.py in the working directory or its folder on PYTHONPATH") from None
    if not callable(getattr(module, name, None)):
        raise RewardFunctionError(f"{flag} {spec}: module {mod!r} ({getattr(module, '__file__', '?')}) has no "
                                  f"function {name!r}")
    return getattr(module, name)


def checked(fn, spec: str, flag: str, model=None, user_code: bool = False):
    """fn with its output checked to be one number per sample, returned as a float tensor of shape (B,) (with its
    gradient, for --algo backprop); finiteness is the caller's check. An exception inside user code becomes one line naming the flag and the place."""
    def score(samples, cond, prompts=None):
        try:
            out = fn(samples, cond, prompts)
        except Exception as e:  # noqa: BLE001
            if not user_code or isinstance(e, UserError):
                raise
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise RewardFunctionError(f"{flag} {spec} raised {type(e).__name__}: {e} (at {where.filename}:"
                                      f"{where.lineno})") from e
        try:
            scores = torch.as_tensor(out).to(samples.device)
        except (TypeError, ValueError, RuntimeError):
            raise RewardFunctionError(f"{flag} {spec} returned {type(out).__name__} {str(out)[:60]!r}; a reward "
                                      "function returns one number per sample (a tensor of shape (B,))") from None
        n = len(samples)
        if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.bool)) or \
                tuple(scores.shape) not in ((n,), (n, 1)):
            raise RewardFunctionError(f"{flag} {spec} returned {scores.dtype} of shape {tuple(scores.shape)} for "
                                      f"{n} samples; a reward function returns one number per sample, shape ({n},)")
        return scores.reshape(n).float()
    if model is not None:
        score.model = model
    return score


def from_flags(spec: str, base, device, flags, flag: str = "--reward"):
    """build() with the reward settings of a script's Args (--reward-model, --target-image, --pickscore-*,
    --aesthetic-*, --cache-dir); flags a script does not have take their defaults."""
    names = ("reward_model", "target_image", "pickscore_model", "pickscore_processor", "cache_dir", "aesthetic_clip",
             "aesthetic_mlp", "ensemble_penalty", "ensemble_reduce")
    return build(spec, base, device, **{n: getattr(flags, n) for n in names if hasattr(flags, n)}, flag=flag)


if __name__ == "__main__":  # regenerate the committed target image: python -m drlhf.rewards
    image = make_target_four()
    atomic_write(TARGET_PNG, lambda tmp: image.save(tmp, format="PNG"))
    print("wrote", TARGET_PNG)
