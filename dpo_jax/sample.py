"""Text-to-image sampling from a loaded pipeline with per-image fixed seeds.

`generate(pipeline, unet_params, prompts, seeds)` returns uint8 images. Image i
starts from the noise drawn with `jax.random.PRNGKey(seeds[i])` whatever the
batch it lands in and however many devices run it, so two models compared on
the same (prompt, seed) lists see identical starting points, and a run is
reproducible image by image.

The reverse process is one of `sampler.SCHEDULERS` (ddim, euler, dpmpp: a
jitted `lax.scan` with classifier-free guidance), followed by the VAE decoder,
or nothing for a pixel-space pipeline (no VAE). SDXL gets micro-conditioning
for an uncropped image at the generation size, as diffusers' pipeline does by
default, and zeros as the unconditional input (`force_zeros_for_empty_prompt`,
see `zero_negative_conditioning`). The jitted program runs over a device mesh
with prompts and noise split over every axis: by default the local devices
with all parameters replicated; given the trainer's ("data", "fsdp") mesh
(in-training sampling, any number of processes), the UNet parameters keep
their FSDP sharding and every process gets the whole batch of images back.

Command line:
  python -m dpo_jax.sample --checkpoint=WORKDIR_OR_STEP_DIR --prompts=FILE --output=DIR \
      [--pipeline=DIFFUSERS_DIR] [--num_images_per_prompt=4] [--guidance_scale=7.5] \
      [--num_inference_steps=50] [--scheduler=ddim|euler|dpmpp] [--dtype=float32|bfloat16] \
      [--mesh=0] [--batch_size=16] [--seed=0]
writes one PNG per image, `grid.png` (a row per prompt) and `metadata.jsonl`
(file, prompt, seed, model, settings). Image j of every prompt uses seed
`seed + j`, so two models sampled with the same flags see the same noise.
A diffusers folder given as --checkpoint is sampled as --pipeline; mistakes
in the flags print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from dpo_jax import distributed, sampler, sharding
from dpo_jax import prompts as prompts_lib
from dpo_jax.models import conditioning
from dpo_jax.models import unet as unet_lib
from dpo_jax.models.loader import Pipeline

Params = dict[str, Any]
OUTPUTS = ("uint8", "float")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How images are drawn.

  Attributes:
    num_inference_steps: sampler steps.
    guidance_scale: classifier-free guidance weight (1 = no guidance, one UNet
      call per step).
    batch_size: most images per compiled call, rounded up to a multiple of the
      device count; the last batch is padded to the same size by repeating rows
      (the padding is dropped, never returned).
    scheduler: "ddim", "euler" or "dpmpp" (`sampler.SCHEDULERS`).
    dtype: compute dtype of the UNet, VAE and text encoder(s): "float32" or
      "bfloat16" (the sampler's own arithmetic stays float32).
    num_devices: devices of the batch mesh (0 = all local devices). Images do
      not depend on it beyond floating-point noise.
  """

  num_inference_steps: int = 50
  guidance_scale: float = 7.5
  batch_size: int = 64
  scheduler: str = "ddim"
  dtype: str = "float32"
  num_devices: int = 0


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


def to_unit_float(images: jax.Array) -> jax.Array:
  """[B, 3, H, W] in ~[-1, 1] -> float32 [B, H, W, 3] in [0, 1] (diffusers' output_type="np")."""
  x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
  return jnp.transpose(x, (0, 2, 3, 1))


def make_mesh(num_devices: int = 0) -> Mesh:
  """("data", "fsdp") = (n, 1) mesh over the first `num_devices` local devices (0 = all)."""
  devices = jax.local_devices()
  n = num_devices or len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"Asked for a mesh of {n} devices; {len(devices)} local devices exist.")
  return sharding.make_mesh(n, 1, devices=devices[:n])


def unet_shardings(unet_params: Params, mesh: Mesh) -> Any:
  """The UNet params' own shardings where they already live on `mesh`; else replicated."""

  def leaf(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) and s.mesh == mesh else sharding.replicated(mesh)

  return jax.tree.map(leaf, unet_params)


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def with_compute_dtype(pipeline: Pipeline, dtype: str) -> Pipeline:
  """The pipeline with its UNet, VAE and text encoder(s) computing in `dtype` (params unchanged)."""
  d = unet_lib.parse_dtype(dtype)
  modules = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
  modules["text_encoder_2"] = pipeline.text_encoder_2
  changed = {k: m.clone(dtype=d) for k, m in modules.items() if m is not None and m.dtype != d}
  return dataclasses.replace(pipeline, **changed) if changed else pipeline


def zero_negative_conditioning(pipeline: Pipeline) -> bool:
  """Whether the unconditional branch is zeros rather than the encoded "" prompt.

  diffusers' SDXL pipelines do this (`force_zeros_for_empty_prompt`, True
  unless the folder's `model_index.json` sets it false, as the SDXL refiner
  does) when no negative prompt is given, which is always the case here. Its
  SD1.5 pipeline has no such option and encodes "". Training's caption dropout
  is not affected: it uses the encoded "" like the official trainers.
  """
  if pipeline.kind != "sdxl":
    return False
  index = os.path.join(pipeline.path, "model_index.json")
  if not pipeline.path or not os.path.isfile(index):
    return True  # StableDiffusionXLPipeline's default.
  with open(index) as f:
    return bool(json.load(f).get("force_zeros_for_empty_prompt", True))


def sample_images(
  pipeline: Pipeline,
  settings: SampleSettings,
  unet_params: Params,
  frozen: Params,
  input_ids: jax.Array,
  noise: jax.Array,
) -> jax.Array:
  """Pure (jittable): token ids [B, L] (SDXL [B, 2, L]) and noise [B, C, h, w] -> images.

  The unconditional branch of classifier-free guidance is the empty prompt,
  or zeros for SDXL (`zero_negative_conditioning`), as in diffusers' pipelines.
  Returns the decoded images [B, 3, H, W], roughly in [-1, 1] and unclipped
  (for a pixel-space pipeline, x_0 itself).
  """
  pipe = with_compute_dtype(pipeline, settings.dtype)
  dtype = unet_lib.parse_dtype(settings.dtype)
  # Cast once here, not per step inside the loop (what the trainer does for bf16 too).
  unet_params = jax.tree.map(lambda p: p.astype(dtype), unet_params)
  loop = sampler.make_sampler(
    settings.scheduler, pipe.scheduler_config, settings.num_inference_steps
  )
  context, pooled = conditioning.encode_text(pipe, frozen, input_ids)
  if zero_negative_conditioning(pipe):
    u_ctx, u_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
  else:
    uncond_ids = jnp.asarray(conditioning.make_tokenize_fn(pipe)([""]))
    u_ctx, u_pooled = conditioning.encode_text(pipe, frozen, uncond_ids)
  u_ctx = jnp.broadcast_to(u_ctx, context.shape)
  added = uncond_added = None
  if pipe.kind == "sdxl":
    size = image_size(pipe)
    time_ids = conditioning.add_time_ids((size, size), (0, 0), (size, size))
    added = conditioning.sdxl_added_cond(pooled, time_ids)
    u_pooled = jnp.broadcast_to(u_pooled, pooled.shape)
    uncond_added = conditioning.sdxl_added_cond(u_pooled, time_ids)
  denoise = sampler.make_denoiser(
    unet_lib.make_unet_apply(pipe.unet),
    unet_params,
    context,
    u_ctx,
    settings.guidance_scale,
    added,
    uncond_added,
  )
  x0 = loop(denoise, noise)
  if pipe.vae is None:
    return x0
  return conditioning.vae_decode(pipe.vae, frozen["vae"], x0, pipe.vae_scaling_factor)


def make_sample_fn(
  pipeline: Pipeline,
  settings: SampleSettings,
  output: str = "uint8",
  *,
  mesh: Mesh | None = None,
  unet_sharding: Any = None,
) -> Callable[[Params, Params, jax.Array, jax.Array], jax.Array]:
  """Jitted `(unet_params, frozen, input_ids, noise) -> images [B, H, W, 3]` over a mesh.

  `frozen` is `data.conditioning.frozen_params(pipeline)` (text encoder(s), VAE);
  `input_ids` come from `data.conditioning.make_tokenize_fn(pipeline)`. The batch
  (ids, noise, images) is split over every axis of `mesh` (default
  `make_mesh(settings.num_devices)`), so B must be a multiple of its size.
  The UNet params are placed by `unet_sharding` (default replicated; e.g.
  `unet_shardings(params, trainer_mesh)` keeps FSDP shards), the frozen
  encoders replicated. `output` "uint8" gives uint8 images, "float" float32
  in [0, 1] (`to_unit_float`).
  """
  if output not in OUTPUTS:
    raise ValueError(f"Unknown output {output!r}; expected one of {OUTPUTS}.")
  if settings.scheduler not in sampler.SCHEDULERS:
    raise ValueError(f"Unknown scheduler {settings.scheduler!r}; expected {sampler.SCHEDULERS}.")
  mesh = mesh or make_mesh(settings.num_devices)
  repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  finish = to_uint8 if output == "uint8" else to_unit_float

  def run(unet_params, frozen, input_ids, noise):
    return finish(sample_images(pipeline, settings, unet_params, frozen, input_ids, noise))

  in_shardings = (unet_sharding or repl, repl, batch, batch)
  return jax.jit(run, in_shardings=in_shardings, out_shardings=batch)


def padded_batch_size(n: int, batch_size: int, num_devices: int) -> int:
  """Images per compiled call: min(batch_size, n), rounded up to a multiple of num_devices."""
  bs = min(batch_size, max(n, 1))
  return -(-bs // num_devices) * num_devices


def generate(
  pipeline: Pipeline,
  unet_params: Params,
  prompts: Sequence[str],
  seeds: Sequence[int],
  settings: SampleSettings = SampleSettings(),
  *,
  mesh: Mesh | None = None,
  sample_fn: Callable | None = None,
  frozen: Params | None = None,
  progress: Callable[[int], None] | None = None,
) -> np.ndarray:
  """Images for `prompts[i]` from seed `seeds[i]`: uint8 [N, H, W, 3].

  Args:
    pipeline: the loaded pipeline (tokenizer, encoders, VAE, scheduler).
    unet_params: the UNet parameters to sample with (base or fine-tuned).
      Arrays already sharded over `mesh` stay as they are.
    prompts, seeds: equal-length lists; one image per entry.
    settings: scheduler, steps, guidance, dtype, batch size, devices.
    mesh: the devices to run on (default: `make_mesh(settings.num_devices)`).
      With several processes every process calls `generate` with the same
      arguments (as in training) and gets all N images.
    sample_fn: a `make_sample_fn(pipeline, settings, mesh=mesh, ...)` to reuse
      (saves a compile when several models are sampled with the same
      settings); with `output="float"` the result is float32 in [0, 1].
    frozen: `data.conditioning.frozen_params(pipeline)` already replicated over the
      mesh, to skip re-sending it on every call.
    progress: called with the number of images finished after each batch.
  """
  if len(prompts) != len(seeds):
    raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; need one seed per image.")
  mesh = mesh or make_mesh(settings.num_devices)
  placement = unet_shardings(unet_params, mesh)
  fn = sample_fn or make_sample_fn(pipeline, settings, mesh=mesh, unet_sharding=placement)
  # Placed once per call, not re-sent with every batch.
  unet_params = jax.device_put(unet_params, placement)
  if frozen is None:
    frozen = jax.device_put(conditioning.frozen_params(pipeline), sharding.replicated(mesh))
  batch_sh = sharding.batch_sharding(mesh)
  tokenize = conditioning.make_tokenize_fn(pipeline)
  n = len(prompts)
  bs = padded_batch_size(n, settings.batch_size, mesh.size)
  shape = latent_shape(pipeline)
  out = []
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    padded = np.resize(idx, bs)  # Repeats rows to a full batch: one compiled shape.
    # Every process builds the same global batch; each places its own shards.
    ids, noise = (
      jax.make_array_from_callback(x.shape, batch_sh, lambda i, x=x: x[i])
      for x in (
        tokenize([prompts[i] for i in padded]),
        initial_noise([seeds[i] for i in padded], shape),
      )
    )
    if start == 0 and jax.process_count() > 1:
      # Compiled here (a cache hit after the first call), then every process
      # starts the sampler together (see `distributed.barrier`).
      fn = fn.lower(unet_params, frozen, ids, noise).compile()
      distributed.barrier("dpo_jax_generate")
    images = _to_host(fn(unet_params, frozen, ids, noise))
    out.append(images[: len(idx)])
    if progress is not None:
      progress(len(idx))
  return np.concatenate(out) if out else np.zeros((0, *(image_size(pipeline),) * 2, 3), np.uint8)


def prompt_seed_grid(
  prompts: Sequence[str], images_per_prompt: int, seed: int
) -> tuple[list[str], list[int]]:
  """Each prompt repeated `images_per_prompt` times; image j of every prompt gets `seed + j`.

  So two models (or two checkpoints) sampled with the same settings see the
  same initial noise for the same (prompt, j).
  """
  k = images_per_prompt
  return [p for p in prompts for _ in range(k)], [seed + j for _ in prompts for j in range(k)]


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


class UsageError(ValueError):
  """A command-line mistake: `cli_main` prints it as one line, exit status 2."""


def _is_pipeline_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "model_index.json"))


def main(argv: Sequence[str]) -> None:
  """`python -m dpo_jax.sample`: images, a grid and metadata.jsonl for a prompt file."""
  from absl import flags, logging
  from PIL import Image

  from dpo_jax import checkpoint, logs, lora
  from dpo_jax.models import loader

  if len(argv) > 1:
    raise UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  f = flags.FLAGS
  params, model = None, "base"
  pipeline_path, checkpoint_path = f.pipeline, f.checkpoint
  if checkpoint_path and _is_pipeline_folder(checkpoint_path):
    # A diffusers folder is not a training checkpoint, but what to do is unambiguous:
    # sample its own UNet, as --pipeline would.
    if pipeline_path and os.path.abspath(pipeline_path) != os.path.abspath(checkpoint_path):
      raise UsageError(
        f"--checkpoint={checkpoint_path} is a diffusers pipeline folder (model_index.json), not "
        "a training checkpoint: pass it as --pipeline, or a training workdir as --checkpoint."
      )
    logging.warning(
      "--checkpoint=%s is a diffusers pipeline folder; sampling it as --pipeline.", checkpoint_path
    )
    pipeline_path, checkpoint_path = checkpoint_path, ""
  if checkpoint_path:
    params, meta = checkpoint.load_params_for_inference(checkpoint_path)
    pipeline_path = pipeline_path or meta["config"].get("pretrained_path", "")
    model = f"{os.path.abspath(checkpoint_path)}@{meta['step']}"
    if not pipeline_path:
      raise UsageError(
        "The checkpoint's run used a random-init UNet (no pretrained_path); pass --pipeline=DIR "
        "with the VAE, text encoder(s), tokenizer(s) and scheduler to sample with."
      )
  if not pipeline_path:
    raise UsageError("Pass --checkpoint=WORKDIR_OR_STEP_DIR and/or --pipeline=DIFFUSERS_DIR.")
  run_config = meta["config"] if checkpoint_path else {}
  # A LoRA run's checkpoint holds adapters only: they are merged into the base UNet.
  lora_scale = lora.scale(run_config)
  # The base UNet's weights are read only when they are sampled or merged into.
  variant = (
    run_config.get("pretrained_variant", "")
    if f.pretrained_variant is None
    else f.pretrained_variant
  )
  pipeline = loader.load_pipeline(
    pipeline_path, variant=variant or None, unet_weights=params is None or bool(lora_scale)
  )
  if params is None:
    params = pipeline.unet_params
  else:
    params = lora.full_unet(run_config, params, pipeline.unet_params)
  prompts = prompts_lib.load_prompts(f.prompts)
  k = f.num_images_per_prompt
  all_prompts, seeds = prompt_seed_grid(prompts, k, f.seed)
  settings = SampleSettings(
    num_inference_steps=f.num_inference_steps,
    guidance_scale=f.guidance_scale,
    batch_size=f.batch_size,
    scheduler=f.scheduler,
    dtype=f.dtype,
    num_devices=f.mesh,
  )
  images = generate(pipeline, params, all_prompts, seeds, settings)
  os.makedirs(f.output, exist_ok=True)
  with open(os.path.join(f.output, "metadata.jsonl"), "w") as meta_f:
    for i, (img, p, s) in enumerate(zip(images, all_prompts, seeds)):
      name = f"{i // k:05d}_{s}.png"
      Image.fromarray(img).save(os.path.join(f.output, name))
      row = {"file": name, "prompt": p, "seed": s, "model": model, "pipeline": pipeline_path}
      row.update(dataclasses.asdict(settings))
      meta_f.write(json.dumps(row) + "\n")
  Image.fromarray(grid_image(images, k)).save(os.path.join(f.output, "grid.png"))
  print(f"Wrote {len(images)} images, grid.png and metadata.jsonl to {f.output}")


def cli_main(argv: Sequence[str]) -> None:
  """`main`, with user errors (`UsageError`, a missing file) as one line on stderr, exit 2."""
  try:
    main(argv)
  except (UsageError, FileNotFoundError) as e:
    print(f"dpo_jax.sample: error: {e}", file=sys.stderr)
    sys.exit(2)


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("checkpoint", "", "Training workdir, its checkpoints/ or a step folder.")
  flags.DEFINE_string("pipeline", "", "Diffusers folder (default: the checkpoint's base).")
  flags.DEFINE_string(
    "pretrained_variant",
    None,
    "Weights variant of the pipeline's files, e.g. fp16 ('' = the plain files; default: the "
    "checkpoint's config.pretrained_variant, else '').",
  )
  flags.DEFINE_string(
    "prompts",
    None,
    "Prompt file (one per line, or .jsonl), 'builtin', or 'pickapic:DIR[:SPLIT]'.",
    required=True,
  )
  flags.DEFINE_string("output", None, "Output folder.", required=True)
  flags.DEFINE_integer("num_images_per_prompt", 4, "Images per prompt (seeds seed..seed+n-1).")
  flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance weight.")
  flags.DEFINE_integer("num_inference_steps", 50, "Sampler steps.")
  flags.DEFINE_enum("scheduler", "ddim", list(sampler.SCHEDULERS), "Sampler (diffusers semantics).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "UNet/VAE/text-encoder compute.")
  flags.DEFINE_integer("mesh", 0, "Devices to split each batch over (0 = all local devices).")
  flags.DEFINE_integer("seed", 0, "First seed.")
  flags.DEFINE_integer(
    "batch_size", 16, "Images per compiled call (rounded up to a multiple of the devices)."
  )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(cli_main)
