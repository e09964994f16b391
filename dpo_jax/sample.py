"""Text-to-image sampling from a loaded pipeline with per-image fixed seeds.

`generate(pipeline, unet_params, prompts, seeds)` returns uint8 images. Image i
starts from the noise drawn with `jax.random.PRNGKey(seeds[i])` whatever the
batch it lands in, so two models compared on the same (prompt, seed) lists see
identical starting points, and a run is reproducible image by image.

The reverse process is `sampler.ddim_sample` (one jitted `lax.scan` with
classifier-free guidance), followed by the VAE decoder, or nothing for a
pixel-space pipeline (no VAE). SDXL gets micro-conditioning for an uncropped
image at the generation size, as diffusers' pipeline does by default.

Command line (DDIM only so far):
  python -m dpo_jax.sample --checkpoint=WORKDIR_OR_STEP_DIR --prompts=FILE --output=DIR \
      [--pipeline=DIFFUSERS_DIR] [--num_images_per_prompt=4] [--guidance_scale=7.5] \
      [--num_inference_steps=50] [--seed=0]
writes one PNG per image, `grid.png` (a row per prompt) and `metadata.jsonl`
(file, prompt, seed, model, settings). Image j of every prompt uses seed
`seed + j`, so two models sampled with the same flags see the same noise.
"""

from __future__ import annotations

import dataclasses
import json
import os
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


def read_prompts(path: str) -> list[str]:
  """Prompts from a text file (one per line) or JSONL (`{"prompt": ...}` or `{"caption": ...}`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No prompt file at {path}: expected one prompt per line, or JSONL.")
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if path.endswith(".jsonl"):
        row = json.loads(line)
        text = row.get("prompt", row.get("caption"))
        if not isinstance(text, str):
          raise ValueError(f"{path}:{n}: expected a 'prompt' or 'caption' string field.")
        out.append(text)
      else:
        out.append(line)
  if not out:
    raise ValueError(f"{path} holds no prompts.")
  return out


def grid_image(images: np.ndarray, columns: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one image, `columns` per row, 2 px white gutters."""
  n, h, w, _ = images.shape
  rows = -(-n // columns)
  pad = np.full((rows * columns - n, h, w, 3), 255, np.uint8)
  tiles = np.pad(
    np.concatenate([images, pad]), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255
  )
  tiles = tiles.reshape(rows, columns, h + 2, w + 2, 3)
  return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * (h + 2), columns * (w + 2), 3)


def main(argv: Sequence[str]) -> None:
  """`python -m dpo_jax.sample`: images, a grid and metadata.jsonl for a prompt file."""
  from absl import flags
  from PIL import Image

  from dpo_jax import checkpoint, logs
  from dpo_jax.models import loader

  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  f = flags.FLAGS
  params, model = None, "base"
  pipeline_path = f.pipeline
  if f.checkpoint:
    params, meta = checkpoint.load_params_for_inference(f.checkpoint)
    pipeline_path = pipeline_path or meta["config"].get("pretrained_path", "")
    model = f"{os.path.abspath(f.checkpoint)}@{meta['step']}"
    if not pipeline_path:
      raise ValueError(
        "The checkpoint's run used a random-init UNet (no pretrained_path); pass --pipeline=DIR "
        "with the VAE, text encoder(s), tokenizer(s) and scheduler to sample with."
      )
  if not pipeline_path:
    raise ValueError("Pass --checkpoint=WORKDIR_OR_STEP_DIR and/or --pipeline=DIFFUSERS_DIR.")
  pipeline = loader.load_pipeline(pipeline_path)
  params = pipeline.unet_params if params is None else params
  prompts = read_prompts(f.prompts)
  k = f.num_images_per_prompt
  all_prompts = [p for p in prompts for _ in range(k)]
  seeds = [f.seed + j for _ in prompts for j in range(k)]  # Seed j for image j of every prompt.
  settings = SampleSettings(f.num_inference_steps, f.guidance_scale, f.batch_size)
  images = generate(pipeline, params, all_prompts, seeds, settings)
  os.makedirs(f.output, exist_ok=True)
  with open(os.path.join(f.output, "metadata.jsonl"), "w") as meta_f:
    for i, (img, p, s) in enumerate(zip(images, all_prompts, seeds)):
      name = f"{i // k:05d}_{s}.png"
      Image.fromarray(img).save(os.path.join(f.output, name))
      row = {"file": name, "prompt": p, "seed": s, "model": model, "pipeline": pipeline_path}
      row.update(dataclasses.asdict(settings), scheduler="ddim")
      meta_f.write(json.dumps(row) + "\n")
  Image.fromarray(grid_image(images, k)).save(os.path.join(f.output, "grid.png"))
  print(f"Wrote {len(images)} images, grid.png and metadata.jsonl to {f.output}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("checkpoint", "", "Training workdir, its checkpoints/ or a step folder.")
  flags.DEFINE_string("pipeline", "", "Diffusers folder (default: the checkpoint's base).")
  flags.DEFINE_string("prompts", None, "Prompt file: one per line, or .jsonl.", required=True)
  flags.DEFINE_string("output", None, "Output folder.", required=True)
  flags.DEFINE_integer("num_images_per_prompt", 4, "Images per prompt (seeds seed..seed+n-1).")
  flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance weight.")
  flags.DEFINE_integer("num_inference_steps", 50, "DDIM steps.")
  flags.DEFINE_integer("seed", 0, "First seed.")
  flags.DEFINE_integer("batch_size", 16, "Images per compiled call.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
