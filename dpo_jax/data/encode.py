"""Raw image/token batches -> the cached-latent batch format the train step reads.

The frozen VAE and text encoder(s) run in their own jitted function, outside
the differentiated step: they are never in the optimizer, never donated, and
a run on a precomputed latent cache simply skips this stage.

Raw per-process batch (from `data.pipeline.PairBatchIterator`):
  pixels_w, pixels_l: float32 [B, R, R, 3] in [-1, 1]
  input_ids:          int32 [B, L] (SD1.5) or [B, 2, L] (SDXL: both tokenizers)
  original_size, crop_top_left: int32 [B, 2]
Output: the batch format documented in `dpo_jax.step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import conditioning
from dpo_jax.models.loader import Pipeline

HOST_ONLY_KEYS = ("example_id", "caption")


def frozen_params(pipeline: Pipeline) -> dict[str, Any]:
  """The encoder parameters the encode stage needs (not the UNet's)."""
  out = {"text_encoder": pipeline.text_encoder_params}
  if pipeline.vae is not None:
    out["vae"] = pipeline.vae_params
  if pipeline.kind == "sdxl":
    out["text_encoder_2"] = pipeline.text_encoder_2_params
  return out


def make_tokenize_fn(pipeline: Pipeline) -> Callable[[Sequence[str]], np.ndarray]:
  """Captions -> int32 ids [B, L] (SD1.5) or [B, 2, L] (SDXL), 77 tokens, truncated."""
  if pipeline.kind == "sd15":
    return lambda captions: conditioning.tokenize(pipeline.tokenizer, captions)

  def tokenize_xl(captions):
    ids = conditioning.tokenize(pipeline.tokenizer, captions)
    ids_2 = conditioning.tokenize(pipeline.tokenizer_2, captions)
    return np.stack([ids, ids_2], axis=1)

  return tokenize_xl


def encode_text(pipeline: Pipeline, params: dict[str, Any], input_ids: jax.Array):
  """-> (context [B, L, D], pooled [B, P] or None)."""
  if pipeline.kind == "sd15":
    return conditioning.encode_prompt_sd15(
      pipeline.text_encoder, params["text_encoder"], input_ids
    ), None
  return conditioning.encode_prompt_sdxl(
    pipeline.text_encoder,
    params["text_encoder"],
    pipeline.text_encoder_2,
    params["text_encoder_2"],
    input_ids[:, 0],
    input_ids[:, 1],
  )


def encode_batch(
  pipeline: Pipeline, params: dict[str, Any], raw: dict[str, jax.Array], resolution: int
) -> dict[str, Any]:
  """Pure: raw batch -> {latents_w, latents_l, context[, added_cond]}.

  Latents are the VAE posterior *mean* (deterministic), so training on raw
  images and on a latent cache sees identical inputs; the SD VAEs' posterior
  std is ~1e-3 of the latent scale, so this drops no meaningful noise. A
  pixel-space pipeline (no VAE) trains on the images themselves, NCHW in [-1, 1].
  """

  def latents(pixels):
    nchw = jnp.transpose(pixels, (0, 3, 1, 2))
    if pipeline.vae is None:
      return nchw
    return conditioning.vae_encode(pipeline.vae, params["vae"], nchw, pipeline.vae_scaling_factor)

  context, pooled = encode_text(pipeline, params, raw["input_ids"])
  out = {"latents_w": latents(raw["pixels_w"]), "latents_l": latents(raw["pixels_l"])}
  out["context"] = context
  if pipeline.kind == "sdxl":
    target = jnp.full_like(raw["original_size"], resolution)
    time_ids = conditioning.add_time_ids(raw["original_size"], raw["crop_top_left"], target)
    out["added_cond"] = conditioning.sdxl_added_cond(pooled, time_ids)
  return out


def empty_prompt_conditioning(pipeline: Pipeline) -> dict[str, np.ndarray]:
  """The empty prompt's conditioning (caption dropout): context [L, D] (+ text_embeds [P])."""
  ids = make_tokenize_fn(pipeline)([""])
  context, pooled = encode_text(pipeline, frozen_params(pipeline), jnp.asarray(ids))
  out = {"context": np.asarray(context[0])}
  if pooled is not None:
    out["text_embeds"] = np.asarray(pooled[0])
  return out


def device_keys(batch: dict[str, Any]) -> dict[str, Any]:
  """Drops host-only fields (ids, strings) before a batch goes to the devices."""
  return {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}
