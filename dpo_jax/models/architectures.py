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
