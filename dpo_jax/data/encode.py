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

from dpo_jax.models import conditioning
from dpo_jax.models.loader import Pipeline

HOST_ONLY_KEYS = ("example_id", "caption")


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rpo_pair_embedding(
  text: jax.Array | None, image_w: jax.Array | None, image_l: jax.Array | None
) -> jax.Array:
  """One Diffusion-RPO embedding per pair from frozen-CLIP features ([B, D] each).

  Choices the paper leaves open, made here:
  - image: a pair is embedded by both of its images, unit(e_w) + unit(e_l), so
    the embedding does not depend on which image won;
  - text+image ("cross-modal"): the unit text and unit image embeddings are
    concatenated, so after the step's normalisation cos(i, j) is the mean of
    the text cosine and the image cosine. Text and image are never compared
    with each other, so the text side may be any CLIP text tower (SD's own).
  """
  parts = []
  if text is not None:
    parts.append(_unit(text))
  if image_w is not None:
    parts.append(_unit(_unit(image_w) + _unit(image_l)))
  if not parts:
    raise ValueError("rpo_pair_embedding needs text and/or image features.")
  return jnp.concatenate(parts, axis=-1)


# (params, pixels [B, R, R, 3] in [-1, 1]) -> image features [B, D].
ImageEmbedder = Callable[[Any, jax.Array], jax.Array]

# Raw frozen-CLIP features behind `rpo_embeds`, as the encode stage and the
# latent cache carry them: pooled prompt [B, P], images [B, D] each.
RPO_FEATURE_KEYS = ("rpo_text", "rpo_image_w", "rpo_image_l")


def rpo_feature_keys(embedding: str) -> tuple[str, ...]:
  """The `RPO_FEATURE_KEYS` an `rpo.embedding` ("text" | "image" | "text+image") needs."""
  keys = ("rpo_text",) if "text" in embedding else ()
  return keys + (("rpo_image_w", "rpo_image_l") if "image" in embedding else ())


def with_rpo_embeds(batch: dict[str, Any], embedding: str) -> dict[str, Any]:
  """Replaces the raw RPO features of `batch` by the pair embedding `rpo_embeds`."""
  missing = [k for k in rpo_feature_keys(embedding) if k not in batch]
  if missing:
    raise KeyError(f"rpo.embedding={embedding!r} needs batch features {missing}.")
  out = {k: v for k, v in batch.items() if k not in RPO_FEATURE_KEYS}
  text = batch["rpo_text"] if "text" in embedding else None
  image_w, image_l = (
    (batch["rpo_image_w"], batch["rpo_image_l"]) if "image" in embedding else (None, None)
  )
  out["rpo_embeds"] = rpo_pair_embedding(text, image_w, image_l)
  return out


def encode_batch(
  pipeline: Pipeline,
  params: dict[str, Any],
  raw: dict[str, jax.Array],
  resolution: int,
  rpo_features: Sequence[str] = (),
  image_embedder: ImageEmbedder | None = None,
) -> dict[str, Any]:
  """Pure: raw batch -> {latents_w, latents_l, context[, added_cond][, rpo_*]}.

  Latents are the VAE posterior *mean* (deterministic), so training on raw
  images and on a latent cache sees identical inputs; the SD VAEs' posterior
  std is ~1e-3 of the latent scale, so this drops no meaningful noise. A
  pixel-space pipeline (no VAE) trains on the images themselves, NCHW in [-1, 1].

  rpo_features (a subset of `RPO_FEATURE_KEYS`) adds the frozen features that
  `with_rpo_embeds` turns into Diffusion-RPO's pair embedding: `rpo_text` is
  the pipeline's pooled prompt embedding (`encode_text`), `rpo_image_w/l`
  come from `image_embedder` with its params under `params["rpo_clip"]`.
  """

  def latents(pixels):
    nchw = jnp.transpose(pixels, (0, 3, 1, 2))
    if pipeline.vae is None:
      return nchw
    return conditioning.vae_encode(pipeline.vae, params["vae"], nchw, pipeline.vae_scaling_factor)

  context, pooled = conditioning.encode_text(pipeline, params, raw["input_ids"])
  out = {"latents_w": latents(raw["pixels_w"]), "latents_l": latents(raw["pixels_l"])}
  out["context"] = context
  if pipeline.kind == "sdxl":
    target = jnp.full_like(raw["original_size"], resolution)
    time_ids = conditioning.add_time_ids(raw["original_size"], raw["crop_top_left"], target)
    out["added_cond"] = conditioning.sdxl_added_cond(pooled, time_ids)
  unknown = set(rpo_features) - set(RPO_FEATURE_KEYS)
  if unknown:
    raise ValueError(f"Unknown rpo_features {sorted(unknown)}; expected {RPO_FEATURE_KEYS}.")
  if "rpo_text" in rpo_features:
    out["rpo_text"] = pooled.astype(jnp.float32)
  if "rpo_image_w" in rpo_features or "rpo_image_l" in rpo_features:
    if image_embedder is None:
      raise ValueError("RPO image features need an image embedder (rpo.clip_path).")
    out["rpo_image_w"] = image_embedder(params["rpo_clip"], raw["pixels_w"])
    out["rpo_image_l"] = image_embedder(params["rpo_clip"], raw["pixels_l"])
  return out


def device_keys(batch: dict[str, Any]) -> dict[str, Any]:
  """Drops host-only fields (ids, strings) before a batch goes to the devices."""
  return {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}


def rpo_image_embedder(config: Any) -> tuple[ImageEmbedder, Any]:
  """The frozen CLIP image tower of `config.rpo.clip_path` for RPO's image embeddings.

  Here, not in `sources.py`: the trainer's source and the cache writer both
  need it, and neither imports the other.
  """
  from dpo_jax.models import clip_folder

  if not config.rpo.clip_path:
    raise ValueError(
      f"rpo.embedding={config.rpo.embedding!r} needs rpo.clip_path: a CLIP model folder "
      "(transformers format: config.json + model.safetensors or flax_model.msgpack) whose "
      "image tower embeds the pair images."
    )
  return clip_folder.clip_image_embedder(config.rpo.clip_path)
