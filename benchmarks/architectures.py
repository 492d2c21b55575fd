"""The real architectures of the presets at random weights, built from their configs in seconds on a GPU (no
download), into the folders and files that train_ppo.py's loaders read; --size tiny: the same classes at toy
widths. Used by benchmarks/epoch.py (and the tests' tiny pipelines use its tokenizer)."""
from __future__ import annotations

import contextlib
import json
import re
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


def _prompt_words() -> list[str]:
    """The builtin prompts' words, lower case: the T5 tokenizers' vocabulary."""
    from drlhf.prompts import BUILTIN
    return [w.strip(".,").lower() for prompts in BUILTIN.values() for p in prompts for w in p.split()]


def build_sd35(path: Path, size: str, device) -> Path:
    """An SD3.5-Medium-shaped StableDiffusion3Pipeline folder (fp16 safetensors; tiny: fp32) with tokenizers made here:
    CLIP's 77 positions with one token per letter, and a T5 tokenizer over the builtin prompts' words. Any diffusers
    trainer loads it (`StableDiffusion3Pipeline.from_pretrained`), so that peers can run on the same weights."""
    if (path / "model_index.json").exists():
        return path
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    t0, c = time.perf_counter(), (SD35M_TINY if size == "tiny" else SD35M)
    dtype = torch.float32 if size == "tiny" else torch.float16
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        transformer = SD3Transformer2DModel(**c["transformer"])
        vae = AutoencoderKL(**c["vae"])
        texts = [CLIPTextModelWithProjection(CLIPTextConfig(**c["clip_l"])),
                 CLIPTextModelWithProjection(CLIPTextConfig(**c["clip_g"])), T5EncoderModel(T5Config(**c["t5"]))]
    words = _prompt_words()

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


# black-forest-labs/FLUX.1-dev's transformer/, vae/, text_encoder*/ configs and its scheduler (the fields that are not
# the libraries' defaults): "a 12 billion parameter rectified flow transformer" (its model card) of 19 double-stream and
# 38 single-stream blocks (24 heads x 128) over 2x2-packed latents (patch_size 1, in_channels 64) of a 16-channel VAE
# (scaling 0.3611, shift 0.1159, no quant convs), conditioned on CLIP-L's pooled output (768) and T5-XXL's encoder states
# (4096), rope axes 16/56/56, a guidance embedding (dev). BFL's own flux-dev config says the same (in_channels 64,
# hidden 3072, depth 19 + 38 single, axes_dim 16/56/56, z_channels 16, ch_mult 1/2/4/4). The text encoders are
# SD3.5's CLIP-L and T5-XXL (the same configs).
FLUX_DEV = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
    vae=dict(SD35M["vae"], scaling_factor=0.3611, shift_factor=0.1159),
    clip_l=SD35M["clip_l"],
    t5=SD35M["t5"],
    # scheduler/scheduler_config.json: resolution-dependent (dynamic) shift between 0.5 at 256 and 1.15 at 4096 tokens
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096))
# FLUX.1-schnell: the same architecture without the guidance embedding (timestep-distilled, 1-4 steps), and an
# unshifted schedule (BFL's reference sampler shifts only for dev: get_schedule(..., shift=name != "flux-schnell"))
FLUX_SCHNELL = dict(FLUX_DEV, transformer=dict(FLUX_DEV["transformer"], guidance_embeds=False),
                    scheduler=dict(FLUX_DEV["scheduler"], shift=1.0, use_dynamic_shifting=False))
# --size tiny: the same classes at toy widths (1 double + 1 single block, 32-wide text states), the real 16 latent
# channels and 8x VAE: 32 px images are 4x4 latents, 2x2 = 4 image tokens; T5 pads to the pipeline's 512 tokens
FLUX_TINY = dict(
    FLUX_DEV,
    transformer=dict(FLUX_DEV["transformer"], num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    vae=dict(FLUX_DEV["vae"], block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64),
    clip_l=dict(FLUX_DEV["clip_l"], hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=32),
    t5=SD35M_TINY["t5"])

# Qwen2.5-VL's special tokens in their published order: <|endoftext|> is id 151643 in Qwen/Qwen-Image's tokenizer, the
# others follow it (<|im_start|> 151644, <|im_end|> 151645, ... <|vision_start|> 151652, <|image_pad|> 151655)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def _qwen_token_ids(first: int) -> dict:
    """The text encoder's config ids of the special tokens when <|endoftext|> has id `first`."""
    return dict(image_token_id=first + 12, video_token_id=first + 13, vision_start_token_id=first + 9,
                vision_end_token_id=first + 10)


# Qwen/Qwen-Image's transformer/, vae/, text_encoder/ configs and its scheduler (as published on the hub and quoted by
# trainers: a 20B MMDiT, the model card's words): 60 dual-stream blocks (24 heads x 128) over 2x2 patches of a
# 16-channel Wan-style VAE normalized per channel by latents_mean/std (the VAE class's defaults are those values),
# conditioned on the last hidden states of Qwen2.5-VL-7B (3584 wide: 28 layers, 28 heads, 4 KV heads; a 32-block ViT);
# no guidance embedding (true CFG with a negative prompt instead)
QWEN_IMAGE = dict(
    transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0,
             latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                           0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
             latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                          1.5579, 1.6382, 1.1253, 2.8251, 1.9160]),
    text_encoder=dict(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
                         rms_norm_eps=1e-6, sliding_window=32768, max_window_layers=28,
                         rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2),
        **_qwen_token_ids(151643)),
    # scheduler/scheduler_config.json: an exponential dynamic shift from 0.5 (256 tokens) to 0.9 (8192 tokens), the
    # last sigma stretched to 0.02
    scheduler=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                   base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"))
# --size tiny: the same classes small (2 blocks of 2 heads x 16, a 32-wide 2-layer Qwen2.5-VL with a 2-block ViT, a
# 16-wide VAE), the real 16 latent channels and 8x VAE (32 px images: 4 image tokens), a ~1.1 k-token vocabulary whose
# special tokens start at 2048
QWEN_IMAGE_TINY = dict(
    QWEN_IMAGE,
    transformer=dict(QWEN_IMAGE["transformer"], num_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    vae=dict(QWEN_IMAGE["vae"], base_dim=16, num_res_blocks=1),
    text_encoder=dict(
        text_config=dict(QWEN_IMAGE["text_encoder"]["text_config"], vocab_size=2112, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_window_layers=2,
                         rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 3, 3]),
                         bos_token_id=2048, eos_token_id=2050),
        vision_config=dict(QWEN_IMAGE["text_encoder"]["vision_config"], depth=2, hidden_size=32, intermediate_size=64,
                           num_heads=2, out_hidden_size=32, fullatt_block_indexes=[1]),
        **_qwen_token_ids(2048)))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters created in `dtype`: a full-size model is initialized in bf16 directly (Qwen-Image's 20 B
    transformer in fp32 would not fit on an 80 GB GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_flux(path: Path, size: str, device, variant: str = "dev") -> Path:
    """A FLUX.1-dev- (or -schnell-) shaped FluxPipeline folder (bf16 safetensors; tiny: fp32) with tokenizers made
    here: CLIP's 77 positions with one token per letter, and a T5 tokenizer over the builtin prompts' words (the
    pipeline pads T5 to max_sequence_length, 512 by default). `FluxPipeline.from_pretrained(path)` loads it offline."""
    if (path / "model_index.json").exists():
        return path
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    full = {"dev": FLUX_DEV, "schnell": FLUX_SCHNELL}[variant]
    tiny = size == "tiny"
    c = dict(FLUX_TINY, transformer=dict(FLUX_TINY["transformer"], guidance_embeds=full["transformer"]["guidance_embeds"]),
             scheduler=full["scheduler"]) if tiny else full
    t0, dtype = time.perf_counter(), (torch.float32 if tiny else torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):  # random init on the GPU: seconds instead of minutes
        transformer = FluxTransformer2DModel(**c["transformer"])
        vae = AutoencoderKL(**c["vae"])
        clip = CLIPTextModel(CLIPTextConfig(**c["clip_l"]))
        t5 = T5EncoderModel(T5Config(**c["t5"]))
    n = sum(p.numel() for p in transformer.parameters())

    def write(folder: Path):  # into a temporary folder renamed when complete: an interrupted build is not reused
        tok = letter_tokenizer(folder / "_tok", 77, "abcdefghijklmnopqrstuvwxyz .,'-", (49406, 49407))
        tok_2 = t5_tokenizer(_prompt_words(), c["t5"]["vocab_size"])
        FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**c["scheduler"]), vae=vae.cpu(), text_encoder=clip.cpu(),
                     tokenizer=tok, text_encoder_2=t5.cpu(), tokenizer_2=tok_2,
                     transformer=transformer.cpu()).save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "_tok")

    atomic_write(path, write, folder=True)
    print(f"[bench] built {path} ({n / 1e6:,.1f} M transformer parameters) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return path


def qwen_tokenizer(template: str, texts: list[str], first_special_id: int):
    """A Qwen2 (byte-level BPE) tokenizer made offline: its merges learnt here from the pipeline's prompt template and
    `texts`, until each of their words is one token (so the template's system prefix makes as many tokens as with
    Qwen's own vocabulary: the 34 that QwenImagePipeline drops); any other text falls back to bytes. Qwen2.5-VL's
    special tokens get the ids first_special_id, first_special_id + 1, ... in their published order."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    pieces = re.split("|".join(map(re.escape, QWEN_SPECIAL_TOKENS)), template.replace("{}", ""))
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    # Qwen2's own split of words, numbers and punctuation before the byte-level mapping
    bpe.pre_tokenizer = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[]).backend_tokenizer.pre_tokenizer
    bpe.train_from_iterator(pieces + list(texts), trainers.BpeTrainer(
        vocab_size=first_special_id, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"], **{t: first_special_id + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]], eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=131072)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    return tok


def build_qwen_image(path: Path, size: str, device) -> Path:
    """A Qwen-Image-shaped QwenImagePipeline folder (bf16 safetensors; tiny: fp32) with a Qwen2 tokenizer made here
    (`qwen_tokenizer`, over the pipeline's prompt template and the builtin prompts). `QwenImagePipeline.from_pretrained`
    loads it offline."""
    if (path / "model_index.json").exists():
        return path
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from drlhf.prompts import BUILTIN
    tiny = size == "tiny"
    t0, c = time.perf_counter(), (QWEN_IMAGE_TINY if tiny else QWEN_IMAGE)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):  # random init on the GPU: seconds instead of minutes
        transformer = QwenImageTransformer2DModel(**c["transformer"])
        vae = AutoencoderKLQwenImage(**c["vae"])
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**c["text_encoder"]))
    n = sum(p.numel() for p in transformer.parameters())

    def write(folder: Path):  # into a temporary folder renamed when complete: an interrupted build is not reused
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**c["scheduler"]), vae=vae.cpu(),
                                 text_encoder=text_encoder.cpu(), tokenizer=None, transformer=transformer.cpu())
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        tok = qwen_tokenizer(template, [p for prompts in BUILTIN.values() for p in prompts],
                             c["text_encoder"]["text_config"]["bos_token_id"])
        prefix = len(tok(template.split("{}")[0])["input_ids"])
        assert prefix == drop, f"the prompt template's prefix is {prefix} tokens, the pipeline drops {drop}"
        pipe.register_modules(tokenizer=tok)
        pipe.save_pretrained(folder, safe_serialization=True)

    atomic_write(path, write, folder=True)
    print(f"[bench] built {path} ({n / 1e6:,.1f} M transformer parameters) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return path


def param_counts_on_meta() -> dict:
    """Parameter counts of the full-size models (the denoising transformers under the family names), built on the
    meta device (no memory, seconds), counted as their checkpoints do: parameters and persistent buffers. Published:
    FLUX.1 [dev] "a 12 billion parameter rectified flow transformer", Qwen-Image "a 20B MMDiT", SD3.5 Medium "2.5
    billion parameters" (their model cards)."""
    from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel,
                           SD3Transformer2DModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel)

    def count(module) -> int:  # the checkpoint's numbers: parameters and persistent buffers (SD3's 226 M pos_embed)
        buffers = {id(b): b for m in module.modules() for name, b in m._buffers.items()
                   if b is not None and name not in m._non_persistent_buffers_set}
        return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in buffers.values())

    with torch.device("meta"):
        t5 = count(T5EncoderModel(T5Config(**SD35M["t5"])))
        clip_l = count(CLIPTextModelWithProjection(CLIPTextConfig(**SD35M["clip_l"])))
        return {
            "SD3.5-Medium": count(SD3Transformer2DModel(**SD35M["transformer"])),
            "FLUX.1-dev": count(FluxTransformer2DModel(**FLUX_DEV["transformer"])),
            "FLUX.1-schnell": count(FluxTransformer2DModel(**FLUX_SCHNELL["transformer"])),
            "Qwen-Image": count(QwenImageTransformer2DModel(**QWEN_IMAGE["transformer"])),
            "SD3.5-Medium text encoders (CLIP-L, CLIP-G, T5-XXL)":
                clip_l + count(CLIPTextModelWithProjection(CLIPTextConfig(**SD35M["clip_g"]))) + t5,
            "SD3.5-Medium VAE": count(AutoencoderKL(**SD35M["vae"])),
            "FLUX.1 text encoders (CLIP-L, T5-XXL)": count(CLIPTextModel(CLIPTextConfig(**FLUX_DEV["clip_l"]))) + t5,
            "FLUX.1 VAE": count(AutoencoderKL(**FLUX_DEV["vae"])),
            "Qwen-Image text encoder (Qwen2.5-VL-7B)":
                count(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN_IMAGE["text_encoder"]))),
            "Qwen-Image VAE": count(AutoencoderKLQwenImage(**QWEN_IMAGE["vae"])),
        }

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
