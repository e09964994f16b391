"""dpo_jax against the PyTorch reference, side by side: the DPO train step and sampling.

One run builds a random-weight diffusers pipeline in PyTorch, saves it as a
diffusers folder and loads that folder into dpo_jax, so both sides hold the
same UNet config and weights. Then, after warm-up, it alternates:

* the Diffusion-DPO step. PyTorch follows the official trainer's math
  (SalesforceAIResearch/DiffusionDPO `train.py`): winner and loser latents
  noised with the same noise and timestep, policy forward on both in one
  batch, reference forward under `no_grad`, per-sample MSE, loss
  -log sigmoid(-beta/2 ((mse_w - mse_l) - (ref_w - ref_l))), backward,
  global-norm clipping at 1, AdamW. Attention is PyTorch's fused SDPA
  (diffusers' default processor). dpo_jax runs `step.train_step`, jitted with
  the train state donated, on the same config (AdamW, clip 1, beta, dtype).
* sampling: DDIM with classifier-free guidance, text encoding and VAE decode
  included: `diffusers.StableDiffusionPipeline` against `sample.make_sample_fn`.

Shapes: "tiny" (default; the SD-shaped UNet of BRIEF §5: 8.75 M parameters,
blocks 64/128/128, layers_per_block 2, cross-attention dim 128, head dim 8,
77 context tokens, 32x32x4 latents); "sd15" and "sdxl" (the published UNet
configs with random weights, 64x64x4 and 128x128x4 latents: GPU only).
Prints each time and the ratio dpo_jax / PyTorch (< 1: dpo_jax is faster) and
writes JSON {"shapes": {name: {"step": {"pytorch_s", "dpo_jax_s", "ratio"},
"sampling": {...}}}}.

  python benchmarks/vs_pytorch.py --out=benchmarks/results/vs_pytorch_cpu.json
  python benchmarks/vs_pytorch.py --shapes=sd15,sdxl --dtype=bfloat16 --out=... # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import results_io  # noqa: E402
from configs import common  # noqa: E402
from dpo_jax import optim, sample  # noqa: E402
from dpo_jax import step as step_lib  # noqa: E402
from dpo_jax.models import architectures, conditioning, loader  # noqa: E402
from dpo_jax.models import unet as unet_lib  # noqa: E402
from dpo_jax.tools import make_tiny_pipeline as tiny  # noqa: E402

BETA = 5000.0
LR = 1e-5

TINY_UNET: dict[str, Any] = {
  "sample_size": 32,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": (64, 128, 128),
  "layers_per_block": 2,
  "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  "attention_head_dim": 8,
  "cross_attention_dim": 128,
}


def unet_config(shape: str) -> dict[str, Any]:
  if shape == "tiny":
    return dict(TINY_UNET)
  if shape == "sd15":
    return dict(architectures.SD15_UNET)
  if shape == "sdxl":
    return dict(architectures.SDXL_UNET)
  raise ValueError(f"Unknown shape {shape!r}; expected tiny, sd15 or sdxl.")


def write_pipeline(shape: str, output: str, seed: int = 0) -> None:
  """A random-weight SD1.5-structured (SDXL: SDXL) diffusers folder with `shape`'s UNet.

  The VAE is tiny and so are the text encoders (what is timed is dominated by
  the UNet); their widths add up to the UNet's cross-attention dim.
  """
  kind = "sdxl" if shape == "sdxl" else "sd15"
  cfg = unet_config(shape)
  # SDXL's context is both encoders' hidden states concatenated (768 + 1280).
  widths = (768, 1280) if kind == "sdxl" else (cfg["cross_attention_dim"],)
  tiny.write_torch_pipeline(kind, output, seed, unet=cfg, text_widths=widths)


def _median_alternating(
  fns: dict[str, Callable[[], None]], iters: int, warmup: int
) -> dict[str, list[float]]:
  """Calls each fn `warmup` times, then `iters` rounds alternating between them."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def _inputs(shape: str, pairs: int, cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  c, s = cfg["in_channels"], cfg["sample_size"]
  out = {
    "latents_w": rng.standard_normal((pairs, c, s, s), np.float32),
    "latents_l": rng.standard_normal((pairs, c, s, s), np.float32),
    "context": rng.standard_normal((pairs, 77, cfg["cross_attention_dim"]), np.float32),
  }
  if shape == "sdxl":
    out["added_cond"] = {
      "text_embeds": rng.standard_normal((pairs, 1280), np.float32),
      "time_ids": np.tile(np.asarray([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (pairs, 1)),
    }
  return out


def torch_step_fn(folder: str, batch: dict[str, Any], dtype: str) -> Callable[[], None]:
  """The official trainer's DPO step on `folder`'s UNet; returns a closure running one step."""
  import diffusers
  import torch
  import torch.nn.functional as F  # noqa: N812 - PyTorch's convention.

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).to(dev)
  ref = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).to(dev)
  ref.requires_grad_(False)
  ref.to(tdtype)
  unet.train()
  opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=1e-2)
  sched = diffusers.DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
  t = {k: torch.from_numpy(v).to(dev) for k, v in batch.items() if k != "added_cond"}
  added = None
  if "added_cond" in batch:
    added = {k: torch.from_numpy(v).to(dev) for k, v in batch["added_cond"].items()}
    added = {k: torch.cat([v, v]) for k, v in added.items()}
  gen = torch.Generator(device=dev).manual_seed(0)

  def run() -> None:
    x = torch.cat([t["latents_w"], t["latents_l"]])
    n = len(t["latents_w"])
    noise = torch.randn(t["latents_w"].shape, generator=gen, device=dev).repeat(2, 1, 1, 1)
    steps = torch.randint(0, 1000, (n,), generator=gen, device=dev).repeat(2)
    noisy = sched.add_noise(x, noise, steps)
    ctx = t["context"].repeat(2, 1, 1)
    with torch.autocast(dev, dtype=tdtype, enabled=tdtype != torch.float32):
      pred = unet(noisy, steps, ctx, added_cond_kwargs=added).sample
      with torch.no_grad():
        ref_pred = ref(noisy.to(tdtype), steps, ctx.to(tdtype), added_cond_kwargs=added).sample
    mse = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    ref_mse = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    model_diff = mse[:n] - mse[n:]
    ref_diff = ref_mse[:n] - ref_mse[n:]
    loss = -F.logsigmoid(-0.5 * BETA * (model_diff - ref_diff)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev == "cuda":
      torch.cuda.synchronize()

  return run


# Ablations (--ablations): dpo_jax's step as it was before each speed-up, in the same run.
ABLATIONS = {
  "before (xla attention)": "xla",
  "+ chunked flash attention (current default on CPU)": None,
}


def jax_step_fn(
  folder: str,
  batch: dict[str, Any],
  dtype: str,
  attention: str | None = None,
) -> Callable[[], None]:
  """dpo_jax's jitted DPO step (state donated) on `folder`'s UNet; a closure running one step.

  `attention`: `config.model.attention` (None: the config default).
  """
  c = common.get_base_config()
  c.optim.lr, c.optim.warmup_frac, c.optim.clip_norm, c.optim.weight_decay = LR, 0.0, 1.0, 1e-2
  c.beta = BETA
  c.precision.compute_dtype = dtype
  c.precision.ref_dtype = dtype
  c.data.global_batch_size = len(batch["latents_w"])
  unet, params = loader.load_unet(os.path.join(folder, "unet"), dtype=jnp.dtype(dtype))
  unet = unet_lib.with_attention(unet, attention or c.model.attention)
  tx, lr_fn = optim.make_optimizer(c.optim, 1000)
  sched = loader.load_scheduler_config(os.path.join(folder, "scheduler"))
  spec = step_lib.build_step_spec(c, unet_lib.make_unet_apply(unet), tx, lr_fn, None, sched)
  # A copy even where the dtype matches: the state (params) is donated, the reference not.
  ref = jax.tree.map(lambda p: jnp.array(p, dtype=dtype, copy=True), params)
  state = [step_lib.init_train_state(params, tx)]
  jbatch = jax.tree.map(jnp.asarray, batch)
  fn = jax.jit(lambda s, r, b, k: step_lib.train_step(s, r, b, k, spec=spec), donate_argnums=0)
  key = jax.random.PRNGKey(0)

  def run() -> None:
    state[0], metrics = fn(state[0], ref, jbatch, key)
    jax.block_until_ready(metrics)

  return run


def compare_step(
  shape: str, folder: str, pairs: int, dtype: str, iters: int, ablations: bool = False
) -> dict[str, Any]:
  batch = _inputs(shape, pairs, unet_config(shape))
  fns = {
    "pytorch": torch_step_fn(folder, batch, dtype),
    "dpo_jax": jax_step_fn(folder, batch, dtype),
  }
  if ablations:
    for name, attention in ABLATIONS.items():
      if attention is not None:
        fns[name] = jax_step_fn(folder, batch, dtype, attention)
  times = _median_alternating(fns, iters, warmup=2)
  pt, jx = float(np.median(times["pytorch"])), float(np.median(times["dpo_jax"]))
  out = {"pairs": pairs, "pytorch_s": pt, "dpo_jax_s": jx, "ratio": jx / pt, "times": times}
  if ablations:
    out["ablations"] = {
      name: {"dpo_jax_s": float(np.median(times.get(name, times["dpo_jax"])))} for name in ABLATIONS
    }
    for row in out["ablations"].values():
      row["ratio"] = row["dpo_jax_s"] / pt
  return out


def compare_sampling(folder: str, images: int, steps: int, dtype: str, iters: int) -> dict:
  """DDIM `steps` with CFG 7.5, text encoding and VAE decode included, `images` per call."""
  import diffusers
  import torch

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  prompts = [f"a photo of object number {i}" for i in range(images)]
  pt_pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=tdtype).to(dev)
  pt_pipe.scheduler = diffusers.DDIMScheduler.from_config(pt_pipe.scheduler.config)
  pt_pipe.set_progress_bar_config(disable=True)
  pipe = loader.load_pipeline(folder, dtype=jnp.dtype(dtype))
  attention = common.get_base_config().model.attention
  pipe = dataclasses.replace(pipe, unet=unet_lib.with_attention(pipe.unet, attention))
  shape = sample.latent_shape(pipe)
  noise = sample.initial_noise(range(images), shape)
  settings = sample.SampleSettings(
    num_inference_steps=steps, guidance_scale=7.5, scheduler="ddim", dtype=dtype, num_devices=1
  )
  fn = sample.make_sample_fn(pipe, settings)
  frozen = conditioning.frozen_params(pipe)
  ids = jnp.asarray(conditioning.make_tokenize_fn(pipe)(prompts))
  latents = torch.from_numpy(np.asarray(noise)).to(dev, tdtype)

  def run_pt() -> None:
    with torch.no_grad():
      pt_pipe(
        prompts, num_inference_steps=steps, guidance_scale=7.5, latents=latents, output_type="np"
      )
    if dev == "cuda":
      torch.cuda.synchronize()

  def run_jax() -> None:
    jax.block_until_ready(fn(pipe.unet_params, frozen, ids, jnp.asarray(noise)))

  times = _median_alternating({"pytorch": run_pt, "dpo_jax": run_jax}, iters, warmup=1)
  pt, jx = float(np.median(times["pytorch"])), float(np.median(times["dpo_jax"]))
  return {
    "images": images,
    "steps": steps,
    "pytorch_s": pt,
    "dpo_jax_s": jx,
    "ratio": jx / pt,
    "pytorch_images_per_s": images / pt,
    "dpo_jax_images_per_s": images / jx,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="tiny", help="Comma-separated: tiny, sd15, sdxl.")
  p.add_argument("--pairs", type=int, default=4)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--sample_images", type=int, default=4)
  p.add_argument("--sample_steps", type=int, default=50)
  p.add_argument("--sampling", default="tiny", help="Shapes whose sampling is compared too.")
  p.add_argument("--out", default="benchmarks/results/vs_pytorch.json")
  p.add_argument(
    "--ablations", action="store_true", help="Also time dpo_jax as before each speed-up."
  )
  args = p.parse_args()
  import torch

  # Both sides get the CPUs this process may run on (taskset -c 0: one).
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  out: dict[str, Any] = {"beta": BETA, "dtype": args.dtype, "shapes": {}}
  for shape in args.shapes.split(","):
    with tempfile.TemporaryDirectory() as folder:
      write_pipeline(shape, folder)
      row = {
        "step": compare_step(shape, folder, args.pairs, args.dtype, args.iters, args.ablations)
      }
      s = row["step"]
      print(
        f"{shape} DPO step, {args.pairs} pairs, {args.dtype}: PyTorch {s['pytorch_s']:.3f} s, "
        f"dpo_jax {s['dpo_jax_s']:.3f} s, ratio {s['ratio']:.2f}",
        flush=True,
      )
      for name, a in s.get("ablations", {}).items():
        print(f"  dpo_jax {name}: {a['dpo_jax_s']:.3f} s, ratio {a['ratio']:.2f}", flush=True)
      if shape in args.sampling.split(","):
        row["sampling"] = compare_sampling(
          folder, args.sample_images, args.sample_steps, args.dtype, max(2, args.iters // 2)
        )
        s = row["sampling"]
        print(
          f"{shape} sampling, {s['images']} images x {s['steps']} DDIM steps, CFG: PyTorch "
          f"{s['pytorch_images_per_s']:.2f} images/s, dpo_jax {s['dpo_jax_images_per_s']:.2f} "
          f"images/s, time ratio {s['ratio']:.2f}",
          flush=True,
        )
      out["shapes"][shape] = row
  results_io.write_results(out, args.out)


if __name__ == "__main__":
  main()
