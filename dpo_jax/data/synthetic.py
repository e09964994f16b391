"""A small synthetic preference set in the cached-latent batch format.

Stands in for real data on the tiny CPU default: each of `num_prompts` prompts
has a random text embedding, a smooth "preferred" latent pattern and a
high-frequency "rejected" one; every example adds its own small perturbation.
A policy that learns to denoise the smooth patterns better than the rough ones
raises the DPO implicit accuracy, which is what the smoke runs look for.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

Batch = dict[str, np.ndarray]


def make_synthetic_pairs(
  num_examples: int,
  num_prompts: int,
  latent_shape: tuple[int, int, int],
  seq_len: int,
  context_dim: int,
  seed: int,
) -> Batch:
  """All examples at once (the set is tiny).

  Returns:
    dict of float32 arrays: latents_w/latents_l [N, C, H, W], context [N, L, D].
  """
  rng = np.random.default_rng(seed)
  c, h, w = latent_shape
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  freq = rng.uniform(0.5, 1.5, size=(num_prompts, c, 2))
  phase = rng.uniform(0, 2 * np.pi, size=(num_prompts, c))
  smooth = np.sin(
    2 * np.pi * (freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx)
    + phase[..., None, None]
  )
  rough = rng.choice([-1.0, 1.0], size=(num_prompts, c, h, w))
  prompt_ctx = rng.normal(size=(num_prompts, seq_len, context_dim))
  prompt = np.arange(num_examples) % num_prompts
  jitter = 0.1 * rng.normal(size=(2, num_examples, c, h, w))
  return {
    "latents_w": (smooth[prompt] + jitter[0]).astype(np.float32),
    "latents_l": (rough[prompt] + jitter[1]).astype(np.float32),
    "context": prompt_ctx[prompt].astype(np.float32),
  }


class ArrayPairIterator:
  """Shuffled, per-process-sharded, checkpointable iterator over in-memory arrays.

  Each epoch is a fresh permutation (seeded by `seed` and the epoch number),
  cut into global batches. Process p takes the p-th contiguous block of every
  global batch, which is exactly the rows `make_array_from_process_local_data`
  places on its devices: the assembled global batch, and so the whole run, is
  the same for any process count. Processes see disjoint examples and together
  cover every example once per epoch. A partial final batch is dropped so
  every process yields the same number of batches (the remainder is reported
  in `epoch_remainder`).
  """

  def __init__(
    self,
    arrays: Batch,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    n = len(next(iter(arrays.values())))
    if global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by {process_count} processes."
      )
    self.local_batch = global_batch_size // process_count
    self.batches_per_epoch = n // global_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(f"{n} examples cannot fill one global batch of {global_batch_size}.")
    self.epoch_remainder = n - self.batches_per_epoch * global_batch_size
    self._arrays = arrays
    self._n = n
    self._seed = seed
    self._pi, self._pc = process_index, process_count
    self._epoch, self._index = 0, 0

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one per-process batch."""
    return {
      k: jax.ShapeDtypeStruct((self.local_batch,) + v.shape[1:], v.dtype)
      for k, v in self._arrays.items()
    }

  def _global_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._n)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._index >= self.batches_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    order = self._global_order(self._epoch)
    start = (self._index * self._pc + self._pi) * self.local_batch
    idx = order[start : start + self.local_batch]
    self._index += 1
    return {k: v[idx] for k, v in self._arrays.items()}

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "index": self._index, "seed": self._seed}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("seed", self._seed) != self._seed:
      raise ValueError(
        f"Checkpointed data seed {state['seed']} differs from the configured {self._seed}; "
        "resuming would silently change the data order."
      )
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
