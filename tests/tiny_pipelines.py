"""Tiny diffusers editing pipelines with random weights, saved as safetensors folders for tests.

Each has a UNet of about 50k parameters, a one-layer CLIP text or image encoder and the tiny VAE of
``conftest.make_tiny_vae`` (4 latent channels, downsampling factor 2), so two denoising steps on a
32x32 image take milliseconds. The outputs are noise; the tests check plumbing, not picture quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, PaintByExamplePipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

from conftest import make_tiny_vae

HIDDEN_SIZE = 16
MAX_TOKENS = 16


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write a character-level CLIP vocabulary (no merges) into ``folder`` and load a tokenizer from it."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def make_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN_SIZE, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def make_unet(in_channels: int) -> UNet2DConditionModel:
    """A two-level UNet: ``in_channels`` is 8 for InstructPix2Pix and 9 for inpainting."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=HIDDEN_SIZE, attention_head_dim=2,
        norm_num_groups=8,
    ).eval()


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(steps_offset=1)


def pipeline_vae(scaling_factor: float):
    """The pipeline's own VAE; arms replace it, so its weights never reach an output."""
    vae = make_tiny_vae(seed=7)
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def _save_text_pipeline(pipeline_class, folder: Path, scaling_factor: float, unet_in_channels: int,
                        seed: int) -> str:
    """Save a tiny text-conditioned Stable Diffusion pipeline. The UNet's input channels set its kind."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder / "vocab")
    pipeline = pipeline_class(
        vae=pipeline_vae(scaling_factor), text_encoder=make_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=make_unet(unet_in_channels), scheduler=make_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline", safe_serialization=True)
    return str(folder / "pipeline")


def save_ip2p(folder: Path, scaling_factor: float = 0.18215) -> str:
    # 8 input channels: the noisy latent and the latent of the image to edit.
    return _save_text_pipeline(StableDiffusionInstructPix2PixPipeline, folder, scaling_factor, 8, seed=0)


def save_inpaint(folder: Path, scaling_factor: float = 0.18215) -> str:
    # 9 input channels: the noisy latent, the mask and the latent of the masked image.
    return _save_text_pipeline(StableDiffusionInpaintPipeline, folder, scaling_factor, 9, seed=1)


def save_pbe(folder: Path, scaling_factor: float = 0.18215) -> str:
    torch.manual_seed(2)
    # The mapper has (layers + 1) // 5 transformer blocks, so 4 layers give one.
    vision = CLIPVisionConfig(hidden_size=HIDDEN_SIZE, intermediate_size=32, num_hidden_layers=4,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=HIDDEN_SIZE)
    pipeline = PaintByExamplePipeline(
        vae=pipeline_vae(scaling_factor), image_encoder=PaintByExampleImageEncoder(vision).eval(),
        unet=make_unet(9), scheduler=make_scheduler(), safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline", safe_serialization=True)
    return str(folder / "pipeline")
