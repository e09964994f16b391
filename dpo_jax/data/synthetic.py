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
from absl import logging

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
  """Shuffled, per-process-sharded, checkpointable iterator over row-indexable arrays.

  `arrays` may be numpy arrays or anything with `len`, `shape`, `dtype` and
  row gathering by an index array (`cache.ShardedArray`): only the rows of a
  batch are read.

  Each epoch is a fresh permutation (seeded by `seed` and the epoch number),
  cut into global batches. Process p takes the p-th contiguous block of every
  global batch, which is exactly the rows `make_array_from_process_local_data`
  places on its devices: the assembled global batch, and so the whole run, is
  the same for any process count. Processes see disjoint examples and together
  cover every example once per epoch. The rows that cannot fill a last global
  batch are left out of that epoch (logged at its start), so every process
  yields the same number of batches.

  The position is "examples consumed in this epoch", independent of how the
  stream is cut into batches: a run may resume with another batch size (or
  another number of gradient-accumulation micro-batches) and continues at
  exactly that offset of the same epoch permutation.
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
    if n < global_batch_size:
      raise ValueError(f"{n} examples cannot fill one global batch of {global_batch_size}.")
    self.global_batch = global_batch_size
    self.local_batch = global_batch_size // process_count
    self._arrays = arrays
    self._n = n
    self._seed = seed
    self._pi, self._pc = process_index, process_count
    self._epoch, self._consumed = 0, 0
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)
    self._announced = -1  # Last epoch whose leftover rows were logged.

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one per-process batch."""
    return {
      k: jax.ShapeDtypeStruct((self.local_batch,) + tuple(v.shape[1:]), v.dtype)
      for k, v in self._arrays.items()
    }

  def _global_order(self, epoch: int) -> np.ndarray:
    # One permutation per epoch, kept: at ~1M rows it costs ~10 ms to draw.
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self._seed, epoch]).permutation(self._n))
    return self._order[1]

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._consumed + self.global_batch > self._n:
      self._epoch, self._consumed = self._epoch + 1, 0
    if self._announced != self._epoch:
      self._announced = self._epoch
      left = (self._n - self._consumed) % self.global_batch
      logging.info(
        "Data epoch %d: %d of %d examples left, %d global batches of %d; the last %d rows of "
        "this epoch's permutation are not used in it.",
        self._epoch,
        self._n - self._consumed,
        self._n,
        (self._n - self._consumed) // self.global_batch,
        self.global_batch,
        left,
      )
    order = self._global_order(self._epoch)
    start = self._consumed + self._pi * self.local_batch
    idx = order[start : start + self.local_batch]
    self._consumed += self.global_batch
    return {k: v[idx] for k, v in self._arrays.items()}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the same on every process, for any process count."""
    return {
      "epoch": self._epoch,
      "consumed": self._consumed,  # Examples of this epoch's permutation already used.
      "seed": self._seed,
      "num_examples": self._n,
      "global_batch_size": self.global_batch,  # Informational: resuming may change it.
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at `state`'s position; a changed batch size continues exactly there.

    Raises:
      ValueError: the seed or the number of examples differs (the permutation
        would change), or the state predates "consumed" and the batch size it
        was cut with is unknown.
    """
    for key, mine in (("seed", self._seed), ("num_examples", self._n)):
      if key in state and int(state[key]) != mine:
        raise ValueError(
          f"Checkpointed data {key}={state[key]} differs from the configured {mine}; "
          "resuming would silently skip or repeat examples. Resume with the original data "
          "and seed, or start a new workdir."
        )
    if "consumed" not in state:
      raise ValueError(
        f"Checkpointed data state {dict(state)} has no 'consumed' count (written by an older "
        "version), so the batch size it was cut with is unknown; start a new workdir."
      )
    consumed = int(state["consumed"])
    if not 0 <= consumed <= self._n:
      raise ValueError(f"Checkpointed data position consumed={consumed} is outside [0, {self._n}].")
    old_batch = int(state.get("global_batch_size", self.global_batch))
    if old_batch != self.global_batch:
      logging.info(
        "Resuming the data stream cut into global batches of %d (was %d) at example %d of "
        "epoch %d.",
        self.global_batch,
        old_batch,
        consumed,
        int(state["epoch"]),
      )
    self._epoch, self._consumed = int(state["epoch"]), consumed
    self._announced = -1
