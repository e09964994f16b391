"""Published UNet architectures (the `unet/config.json` of the public checkpoints).

Used where the structure is needed without weights: the memory/compute planner
(`dpo_jax.tools.plan`) lowers the full-size train step from these shapes.
"""

from __future__ import annotations

from typing import Any

SD15_UNET: dict[str, Any] = {
  "sample_size": 64,
  "in_channels": 4,
  "out_channels": 4,
  "down_block_types": (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  ),
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  "block_out_channels": (320, 640, 1280, 1280),
  "layers_per_block": 2,
  "attention_head_dim": 8,
  "cross_attention_dim": 768,
}

SDXL_UNET: dict[str, Any] = {
  "sample_size": 128,
  "in_channels": 4,
  "out_channels": 4,
  "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
  "block_out_channels": (320, 640, 1280),
  "layers_per_block": 2,
  "attention_head_dim": (5, 10, 20),
  "transformer_layers_per_block": (1, 2, 10),
  "use_linear_projection": True,
  "cross_attention_dim": 2048,
  "addition_embed_type": "text_time",
  "addition_time_embed_dim": 256,
  "projection_class_embeddings_input_dim": 2816,
}

# kind -> (UNet config, latent side, text tokens, pooled text-embedding width or None)
ARCHITECTURES = {
  "sd15": (SD15_UNET, 64, 77, None),
  "sdxl": (SDXL_UNET, 128, 77, 1280),
}

# The frozen encoders of the public pipelines (`vae/config.json`,
# `text_encoder*/config.json`), for planning the encode stage's memory.
SD_VAE: dict[str, Any] = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",) * 4,
  "up_block_types": ("UpDecoderBlock2D",) * 4,
  "block_out_channels": (128, 256, 512, 512),
  "layers_per_block": 2,
  "latent_channels": 4,
  "norm_num_groups": 32,
  "sample_size": 512,
}

# CLIP ViT-L/14 text tower (SD1.5's text encoder, SDXL's first).
CLIP_L_TEXT: dict[str, Any] = {
  "vocab_size": 49408,
  "hidden_size": 768,
  "intermediate_size": 3072,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "projection_dim": 768,
}

# OpenCLIP ViT-bigG/14 text tower with projection (SDXL's text_encoder_2).
CLIP_BIGG_TEXT: dict[str, Any] = {
  "vocab_size": 49408,
  "hidden_size": 1280,
  "intermediate_size": 5120,
  "num_hidden_layers": 32,
  "num_attention_heads": 20,
  "max_position_embeddings": 77,
  "hidden_act": "gelu",
  "projection_dim": 1280,
}

# kind -> (VAE, text encoder, text_encoder_2 or None)
ENCODERS = {
  "sd15": (SD_VAE, CLIP_L_TEXT, None),
  "sdxl": (dict(SD_VAE, sample_size=1024), CLIP_L_TEXT, CLIP_BIGG_TEXT),
}
