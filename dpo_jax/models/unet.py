"""The UNet the trainer uses: construction from a config, remat, and the apply function.

The module is our own `models.unet2d.UNet2DConditionModel` (diffusers'
architecture and PyTorch parameter names). How it computes is set here, apart
from the architecture: `config.model.attention` (`models.attention`) and
`config.model.remat`.

Rematerialisation (`config.model.remat`): the plain UNet keeps every
activation of its forward pass for the backward pass, ~7.5 GiB per SD1.5 pair
in bf16 and far more for SDXL. With a remat policy each down, mid and up block
runs under `flax.linen.remat` (`jax.checkpoint`): the backward pass keeps only
what the policy saves inside a block (nothing, for "blocks") plus the blocks'
inputs and outputs (the skip connections, which the UNet keeps anyway), and
recomputes the rest block by block. That costs one extra policy forward (~8 ->
~10 forward-equivalents per DPO pair). Parameter names are unchanged, so
pretrained weights and checkpoints load either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax.models import attention as attention_lib
from dpo_jax.models.unet2d import REMAT_POLICIES, UNet2DConditionModel

__all__ = [
  "DTYPES",
  "REMAT_POLICIES",
  "UNet2DConditionModel",
  "attention_from_config",
  "init_unet_params",
  "make_unet_apply",
  "parse_dtype",
  "unet_from_config",
  "with_attention",
  "with_remat",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# config.model keys that say how to compute, not what the architecture is.
_COMPUTE_KEYS = ("remat", "attention", "use_memory_efficient_attention")


def parse_dtype(name: str) -> jnp.dtype:
  """Maps a config string to a jnp dtype, with a clear error for typos."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
  return DTYPES[name]


def with_remat(unet: UNet2DConditionModel, policy: str) -> UNet2DConditionModel:
  """The same UNet (same config, dtype and parameter tree) with remat `policy`.

  Args:
    unet: a UNet (e.g. from `models.loader`).
    policy: a key of `REMAT_POLICIES`; "none" rematerialises nothing.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {policy!r}; expected one of {list(REMAT_POLICIES)}.")
  return unet if unet.remat_policy == policy else unet.clone(remat_policy=policy)


def with_attention(unet: UNet2DConditionModel, implementation: str) -> UNet2DConditionModel:
  """The same UNet computing attention with `implementation` (`config.model.attention`)."""
  attention_lib.check_implementation(implementation)
  return unet if unet.attention == implementation else unet.clone(attention=implementation)


def attention_from_config(model_config: Any) -> str:
  """`config.model.attention`; configs saved before it existed may carry the old flag.

  `use_memory_efficient_attention=True` (diffusers' Flax option, our config
  field until the UNet became ours) meant query-chunked attention.
  """
  get = model_config.get
  old = get("use_memory_efficient_attention", None)
  implementation = get("attention", None)
  if old and implementation not in (None, "chunked"):
    raise ValueError(
      f"config.model.use_memory_efficient_attention=True (the old name of attention='chunked') "
      f"contradicts config.model.attention={implementation!r}; drop the old field."
    )
  if implementation is None:
    implementation = "chunked" if old else "xla"
  return attention_lib.check_implementation(implementation)


def unet_from_config(
  model_config: ml_collections.ConfigDict | dict[str, Any],
  compute_dtype: str = "float32",
  remat: str | None = None,
) -> UNet2DConditionModel:
  """Builds the UNet; `compute_dtype` sets activation precision.

  Parameters are always created in float32 (the master copy); `dtype` only
  controls the dtype that the module casts to for its computation.

  Args:
    model_config: diffusers UNet config fields, plus optionally `remat` and
      `attention` (or the old `use_memory_efficient_attention`).
    compute_dtype: activation dtype name.
    remat: remat policy; None = `model_config["remat"]`, or "none" if absent.
  """
  kwargs = dict(model_config)
  config_remat = kwargs.get("remat", "none")
  implementation = attention_from_config(kwargs)
  for key in _COMPUTE_KEYS:
    kwargs.pop(key, None)
  return UNet2DConditionModel.from_config(
    kwargs,
    dtype=parse_dtype(compute_dtype),
    attention=implementation,
    remat_policy=config_remat if remat is None else remat,
  )


def init_unet_params(unet: UNet2DConditionModel, rng: jax.Array) -> dict[str, Any]:
  """Random float32 UNet parameters (a plain nested dict)."""
  return unet.init_weights(rng)


UNetApply = Callable[..., jax.Array]


def make_unet_apply(unet: UNet2DConditionModel) -> UNetApply:
  """Returns `apply(params, noisy [B,C,H,W], t [B], context [B,L,D], added) -> pred`."""

  def apply(params, noisy, timesteps, context, added_cond=None):
    return unet.apply({"params": params}, noisy, timesteps, context, added_cond)

  return apply
