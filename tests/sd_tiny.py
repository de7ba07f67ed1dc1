"""A tiny, randomly initialised Stable-Diffusion-format folder, built with diffusers + transformers (test-only).

Shapes: CLIP text model 32-d (2 layers, 77 positions, a 60-token BPE vocabulary written here),
UNet2DConditionModel with 32/64 channels and cross-attention to 32-d tokens, AutoencoderKL with
four 8-channel levels (downsampling 8, as SD), 4 latent channels. The scheduler config is Stable
Diffusion's: scaled_linear betas 0.00085..0.012, steps_offset 1, set_alpha_to_one false, leading spacing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>")]
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000, "timestep_spacing": "leading"}


def write_tokenizer_files(path: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a CLIP BPE tokenizer over lower-case letters and two words."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    vocab += ["".join(pair) for pair in MERGES]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in MERGES) + "\n")
    return path / "vocab.json", path / "merges.txt"


def build_sd_components(tmp: Path) -> dict:
    """The five components, each seeded, in float32."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(tmp / "bpe")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDIMScheduler(**SD_SCHEDULER)}


def build_sd_folder(path: Path) -> Path:
    """Write the tiny model with ``StableDiffusionPipeline.save_pretrained`` into ``path``; returns ``path``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_sd_components(path.parent), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path
