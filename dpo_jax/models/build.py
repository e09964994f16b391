"""What the trainer trains: the UNet, its initial parameters and its noise schedule.

Two sources, chosen by `config.pretrained_path`:
  - "" : a randomly initialised UNet from `config.model` and the schedule in
    `config.scheduler` (tiny CPU configs, tests);
  - a diffusers folder: UNet, VAE, text encoders, tokenizers and scheduler from
    disk (`models.loader`), the weights variant `config.pretrained_variant`
    (e.g. "fp16" files) when set. The folder's scheduler config wins over
    `config.scheduler` (the UNet was trained with it), and its UNet config
    over `config.model`.

`config.model.remat` and `config.model.attention` apply to either: they change
how the UNet computes (and what the backward pass stores), not the
architecture or the parameter tree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from dpo_jax.models import loader
from dpo_jax.models import unet as unet_lib

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
  """The trained model's definition and how to get its initial parameters.

  Attributes:
    unet: Flax UNet module (compute dtype from `config.precision`, remat
      policy from `config.model.remat`).
    init_params: rng -> float32 params (random init); jit it with
      out_shardings so full-size parameters are created shard by shard.
    pretrained_params: loaded float32 params (host/default device), or None.
    scheduler_config: the noise schedule (diffusers scheduler config dict).
    pipeline: the loaded pipeline (encoders, tokenizers) or None.
  """

  unet: Any
  init_params: Callable[[jax.Array], Params]
  pretrained_params: Params | None
  scheduler_config: dict[str, Any]
  pipeline: loader.Pipeline | None


def build_models(config: ml_collections.ConfigDict, with_encoders: bool | None = None) -> Models:
  """Random-init or pretrained UNet per `config.pretrained_path`.

  Args:
    config: the run config.
    with_encoders: load the VAE, text encoders and tokenizers too. Default:
      unless training reads a latent cache (`data.source == "cache"`), which
      needs only the UNet and the scheduler.
  """
  compute = config.precision.compute_dtype
  remat = config.model.remat
  attention = unet_lib.attention_from_config(config.model)
  if with_encoders is None:
    with_encoders = config.data.source != "cache"
  # .get: configs saved before the field existed (checkpoint metas) have none.
  variant = config.get("pretrained_variant", "") or None
  if not config.pretrained_path:
    unet = unet_lib.unet_from_config(config.model, compute)
    return Models(
      unet=unet,
      init_params=lambda rng: unet_lib.init_unet_params(unet, rng),
      pretrained_params=None,
      scheduler_config=config.scheduler.to_dict(),
      pipeline=None,
    )
  if not with_encoders:
    unet, params = loader.load_unet(
      os.path.join(config.pretrained_path, "unet"), variant=variant, dtype=compute
    )
    unet = unet_lib.with_remat(unet_lib.with_attention(unet, attention), remat)
    return Models(
      unet=unet,
      init_params=lambda rng: unet_lib.init_unet_params(unet, rng),
      pretrained_params=params,
      scheduler_config=loader.load_scheduler_config(
        os.path.join(config.pretrained_path, "scheduler")
      ),
      pipeline=None,
    )
  pipeline = loader.load_pipeline(config.pretrained_path, variant=variant, dtype=compute)
  params = pipeline.unet_params
  # Only the trained UNet rematerialises; the pipeline's (sampling) does not.
  pipeline = dataclasses.replace(pipeline, unet=unet_lib.with_attention(pipeline.unet, attention))
  unet = unet_lib.with_remat(pipeline.unet, remat)
  logging.info(
    "Loaded %s pipeline from %s (UNet %.1fM params, prediction_type=%s).",
    pipeline.kind,
    config.pretrained_path,
    sum(x.size for x in jax.tree.leaves(params)) / 1e6,
    pipeline.scheduler_config.get("prediction_type"),
  )
  return Models(
    unet=unet,
    init_params=lambda rng: unet_lib.init_unet_params(unet, rng),
    pretrained_params=params,
    scheduler_config=dict(pipeline.scheduler_config),
    pipeline=pipeline,
  )
