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

# stabilityai/stable-diffusion-3.5-medium's transformer/, vae/, text_encoder*/ configs (the fields that are not the
# libraries' defaults) and its scheduler: MMDiT-X with dual attention in its first 13 blocks, a 16-channel VAE, CLIP-L,
# OpenCLIP bigG and T5-XXL's encoder
SD35M = dict(
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                     qk_norm="rms_norm"),
    vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
             norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
             use_post_quant_conv=False),
    clip_l=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407),
    clip_g=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
                num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                bos_token_id=49406, eos_token_id=49407),
    t5=dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True),
    scheduler=dict(num_train_timesteps=1000, shift=3.0))
# --size tiny: the same classes small (a 2-block transformer over 8x8 latents, 64 px images), for CPU runs and tests
SD35M_TINY = dict(
    SD35M, transformer=dict(SD35M["transformer"], sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                            pos_embed_max_size=16, dual_attention_layers=(0,)),
    vae=dict(SD35M["vae"], block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64),
    clip_l=dict(SD35M["clip_l"], hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=8),
    clip_g=dict(SD35M["clip_g"], hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=24),
    t5=dict(SD35M["t5"], vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8))


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


def t5_tokenizer(words: list[str], vocab_size: int):
    """A T5 (Unigram) tokenizer made offline: one piece per word of `words` and per letter, </s> and padding as T5's."""
    from transformers import T5TokenizerFast
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words))][:vocab_size - len(pieces)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_sd35(path: Path, size: str, device) -> Path:
    """An SD3.5-Medium-shaped StableDiffusion3Pipeline folder (fp16 safetensors; tiny: fp32) with tokenizers made here:
    CLIP's 77 positions with one token per letter, and a T5 tokenizer over the builtin prompts' words. Any diffusers
    trainer loads it (`StableDiffusion3Pipeline.from_pretrained`), so that peers can run on the same weights."""
    if (path / "model_index.json").exists():
        return path
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from drlhf.prompts import BUILTIN
    t0, c = time.perf_counter(), (SD35M_TINY if size == "tiny" else SD35M)
    dtype = torch.float32 if size == "tiny" else torch.float16
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        transformer = SD3Transformer2DModel(**c["transformer"])
        vae = AutoencoderKL(**c["vae"])
        texts = [CLIPTextModelWithProjection(CLIPTextConfig(**c["clip_l"])),
                 CLIPTextModelWithProjection(CLIPTextConfig(**c["clip_g"])), T5EncoderModel(T5Config(**c["t5"]))]
    words = [w.strip(".,").lower() for prompts in BUILTIN.values() for p in prompts for w in p.split()]

    def write(folder: Path):  # into a temporary folder renamed when complete: an interrupted build is not reused
        letters = "abcdefghijklmnopqrstuvwxyz .,'-"
        tok_l = letter_tokenizer(folder / "_tok_l", 77, letters, (49406, 49407))
        tok_g = letter_tokenizer(folder / "_tok_g", 77, letters, (49406, 49407))
        StableDiffusion3Pipeline(
            transformer=transformer.to(dtype).cpu(), vae=vae.to(dtype).cpu(),
            scheduler=FlowMatchEulerDiscreteScheduler(**c["scheduler"]),
            text_encoder=texts[0].to(dtype).cpu(), tokenizer=tok_l, text_encoder_2=texts[1].to(dtype).cpu(),
            tokenizer_2=tok_g, text_encoder_3=texts[2].to(dtype).cpu(),
            tokenizer_3=t5_tokenizer(words, c["t5"]["vocab_size"])).save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "_tok_l")
        shutil.rmtree(folder / "_tok_g")

    atomic_write(path, write, folder=True)
    print(f"[bench] built {path} ({sum(p.numel() for p in transformer.parameters()) / 1e9:.2f} B transformer "
          f"parameters) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


# PickScore v1's architecture (laion/CLIP-ViT-H-14's config): the reward of --exp pickscore and pickscore-sd3
PICKSCORE = dict(text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                 vision_config=dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120,
                                    num_hidden_layers=32, num_attention_heads=16, hidden_act="gelu"),
                 projection_dim=1024)
PICKSCORE_TINY = dict(text_config=dict(PICKSCORE["text_config"], hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2),
                      vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2), projection_dim=16)


def build_pickscore(path: Path, size: str, device) -> Path:
    """A PickScore-shaped CLIP preference model at random weights (model/ and processor/, what --pickscore-model and
    --pickscore-processor read), with CLIP's 77-token length and one token per letter."""
    if (path / "model" / "config.json").exists():
        return path
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    c = PICKSCORE_TINY if size == "tiny" else PICKSCORE
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(CLIPConfig(**c))
    px = c["vision_config"]["image_size"]

    def write(folder: Path):
        tokenizer = letter_tokenizer(folder / "_tok", 77, "abcdefghijklmnopqrstuvwxyz .,'-", (49406, 49407))
        CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}),
                      tokenizer=tokenizer).save_pretrained(folder / "processor")
        model.half().cpu().save_pretrained(folder / "model") if size != "tiny" else model.save_pretrained(folder / "model")
        shutil.rmtree(folder / "_tok")

    atomic_write(path, write, folder=True)
    return path


def build_reward_model(sd: Path, path: Path, device) -> Path:
    """A Pink-style reward model (train_reward.py's RewardModel on the U-Net's encoder) at random init."""
    if (path / "config.json").exists():
        return path
    from drlhf.reward_model import RewardModel
    base = models.load_base_model(str(sd), device)
    torch.manual_seed(0)
    rm = RewardModel(base.net, base.conditioning, base.encode_prompts([""]), base.num_classes)
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
