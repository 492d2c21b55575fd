"""The real architectures of the presets at random weights, built from their configs in seconds on a GPU (no
download), into the folders and files that train_ppo.py's loaders read; --size tiny: the same classes at toy
widths. Used by benchmarks/epoch.py (and the tests' tiny pipelines use its tokenizer)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from drlhf import models
from drlhf.checkpoint import atomic_write

# stable-diffusion-v1-5/stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json files (the fields that
# are not the libraries' defaults) and its scheduler config; the text encoder is CLIP ViT-L/14's
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "clip_sample": False}
# --size tiny: the same classes at toy widths, for a CPU run in seconds (the tests' run)
TINY = {"unet": dict(SD15_UNET, sample_size=8, layers_per_block=1, cross_attention_dim=32, block_out_channels=(32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "vae": dict(SD15_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64),
        "text": dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
        "guided": dict(model_channels=32, num_res_blocks=1, num_head_channels=16)}


def letter_tokenizer(folder: Path, max_length: int, chars: str = "abcdefghijklmnopqrstuvwxyz", special_ids=None):
    """A CLIP tokenizer made offline: one token per letter and per word-final letter, no merges. special_ids: the
    ids of <|startoftext|> and <|endoftext|> (default 0 and 1, the letters after them)."""
    from transformers import CLIPTokenizer
    first = 0 if special_ids else 2
    vocab = {token: first + i for i, token in enumerate(c + end for c in chars for end in ("", "</w>"))}
    vocab.update(zip(("<|startoftext|>", "<|endoftext|>"), special_ids or (0, 1)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token="<|endoftext|>")


def build_sd15(path: Path, size: str, device) -> Path:
    """An SD v1.5-shaped diffusers pipeline folder (fp16 safetensors) with a tokenizer made here: one token per
    letter and CLIP's 77-token length, which is all that the timing depends on."""
    if (path / "model_index.json").exists():
        return path
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    t0 = time.perf_counter()
    tiny = size == "tiny"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        unet = UNet2DConditionModel(**(TINY["unet"] if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY["vae"] if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY["text"] if tiny else SD15_TEXT)))

    def write(folder: Path):  # into a temporary folder renamed when complete: an interrupted build is not reused
        # CLIP's 77 positions and the ids of its two special tokens; the letters are all that prompts need here
        tokenizer = letter_tokenizer(folder / "_tokenizer", 77, "abcdefghijklmnopqrstuvwxyz .,'-", (49406, 49407))
        StableDiffusionPipeline(vae=vae.half().cpu(), text_encoder=text_encoder.half().cpu(), tokenizer=tokenizer,
                                unet=unet.half().cpu(), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "_tokenizer")  # saved into tokenizer/ with the pipeline

    atomic_write(path, write, folder=True)
    print(f"[bench] built {path} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M U-Net parameters) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return path


def build_reward_model(sd: Path, path: Path, device) -> Path:
    """A Pink-style reward model (train_reward.py's RewardModel on the U-Net's encoder) at random init."""
    if (path / "config.json").exists():
        return path
    from drlhf.reward_model import RewardModel
    base = models.load_base_model(str(sd), device)
    torch.manual_seed(0)
    rm = RewardModel(base.unet, base.conditioning, base.encode_prompts([""]), base.num_classes)
    rm.save(path, dict(base_model=str(sd), dataset="none: random init (benchmarks/epoch.py)", guidance_weight=1.0,
                       input_shape=list(base.sample_shape), cond_drop=0.0))
    return path


def build_guided(folder: Path, size: str, device) -> Path:
    """OpenAI's 64x64 U-Net and noisy-image classifier as the state dicts --pretrained / --classifier read;
    --size tiny writes the loader's sidecar .json with smaller widths."""
    from drlhf.guided_diffusion import GuidedClassifier, GuidedUNet
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, cls, kwargs in (("64x64_diffusion", GuidedUNet, models.GUIDED_64X64),
                              ("64x64_classifier", GuidedClassifier, models.GUIDED_CLASSIFIER_64X64)):
        if (folder / f"{name}.pt").exists():
            continue
        kw = dict(kwargs, **(TINY["guided"] if size == "tiny" else {}))
        with torch.device(device):
            net = cls(**{**kw, "attention_resolutions": tuple(kw["attention_resolutions"]),
                         "channel_mult": tuple(kw["channel_mult"])})
        if size == "tiny":
            (folder / f"{name}.json").write_text(json.dumps(TINY["guided"]))
        atomic_write(folder / f"{name}.pt", lambda tmp: torch.save({k: v.detach().cpu() for k, v in
                                                                    net.state_dict().items()}, tmp))
    return folder


def build_classifier_reward_model(folder: Path, class_labels: str | None) -> Path:
    """A Macaw-style reward model (the classifier + a linear layer) at random init."""
    path = folder / "rm-classifier"
    if not (path / "config.json").exists():
        from drlhf.reward_model import ClassifierRewardModel
        spec = f"guided-diffusion:{folder / '64x64_classifier.pt'}"
        torch.manual_seed(0)
        ClassifierRewardModel(models.load_guided_classifier(spec), spec).save(
            path, dict(base_model="random", dataset="none: random init (benchmarks/epoch.py)", input_shape=[3, 64, 64],
                       class_labels=class_labels))
    return path
