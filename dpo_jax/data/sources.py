"""Builds the train iterator and the fixed eval batch named by `config.data.source`."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dpo_jax.data import synthetic


def make_train_and_eval(
  config: ml_collections.ConfigDict,
) -> tuple[synthetic.ArrayPairIterator, synthetic.Batch]:
  """Returns (train iterator over per-process batches, per-process eval batch)."""
  data = config.data
  if data.source != "synthetic":
    raise ValueError(f"Unknown data source {data.source!r}; available: 'synthetic'.")
  m = config.model
  shape = (m.in_channels, m.sample_size, m.sample_size)
  common = dict(
    num_prompts=data.num_prompts,
    latent_shape=shape,
    seq_len=data.seq_len,
    context_dim=m.cross_attention_dim,
  )
  train = synthetic.make_synthetic_pairs(num_examples=data.num_examples, seed=config.seed, **common)
  it = synthetic.ArrayPairIterator(
    train,
    data.global_batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # Held-out pairs of the same prompts, drawn with a different seed.
  held = synthetic.make_synthetic_pairs(
    num_examples=data.eval_batch_size, seed=config.seed + 1, **common
  )
  pi, pc = jax.process_index(), jax.process_count()
  eval_batch = {k: v[pi::pc] for k, v in held.items()}
  return it, eval_batch


def uncond_conditioning(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The empty prompt's conditioning, used by caption dropout.

  For the synthetic source the "text encoder" is a random table, so the empty
  prompt is represented by an all-zero context.
  """
  if config.data.source == "synthetic":
    shape = (config.data.seq_len, config.model.cross_attention_dim)
    return {"context": np.zeros(shape, np.float32)}
  raise ValueError(f"Unknown data source {config.data.source!r}.")
