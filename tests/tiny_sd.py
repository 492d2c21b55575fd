"""A tiny random-weight Stable-Diffusion-shaped pipeline folder, built from configs (no download): UNet2DConditionModel,
a x8 AutoencoderKL, a 2-layer CLIP text encoder and a character-level CLIP tokenizer. It exercises the latent,
text-conditional path of the loaders and the sampler offline; its images are noise."""
from pathlib import Path

import torch

from benchmarks.architectures import letter_tokenizer


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    path = Path(path)
    tok_dir = path / "_tok"
    tokenizer = letter_tokenizer(tok_dir, 16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, sample_size=32)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    import shutil
    shutil.rmtree(tok_dir)
    return path


def build_tiny_clip(path: Path, seed: int = 0):
    """A tiny random CLIPModel and its processor (character-level tokenizer, 32x32 images), standing in for
    PickScore v1 offline. Returns (model folder, processor folder)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = letter_tokenizer(path, 16)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path / "processor")
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    CLIPModel(config).save_pretrained(path / "model")
    return path / "model", path / "processor"
