"""Sampling throughput per scheduler, and full-size SD1.5 FLOPs per image from shapes alone.

1. images/s: `sample.make_sample_fn` (text encoder + guided sampler scan +
   VAE decode, jitted over a mesh of all local devices) per scheduler on
   random-weight pipelines: the tiny SD1.5 folder of
   `dpo_jax.tools.make_tiny_pipeline` (32 px, 16x16x4 latents) and the toy
   pixel-space pipeline (`dpo_jax.toy.base`, 16 px). Per configuration:
   compile seconds, median seconds per batch after a warm-up call, images/s.
2. FLOPs: the published SD1.5 UNet (`models.architectures.SD15_UNET`), VAE and
   CLIP ViT-L text encoder built as Flax modules with `jax.eval_shape`
   parameters (no weights), each sampling stage lowered ahead of time from
   abstract shapes and counted by XLA's cost analysis of the lowered HLO:
   prompt encoding (prompt + empty prompt), one classifier-free-guided
   denoising step (UNet on 2 rows per image), VAE decode. XLA counts a
   `lax.scan` body once whatever its trip count, so the per-image total is
   assembled as encode + steps x step + decode (the whole program lowered
   with one step is reported as a cross-check of that sum).

  python benchmarks/sample_bench.py --out=benchmarks/results/sample_bench.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import results_io  # noqa: E402
from dpo_jax import sample, sampler, sharding  # noqa: E402
from dpo_jax.models import architectures, clip, conditioning, loader  # noqa: E402
from dpo_jax.models import unet as unet_lib  # noqa: E402
from dpo_jax.models import vae as vae_lib  # noqa: E402
from dpo_jax.models.architectures import SD15_UNET  # noqa: E402
from dpo_jax.tools import make_tiny_pipeline  # noqa: E402
from dpo_jax.toy import base as toy_base  # noqa: E402

# The published `vae/config.json` and `text_encoder/config.json` of SD1.5.
SD15_VAE: dict[str, Any] = dict(architectures.SD_VAE, scaling_factor=0.18215)
SD15_TEXT: dict[str, Any] = architectures.CLIP_L_TEXT


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered (unoptimised) program from XLA's HLO cost analysis; NaN if none."""
  try:
    cost = lowered.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    return float(cost.get("flops", float("nan")))
  except Exception:  # noqa: BLE001 - cost analysis is best-effort on some backends.
    return float("nan")


# ----------------------------------------------------------------------------- images/s


def time_sampling(
  pipeline: loader.Pipeline, settings: sample.SampleSettings, iters: int
) -> dict[str, float]:
  """Compile seconds and median seconds per batch of `settings.batch_size` images."""
  mesh = sample.make_mesh(settings.num_devices)
  bs = sample.padded_batch_size(settings.batch_size, settings.batch_size, mesh.size)
  fn = sample.make_sample_fn(pipeline, settings)
  params, frozen = jax.device_put(
    (pipeline.unet_params, conditioning.frozen_params(pipeline)), sharding.replicated(mesh)
  )
  ids = conditioning.make_tokenize_fn(pipeline)(["a red circle at the top left"] * bs)
  noise = sample.initial_noise(range(bs), sample.latent_shape(pipeline))
  t0 = time.perf_counter()
  compiled = fn.lower(params, frozen, ids, noise).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, frozen, ids, noise))  # Warm-up.
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, frozen, ids, noise))
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {
    "images_per_batch": bs,
    "compile_s": compile_s,
    "batch_s_median": med,
    "batch_s_min": float(np.min(times)),
    "images_per_s": bs / med,
  }


def throughput(args) -> list[dict[str, Any]]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folders = {
      "tiny_sd15": make_tiny_pipeline.make_tiny_pipeline("sd15", os.path.join(tmp, "sd15")),
      "toy": toy_base.write_random_pipeline(os.path.join(tmp, "toy")),
    }
    for name, folder in folders.items():
      pipeline = loader.load_pipeline(folder)
      for scheduler in sampler.SCHEDULERS:
        settings = sample.SampleSettings(
          args.steps, args.guidance_scale, args.batch_size, scheduler=scheduler, dtype=args.dtype
        )
        r = time_sampling(pipeline, settings, args.iters)
        r.update(pipeline=name, scheduler=scheduler, steps=args.steps, dtype=args.dtype)
        r["image_size"] = sample.image_size(pipeline)
        print(
          f"{name:9s} {scheduler:5s}: {r['images_per_s']:7.2f} images/s "
          f"({r['images_per_batch']} x {r['image_size']} px, {args.steps} steps, "
          f"{r['batch_s_median']:.3f} s/batch, compile {r['compile_s']:.1f} s)",
          flush=True,
        )
        rows.append(r)
  return rows


# ----------------------------------------------------------------------------- FLOPs


def abstract_sd15(tokenizer_dir: str) -> tuple[loader.Pipeline, Any, Any]:
  """(pipeline with SD1.5 modules and no weights, abstract UNet params, abstract frozen params)."""

  unet = unet_lib.unet_from_config(SD15_UNET)
  vae = vae_lib.AutoencoderKL.from_config(SD15_VAE)
  text = clip.CLIPTextModel.from_config(SD15_TEXT)
  key = jax.random.PRNGKey(0)
  unet_params = jax.eval_shape(unet.init_weights, key)
  frozen = {"text_encoder": text.init_abstract(), "vae": vae.init_abstract()}
  # Any CLIP BPE tokenizer padding to 77 gives the same shapes (FLOPs do not depend on ids).
  tokenizer = make_tiny_pipeline.write_tokenizer_files(tokenizer_dir)
  pipeline = loader.Pipeline(
    kind="sd15",
    unet=unet,
    unet_params=None,
    vae=vae,
    vae_params=None,
    text_encoder=text,
    text_encoder_params=None,
    tokenizer=tokenizer,
    scheduler_config=make_tiny_pipeline.scheduler_config("sd15")[1],
    vae_scaling_factor=SD15_VAE["scaling_factor"],
  )
  return pipeline, unet_params, frozen


def sd15_flops(steps: int, guidance_scale: float) -> dict[str, Any]:
  """FLOPs per image of SD1.5 text-to-image at 512 px, `steps` steps, from shapes only."""
  b = 1
  with tempfile.TemporaryDirectory() as tmp:
    pipe, unet_params, frozen = abstract_sd15(os.path.join(tmp, "tokenizer"))
  side = SD15_UNET["sample_size"]
  ids = jax.ShapeDtypeStruct((b, 77), jnp.int32)
  latents = jax.ShapeDtypeStruct((b, 4, side, side), jnp.float32)
  context = jax.ShapeDtypeStruct((b, 77, SD15_TEXT["hidden_size"]), jnp.float32)
  t0 = time.perf_counter()

  def encode_both(frozen, ids):  # The prompt and the empty prompt, as sample_images does.
    return conditioning.encode_text(pipe, frozen, ids), conditioning.encode_text(
      pipe, frozen, ids[:1]
    )

  def step(params, x, ctx):
    apply_fn = unet_lib.make_unet_apply(pipe.unet)
    denoise = sampler.make_denoiser(apply_fn, params, ctx, ctx, guidance_scale)
    return denoise(x, jnp.int32(500))

  def decode(frozen, x):
    return conditioning.vae_decode(pipe.vae, frozen["vae"], x, pipe.vae_scaling_factor)

  parts = {
    "encode": lowered_flops(jax.jit(encode_both).lower(frozen, ids)),
    "step": lowered_flops(jax.jit(step).lower(unet_params, latents, context)),
    "decode": lowered_flops(jax.jit(decode).lower(frozen, latents)),
  }
  one_step = sample.SampleSettings(1, guidance_scale, b, scheduler="dpmpp")
  whole = jax.jit(functools.partial(sample.sample_images, pipe, one_step))
  whole_1 = lowered_flops(whole.lower(unet_params, frozen, ids, latents))
  total = parts["encode"] + steps * parts["step"] + parts["decode"]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(unet_params))
  return {
    "arch": "sd15",
    "image_size": side * 8,
    "unet_params": n_params,
    "steps": steps,
    "guidance_scale": guidance_scale,
    "unet_rows_per_step": 2 * b if guidance_scale != 1.0 else b,
    "flops_encode": parts["encode"] / b,
    "flops_per_step": parts["step"] / b,
    "flops_decode": parts["decode"] / b,
    "flops_per_image": total / b,
    "flops_whole_program_1_step": whole_1 / b,
    "flops_sum_1_step": (parts["encode"] + parts["step"] + parts["decode"]) / b,
    "flops_source": "lowered HLO cost analysis, abstract shapes (jax.eval_shape), no weights",
    "lower_s": time.perf_counter() - t0,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=20, help="Sampler steps for images/s.")
  ap.add_argument("--batch_size", type=int, default=16, help="Images per compiled call.")
  ap.add_argument("--guidance_scale", type=float, default=7.5)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--flops_steps", type=int, default=50, help="Steps for the SD1.5 FLOPs.")
  ap.add_argument("--out", default="benchmarks/results/sample_bench.json")
  args = ap.parse_args()

  rows = throughput(args)
  flops = sd15_flops(args.flops_steps, args.guidance_scale)
  print(
    f"SD1.5 512 px, {flops['steps']} steps, CFG: {flops['flops_per_image'] / 1e12:.2f} TFLOP/image "
    f"(UNet step {flops['flops_per_step'] / 1e12:.3f} T x {flops['steps']}, "
    f"text {flops['flops_encode'] / 1e9:.1f} G, VAE decode {flops['flops_decode'] / 1e12:.2f} T; "
    f"whole program at 1 step {flops['flops_whole_program_1_step'] / 1e12:.3f} T vs sum "
    f"{flops['flops_sum_1_step'] / 1e12:.3f} T)"
  )
  out = {"versions": {m: __import__(m).__version__ for m in ("jax", "flax")}}
  out.update(throughput=rows, sd15_flops=flops)
  results_io.write_results(out, args.out)


if __name__ == "__main__":
  main()
