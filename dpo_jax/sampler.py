"""Jitted DDIM sampling with classifier-free guidance (the core of `dpo_jax.sample`).

The reverse process runs as one `lax.scan` over the scheduler's timesteps, so a
whole batch of images is a single compiled program that can be sharded over
the batch like the train step. The per-step update is diffusers' own Flax DDIM
`step` (epsilon and v-prediction), so sampling follows the same conventions as
diffusers pipelines.
"""

from __future__ import annotations

import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp

with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)
  from diffusers import FlaxDDIMScheduler

UNetApply = Any


def make_ddim(scheduler_config: dict[str, Any], num_inference_steps: int):
  """(scheduler, state) for DDIM with the training schedule's betas.

  `clip_sample` is off unless the config sets it: latents of real VAEs are not
  bounded by 1, and for pixel-space models the caller clips the final image.
  `set_alpha_to_one` follows diffusers' SD pipelines (final step to abar = 1).
  """
  cfg = {"clip_sample": False, "set_alpha_to_one": False, **dict(scheduler_config)}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    scheduler = FlaxDDIMScheduler.from_config(cfg)
  state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps)
  return scheduler, state


def guided_prediction(
  apply_fn: UNetApply,
  params: Any,
  x: chex.Array,
  t: chex.Array,
  context: chex.Array,
  uncond_context: chex.Array,
  guidance_scale: float,
  added_cond: dict[str, chex.Array] | None = None,
  uncond_added: dict[str, chex.Array] | None = None,
) -> chex.Array:
  """pred_uncond + w * (pred_cond - pred_uncond), one UNet call on 2B rows.

  Conditional and unconditional rows are interleaved (c0, u0, c1, u1, ...) so
  each device keeps its own images when the batch is sharded.
  """
  b = x.shape[0]

  def inter(c, u):
    return jnp.stack([c, u], axis=1).reshape((2 * b,) + c.shape[1:])

  added = None
  if added_cond is not None:
    added = jax.tree.map(inter, added_cond, uncond_added)
  tt = jnp.broadcast_to(t, (2 * b,))
  pred = apply_fn(params, inter(x, x), tt, inter(context, uncond_context), added)
  pred = pred.reshape((b, 2) + pred.shape[1:])
  cond, uncond = pred[:, 0], pred[:, 1]
  return uncond + guidance_scale * (cond - uncond)


def ddim_sample(
  apply_fn: UNetApply,
  params: Any,
  scheduler: FlaxDDIMScheduler,
  state: Any,
  noise: chex.Array,
  context: chex.Array,
  uncond_context: chex.Array,
  guidance_scale: float,
  added_cond: dict[str, chex.Array] | None = None,
  uncond_added: dict[str, chex.Array] | None = None,
) -> chex.Array:
  """Deterministic DDIM (eta = 0) from `noise` [B, C, H, W] to x_0 [B, C, H, W].

  Same `noise` -> same image: comparisons between two models on the same
  prompts and seeds see identical starting points.
  """

  def body(x, t):
    if guidance_scale == 1.0:
      pred = apply_fn(params, x, jnp.broadcast_to(t, (x.shape[0],)), context, added_cond)
    else:
      pred = guided_prediction(
        apply_fn, params, x, t, context, uncond_context, guidance_scale, added_cond, uncond_added
      )
    x = scheduler.step(state, pred.astype(jnp.float32), t, x, return_dict=False)[0]
    return x, None

  # Scaling of the initial noise is 1 for DDPM-family schedulers.
  x, _ = jax.lax.scan(body, noise.astype(jnp.float32), state.timesteps.astype(jnp.int32))
  return x
