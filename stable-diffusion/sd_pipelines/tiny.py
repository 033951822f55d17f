"""A tiny Stable-Diffusion-shaped diffusers pipeline with random weights, written to a folder that -GPath loads like
real weights: for measuring what a run costs and checking it end to end offline, never for image quality.

    python stable-diffusion/sd_pipelines/tiny.py OUT_FOLDER

Its tokenizer knows single characters only (lowercase letters, digits, a few signs), enough to encode any
class-level prompt of the shipped datasets; its UNet works on 8x8 latents (64x64 images)."""
import json
import os
import string
import sys
import tempfile

import torch

CHARACTERS = string.ascii_lowercase + string.digits + "-',."


def write_character_tokenizer(folder):
    """vocab.json and merges.txt of a CLIP tokenizer whose tokens are single characters (no merges)."""
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(CHARACTERS) + [c + "</w>" for c in CHARACTERS]
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as file:
        json.dump({token: i for i, token in enumerate(tokens)}, file)
    with open(merges_path, "w", encoding="utf-8") as file:
        file.write("#version: 0.2\n")
    return vocab_path, merges_path, len(tokens)


def write_tiny_pipeline(folder, seed=0, max_tokens=32):
    """Writes the pipeline into `folder` (created); returns the folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as vocabulary:
        vocab_path, merges_path, vocab_size = write_character_tokenizer(vocabulary)
        tokenizer = CLIPTokenizer(vocab=vocab_path, merges=merges_path, model_max_length=max_tokens)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_tokens, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python stable-diffusion/sd_pipelines/tiny.py OUT_FOLDER")
    print(f"wrote a tiny random-weight pipeline to {write_tiny_pipeline(sys.argv[1])}")
