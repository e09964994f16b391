"""Flax UNet construction from a config, and the apply function the step uses."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)
  from diffusers import FlaxUNet2DConditionModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str) -> jnp.dtype:
  """Maps a config string to a jnp dtype, with a clear error for typos."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
  return DTYPES[name]


def unet_from_config(
  model_config: ml_collections.ConfigDict | dict[str, Any], compute_dtype: str = "float32"
) -> FlaxUNet2DConditionModel:
  """Builds a diffusers Flax UNet; `compute_dtype` sets activation precision.

  Parameters are always created in float32 (the master copy); `dtype` only
  controls the dtype that the module casts to for its computation.
  """
  kwargs = dict(model_config)
  for key in ("block_out_channels", "down_block_types", "up_block_types"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    return FlaxUNet2DConditionModel(dtype=parse_dtype(compute_dtype), **kwargs)


def init_unet_params(unet: FlaxUNet2DConditionModel, rng: jax.Array) -> dict[str, Any]:
  """Random float32 UNet parameters (a plain nested dict)."""
  return flax.core.unfreeze(unet.init_weights(rng))


UNetApply = Callable[..., jax.Array]


def make_unet_apply(unet: FlaxUNet2DConditionModel) -> UNetApply:
  """Returns `apply(params, noisy [B,C,H,W], t [B], context [B,L,D], added) -> pred`."""

  def apply(params, noisy, timesteps, context, added_cond=None):
    out = unet.apply(
      {"params": params}, noisy, timesteps, context, added_cond_kwargs=added_cond, train=False
    )
    return out.sample

  return apply
