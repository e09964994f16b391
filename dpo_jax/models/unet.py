"""Flax UNet construction from a config, and the apply function the step uses.

Rematerialisation (`config.model.remat`): the stock diffusers UNet keeps every
activation of its forward pass for the backward pass, ~7.5 GiB per SD1.5 pair
in bf16 and far more for SDXL. `RematUNet` is the same UNet with each down,
mid and up block under `flax.linen.remat` (`jax.checkpoint`): the backward
pass keeps only what the policy saves inside a block (nothing, for "blocks")
plus the blocks' inputs and outputs (the skip connections, which the UNet
keeps anyway), and recomputes the rest block by block. That costs one extra
policy forward (~8 -> ~10 forward-equivalents per DPO pair). Parameter names
are unchanged, so pretrained weights and checkpoints load either way.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)
  from diffusers import FlaxUNet2DConditionModel
  from diffusers.configuration_utils import flax_register_to_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# config.model.remat -> what a rematerialised block keeps for the backward pass
# (a `jax.checkpoint` policy); "none" builds the stock UNet.
#   blocks: nothing (recompute the block's whole forward; least memory).
#   blocks_save_dots: the outputs of weight matmuls (Dense layers: attention
#     projections, feed-forwards), recomputing convolutions, norms and the
#     attention itself; between "none" and "blocks" in memory and time.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "none": None,
  "blocks": jax.checkpoint_policies.nothing_saveable,
  "blocks_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The attributes FlaxUNet2DConditionModel.setup assigns its blocks to.
_BLOCK_ATTRS = ("down_blocks", "mid_block", "up_blocks")


def parse_dtype(name: str) -> jnp.dtype:
  """Maps a config string to a jnp dtype, with a clear error for typos."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
  return DTYPES[name]


@functools.cache
def _remat_class(block_cls: type[nn.Module], policy: str) -> type[nn.Module]:
  """`nn.remat` of a diffusers block class; cached so every setup reuses one class."""
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy])


def _init_fields(module: nn.Module) -> dict[str, Any]:
  """A Flax module's constructor arguments (its dataclass fields, less parent/name)."""
  return {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)
    if f.init and f.name not in ("parent", "name")
  }


@flax_register_to_config
class RematUNet(FlaxUNet2DConditionModel):
  """FlaxUNet2DConditionModel whose down/mid/up blocks rematerialise in the backward pass.

  diffusers' `setup` builds each block and assigns the list to
  `self.down_blocks` (etc.); Flax names and binds submodules at that
  assignment. Intercepting it to rebuild each block as `nn.remat` of its own
  class with the same fields changes neither the module names nor the
  parameter tree, and needs no copy of diffusers' setup or __call__. Lifted
  remat adds no scope level, so the parameters stay at `down_blocks_0/...`.

  The blocks are called with `deterministic=` as a keyword, which
  `jax.checkpoint` traces; that is harmless only because dropout is 0 (a zero
  rate returns before reading the flag), so `dropout` must be 0.
  """

  remat_policy: str = "blocks"

  def __setattr__(self, name: str, value: Any) -> None:
    if name in _BLOCK_ATTRS and value is not None:
      if isinstance(value, list | tuple):
        value = [self._remat_block(b) for b in value]
      else:
        value = self._remat_block(value)
    super().__setattr__(name, value)

  def _remat_block(self, block: nn.Module) -> nn.Module:
    return _remat_class(type(block), self.remat_policy)(**_init_fields(block))


def with_remat(unet: FlaxUNet2DConditionModel, policy: str) -> FlaxUNet2DConditionModel:
  """The same UNet (same config, dtype and parameter tree) with remat `policy`.

  Args:
    unet: a stock or remat UNet (e.g. from `models.loader`).
    policy: a key of `REMAT_POLICIES`; "none" gives the stock diffusers class.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {policy!r}; expected one of {list(REMAT_POLICIES)}.")
  fields = _init_fields(unet)
  fields.pop("remat_policy", None)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    if policy == "none":
      if type(unet) is FlaxUNet2DConditionModel:
        return unet
      return FlaxUNet2DConditionModel(**fields)
    if fields.get("dropout", 0.0) != 0.0:
      raise ValueError(
        f"remat={policy!r} needs dropout == 0 (got {fields['dropout']}): the blocks' "
        "`deterministic` flag would be traced by jax.checkpoint."
      )
    return RematUNet(remat_policy=policy, **fields)


def unet_from_config(
  model_config: ml_collections.ConfigDict | dict[str, Any],
  compute_dtype: str = "float32",
  remat: str | None = None,
) -> FlaxUNet2DConditionModel:
  """Builds a diffusers Flax UNet; `compute_dtype` sets activation precision.

  Parameters are always created in float32 (the master copy); `dtype` only
  controls the dtype that the module casts to for its computation.

  Args:
    model_config: diffusers UNet config fields, plus optionally `remat`.
    compute_dtype: activation dtype name.
    remat: remat policy; None = `model_config["remat"]`, or "none" if absent.
  """
  kwargs = dict(model_config)
  config_remat = kwargs.pop("remat", "none")
  for key in ("block_out_channels", "down_block_types", "up_block_types"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    unet = FlaxUNet2DConditionModel(dtype=parse_dtype(compute_dtype), **kwargs)
  return with_remat(unet, config_remat if remat is None else remat)


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
