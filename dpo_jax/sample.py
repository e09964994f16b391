"""Text-to-image sampling from a loaded pipeline with per-image fixed seeds.

`generate(pipeline, unet_params, prompts, seeds)` returns uint8 images. Image i
starts from the noise drawn with `jax.random.PRNGKey(seeds[i])` whatever the
batch it lands in, so two models compared on the same (prompt, seed) lists see
identical starting points, and a run is reproducible image by image.

The reverse process is `sampler.ddim_sample` (one jitted `lax.scan` with
classifier-free guidance), followed by the VAE decoder, or nothing for a
pixel-space pipeline (no VAE). SDXL gets micro-conditioning for an uncropped
image at the generation size, as diffusers' pipeline does by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import sampler
from dpo_jax.data import encode
from dpo_jax.models import conditioning
from dpo_jax.models import unet as unet_lib
from dpo_jax.models.loader import Pipeline

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How images are drawn.

  Attributes:
    num_inference_steps: DDIM steps.
    guidance_scale: classifier-free guidance weight (1 = no guidance, one UNet
      call per step).
    batch_size: most images per compiled call; the last batch is padded by
      repeating rows (the padding is dropped, never returned).
  """

  num_inference_steps: int = 50
  guidance_scale: float = 7.5
  batch_size: int = 64


def latent_shape(pipeline: Pipeline) -> tuple[int, int, int]:
  """(C, h, w) of the UNet's input: latents, or pixels without a VAE."""
  cfg = pipeline.unet
  return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def image_size(pipeline: Pipeline) -> int:
  """Side of the generated images in pixels."""
  size = pipeline.unet.sample_size
  if pipeline.vae is None:
    return size
  return size * 2 ** (len(pipeline.vae.block_out_channels) - 1)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
  """float32 [N, *shape]: row i is N(0, 1) from `PRNGKey(seeds[i])` (batch independent)."""
  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys))


def to_uint8(images: jax.Array) -> jax.Array:
  """[B, 3, H, W] in ~[-1, 1] -> uint8 [B, H, W, 3] (clipped, rounded)."""
  x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  return jnp.round(jnp.transpose(x, (0, 2, 3, 1))).astype(jnp.uint8)


def make_sample_fn(
  pipeline: Pipeline, settings: SampleSettings
) -> Callable[[Params, Params, np.ndarray, np.ndarray], jax.Array]:
  """Jitted `(unet_params, frozen, input_ids, noise) -> uint8 [B, H, W, 3]`.

  `frozen` is `data.encode.frozen_params(pipeline)` (text encoder(s), VAE);
  `input_ids` come from `data.encode.make_tokenize_fn(pipeline)`.
  """
  apply_fn = unet_lib.make_unet_apply(pipeline.unet)
  scheduler, state = sampler.make_ddim(pipeline.scheduler_config, settings.num_inference_steps)
  tokenize = encode.make_tokenize_fn(pipeline)
  uncond_ids = jnp.asarray(tokenize([""]))
  size = image_size(pipeline)

  def run(unet_params, frozen, input_ids, noise):
    b = noise.shape[0]
    context, pooled = encode.encode_text(pipeline, frozen, input_ids)
    u_ctx, u_pooled = encode.encode_text(pipeline, frozen, uncond_ids)
    u_ctx = jnp.broadcast_to(u_ctx, context.shape)
    added = uncond_added = None
    if pipeline.kind == "sdxl":
      time_ids = conditioning.add_time_ids((size, size), (0, 0), (size, size))
      added = conditioning.sdxl_added_cond(pooled, time_ids)
      u_pooled = jnp.broadcast_to(u_pooled, pooled.shape)
      uncond_added = conditioning.sdxl_added_cond(u_pooled, time_ids)
    x0 = sampler.ddim_sample(
      apply_fn,
      unet_params,
      scheduler,
      state,
      noise,
      context,
      u_ctx,
      settings.guidance_scale,
      added,
      uncond_added,
    )
    if pipeline.vae is not None:
      x0 = conditioning.vae_decode(pipeline.vae, frozen["vae"], x0, pipeline.vae_scaling_factor)
    assert x0.shape[0] == b
    return to_uint8(x0)

  return jax.jit(run)


def generate(
  pipeline: Pipeline,
  unet_params: Params,
  prompts: Sequence[str],
  seeds: Sequence[int],
  settings: SampleSettings = SampleSettings(),
  *,
  sample_fn: Callable | None = None,
  progress: Callable[[int], None] | None = None,
) -> np.ndarray:
  """Images for `prompts[i]` from seed `seeds[i]`: uint8 [N, H, W, 3].

  Args:
    pipeline: the loaded pipeline (tokenizer, encoders, VAE, scheduler).
    unet_params: the UNet parameters to sample with (base or fine-tuned).
    prompts, seeds: equal-length lists; one image per entry.
    settings: steps, guidance, batch size.
    sample_fn: a `make_sample_fn(pipeline, settings)` to reuse (saves a compile
      when several models are sampled with the same settings).
    progress: called with the number of images finished after each batch.
  """
  if len(prompts) != len(seeds):
    raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; need one seed per image.")
  fn = sample_fn or make_sample_fn(pipeline, settings)
  tokenize = encode.make_tokenize_fn(pipeline)
  frozen = encode.frozen_params(pipeline)
  n = len(prompts)
  bs = min(settings.batch_size, max(n, 1))  # No padding beyond the request.
  shape = latent_shape(pipeline)
  out = []
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    padded = np.resize(idx, bs)  # Repeats rows to a full batch: one compiled shape.
    ids = tokenize([prompts[i] for i in padded])
    noise = initial_noise([seeds[i] for i in padded], shape)
    images = np.asarray(fn(unet_params, frozen, ids, noise))
    out.append(images[: len(idx)])
    if progress is not None:
      progress(len(idx))
  return np.concatenate(out) if out else np.zeros((0, *(image_size(pipeline),) * 2, 3), np.uint8)
