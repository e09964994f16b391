"""Builds the training data named by `config.data.source`.

Sources:
  synthetic: in-memory pairs already in the cached-latent format (tiny configs).
  pickapic:  Pick-a-Pic-format parquet shards (`config.data.path`), checked and
             written once as array_record (`data/build.py`, every process
             its share), decoded by grain threads, and encoded on device by
             the frozen VAE / text encoder(s).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dpo_jax.data import encode, synthetic
from dpo_jax.models import conditioning
from dpo_jax.models.build import Models

Batch = dict[str, Any]


@dataclasses.dataclass(eq=False)
class Data:
  """Everything the trainer needs from the data side.

  Attributes:
    train: iterator of per-process micro-batches (`micro_batch_size` pairs
      over all processes) with `element_spec`, `get_state`, `set_state`.
    eval_batch: a fixed per-process batch of held-out pairs (same format as
      `train`'s), or None when the source has no held-out split (eval off).
    uncond: empty-prompt conditioning for caption dropout.
    encoder: (frozen_params, global raw batch) -> global batch in the step's
      format, or None when batches are already in that format.
    frozen: the encoder's parameters (never trained, never donated).
  """

  train: Iterator[Batch]
  eval_batch: Batch | None
  uncond: dict[str, np.ndarray]
  encoder: Callable[[Any, Batch], Batch] | None = None
  frozen: Any = None


def micro_batch_size(config: ml_collections.ConfigDict) -> int:
  """Pairs per `next()` of a train iterator: one micro-batch of the global batch.

  The trainer pulls `optim.grad_accum` of them per optimizer step, so the host
  never holds (and the encoders never see) the whole global batch at once.
  """
  return config.data.global_batch_size // config.optim.grad_accum


def make_data(config: ml_collections.ConfigDict, models: Models, workdir: str) -> Data:
  if config.data.source == "synthetic":
    return _synthetic(config)
  if config.data.source == "pickapic":
    return _pickapic(config, models, workdir)
  if config.data.source == "cache":
    return _cache(config)
  raise ValueError(
    f"Unknown data source {config.data.source!r}; available: 'synthetic', 'pickapic', 'cache'."
  )


def _cache(config: ml_collections.ConfigDict) -> Data:
  """Latents and text embeddings precomputed by `python -m dpo_jax.data.cache`.

  Eval reads the cache's `data.eval_split`. A cache without one (the parquet
  folder had none) holds out its last `eval_batch_size` train rows for eval
  and never trains on them; `data.eval_split='train'` evaluates on training
  rows, as asked.
  """
  from dpo_jax.data import cache

  data = config.data
  if not data.cache_dir:
    raise ValueError("data.source='cache' needs config.data.cache_dir.")
  arrays, uncond, info = cache.read_cache(data.cache_dir)
  logging.info(
    "Latent cache %s: %s", data.cache_dir, {k: v for k, v in info.items() if k != "arrays"}
  )
  rpo = config.rpo.embedding if config.objective == "rpo" else ""
  arrays = cache.select_arrays(arrays, data.cache_dir, rpo)
  n_eval = data.eval_batch_size
  num_rows = lambda a: len(next(iter(a.values())))  # noqa: E731
  if data.eval_split in info["splits"] and data.eval_split != "train":
    held = cache.read_cache(data.cache_dir, data.eval_split)[0]
    held = cache.select_arrays(held, data.cache_dir, rpo)
    where = f"Cache split {data.eval_split!r}"
  elif data.eval_split == "train":
    held, where = arrays, "The cache's train split"  # Asked for: eval on training rows.
  else:
    n = num_rows(arrays)
    logging.warning(
      "Cache %s has no %r split: holding out its last %d of %d train rows for eval "
      "(never trained on).",
      data.cache_dir,
      data.eval_split,
      n_eval,
      n,
    )
    held = {k: v.rows(max(n - n_eval, 0), n) for k, v in arrays.items()}
    arrays = {k: v.rows(0, max(n - n_eval, 0)) for k, v in arrays.items()}
    where = "The cache's train split"
  if num_rows(held) < n_eval:
    raise ValueError(
      f"{where} has {num_rows(held)} examples < data.eval_batch_size={n_eval}; lower "
      "data.eval_batch_size."
    )
  it = synthetic.ArrayPairIterator(
    arrays,
    micro_batch_size(config),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # A fixed eval batch: this process's block of the split's first rows.
  pi, pc = jax.process_index(), jax.process_count()
  local = np.arange(pi * n_eval // pc, (pi + 1) * n_eval // pc)
  eval_batch = {k: v[local] for k, v in held.items()}
  return Data(
    train=it,
    eval_batch=eval_batch,
    uncond=uncond,
    encoder=lambda frozen, flat: cache.to_step_batch(flat, rpo),
  )


def _synthetic(config: ml_collections.ConfigDict) -> Data:
  data, m = config.data, config.model
  common = dict(
    num_prompts=data.num_prompts,
    latent_shape=(m.in_channels, m.sample_size, m.sample_size),
    seq_len=data.seq_len,
    context_dim=m.cross_attention_dim,
  )
  train = synthetic.make_synthetic_pairs(num_examples=data.num_examples, seed=config.seed, **common)
  it = synthetic.ArrayPairIterator(
    train,
    micro_batch_size(config),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # Held-out pairs of the same prompts, drawn with a different seed.
  held = synthetic.make_synthetic_pairs(
    num_examples=data.eval_batch_size, seed=config.seed + 1, **common
  )
  if config.objective == "rpo":
    # The synthetic prompt embedding: the mean of its random token table.
    for arrays in (train, held):
      arrays["rpo_embeds"] = arrays["context"].mean(axis=1)
  eval_batch = _local_rows(held)
  # The synthetic "text encoder" is a random table; the empty prompt is zeros.
  uncond = {"context": np.zeros((data.seq_len, m.cross_attention_dim), np.float32)}
  return Data(train=it, eval_batch=eval_batch, uncond=uncond)


def _local_rows(batch: Batch) -> Batch:
  """This process's contiguous block of a global batch."""
  pi, pc = jax.process_index(), jax.process_count()
  n = len(next(iter(batch.values())))
  return {k: v[pi * n // pc : (pi + 1) * n // pc] for k, v in batch.items()}


def _pickapic(config: ml_collections.ConfigDict, models: Models, workdir: str) -> Data:
  # TFDS only when this source is used.
  from dpo_jax.data import build, pickapic, pipeline

  if models.pipeline is None:
    raise ValueError("data.source='pickapic' needs config.pretrained_path (VAE, text encoders).")
  data = config.data
  if not data.path:
    raise ValueError("data.source='pickapic' needs config.data.path (a folder of parquet shards).")
  tfds_dir = data.tfds_dir or os.fspath(epath.Path(workdir) / "tfds")
  # Every process checks its share of the rows and they meet through the
  # files, not a device barrier (see `data/build.py`); an existing build (say
  # from `python -m dpo_jax.data.build`) is reused at once.
  built = build.prepare_dataset(config, tfds_dir)
  if jax.process_index() == 0:
    pickapic.write_data_report(
      pickapic.load_data_report(built), os.fspath(epath.Path(workdir) / "data_report.json")
    )

  # The encoder closure keeps the pipeline for the whole run: not its UNet
  # weights (a host copy of GBs; the trainer has them on the mesh).
  pipe = dataclasses.replace(models.pipeline, unet_params=None)
  tokenize = conditioning.make_tokenize_fn(pipe)
  common = dict(
    resolution=data.resolution,
    tokenize_fn=tokenize,
    random_crop=data.random_crop,
    flip=data.flip,
    num_threads=data.num_threads,
  )
  train = pipeline.make_pickapic_iterator(
    built, "train", global_batch_size=micro_batch_size(config), seed=config.seed, **common
  )
  eval_batch = None
  if data.eval_split in pickapic.split_files(data.path):
    # Eval: one fixed batch of the held-out split, no random crop/flip, same
    # for every run.
    ev = pipeline.make_pickapic_iterator(
      built,
      data.eval_split,
      global_batch_size=data.eval_batch_size,
      seed=config.seed + 1,
      **dict(common, random_crop=False, flip="none"),
    )
    eval_batch = next(ev)
    ev.close()
  else:
    # Never training rows: an eval loss on pairs the policy trains on says
    # nothing about generalisation.
    logging.warning(
      "No %r split in %s: the eval loss is off (data.eval_split names the held-out split).",
      data.eval_split,
      data.path,
    )

  rpo_features, image_embedder, frozen = (), None, conditioning.frozen_params(pipe)
  if config.objective == "rpo":
    rpo_features = encode.rpo_feature_keys(config.rpo.embedding)
    if "image" in config.rpo.embedding:
      image_embedder, frozen["rpo_clip"] = encode.rpo_image_embedder(config)

  def encoder(frozen, raw):
    out = encode.encode_batch(pipe, frozen, raw, data.resolution, rpo_features, image_embedder)
    return encode.with_rpo_embeds(out, config.rpo.embedding) if rpo_features else out

  return Data(
    train=train,
    eval_batch=eval_batch,
    uncond=conditioning.empty_prompt_conditioning(pipe),
    encoder=encoder,
    frozen=frozen,
  )


# Kept under its old name for callers of `sources.rpo_image_embedder`.
rpo_image_embedder = encode.rpo_image_embedder
