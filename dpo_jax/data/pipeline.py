"""Deterministic, checkpointable, per-process-sharded image-pair batches (grain).

Reads a random-access source of checked preference rows (`pickapic.open_split`)
and yields per-process numpy batches:

  pixels_w:      float32 [B, R, R, 3] in [-1, 1], the preferred image (label 1)
  pixels_l:      float32 [B, R, R, 3] in [-1, 1], the rejected image
  input_ids:     int32 [B, L] if a `tokenize_fn` is given, else
  caption:       object [B] of str
  original_size: int32 [B, 2] (h, w) of the preferred image as stored (SDXL add_time_ids)
  crop_top_left: int32 [B, 2] (top, left) of the crop in the resized image
  example_id:    int64 [B] (ranking_id for Pick-a-Pic)

B = global_batch_size / process_count, R = resolution. Caption dropout is the
trainer's job, not this module's.

Order and sharding (as `synthetic.ArrayPairIterator`). Each epoch is a fresh
permutation of all N rows (seeded by `seed` and the epoch); its first
`batches_per_epoch * global_batch_size` entries are used and global batch b is
entries [b*G, (b+1)*G). Process p takes the p-th contiguous block of B rows of
every global batch, which is where `make_array_from_process_local_data` puts
them: the assembled global batch, and so the whole run, is the same for any
process count. Processes are disjoint, together cover each global batch, and
every process yields exactly `batches_per_epoch` batches per epoch. No row can
be skipped at read time (rows were checked when the dataset was built), so this
count never depends on decoding luck; the N mod G rows left over differ from
epoch to epoch, and process 0 logs them when an epoch starts.

Augmentation follows the official Diffusion-DPO trainer (SalesforceAIResearch/
DiffusionDPO `train.py`): resize the shorter side to R (bilinear), crop R x R,
random horizontal flip drawn *independently* for the two images (it runs its
torchvision transform once per image). The crop is one box shared by both
images, unlike that trainer's per-image crop (its default is a centre crop):
SDXL conditions winner and loser on the same `add_time_ids`, so both must be
cut where `crop_top_left` says (given in the unflipped resized image; like
both reference trainers, the conditioning ignores flips). When the two images
differ in size, the loser is resized straight to the winner's resized size (as
in the diffusers SDXL DPO script, which resizes the second image to the
first's size).
Every random choice is a function of (seed, epoch, row), so batches do not
depend on thread timing or on how many processes read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from PIL import Image

from dpo_jax.data import decode

Batch = dict[str, np.ndarray]
TokenizeFn = Callable[[Sequence[str]], np.ndarray]
FLIP_POLICIES = ("independent", "shared", "none")
# Effectively endless; the stream is indexed lazily, so the length costs nothing.
_ENDLESS_EPOCHS = 1 << 30


def resized_hw(h: int, w: int, resolution: int) -> tuple[int, int]:
  """(h, w) with the shorter side at `resolution`, aspect kept (torchvision `Resize(int)`)."""
  if h <= w:
    return resolution, max(resolution, int(resolution * w / h))
  return max(resolution, int(resolution * h / w)), resolution


def _to_unit_range(img: Image.Image) -> np.ndarray:
  return np.asarray(img, dtype=np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def preprocess_pair(
  jpg_w: bytes,
  jpg_l: bytes,
  rng: np.random.Generator,
  resolution: int,
  random_crop: bool = True,
  flip: str = "independent",
  jpeg_draft: bool = True,
  max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, np.ndarray]:
  """Decodes, resizes, crops and flips one (winner, loser) pair.

  Args:
    jpg_w, jpg_l: encoded preferred and rejected images.
    rng: draws the crop and the flips.
    resolution: output side R.
    random_crop: random crop position, else the centre.
    flip: "independent" (each image flipped with p=0.5 on its own, as the
      official trainer), "shared" (one coin for both) or "none".
    jpeg_draft: let libjpeg decode large JPEGs at a reduced DCT scale that is
      still >= R on both sides (the resize that follows is then cheaper).

  Returns:
    pixels_w, pixels_l: float32 [R, R, 3] in [-1, 1]; original_size,
    crop_top_left: int32 [2].

  Raises:
    decode.ImageRejected: an image cannot be decoded.
  """
  draft = (resolution, resolution) if jpeg_draft else None
  kw = dict(max_pixels=max_image_pixels, draft_size=draft)
  img_w, (h0, w0), _ = decode.decode_rgb(jpg_w, **kw)
  img_l, _, _ = decode.decode_rgb(jpg_l, **kw)
  h, w = resized_hw(h0, w0, resolution)
  img_w = img_w.resize((w, h), Image.BILINEAR)
  img_l = img_l.resize((w, h), Image.BILINEAR)
  if random_crop:
    top = int(rng.integers(0, h - resolution + 1))
    left = int(rng.integers(0, w - resolution + 1))
  else:
    top = int(round((h - resolution) / 2))
    left = int(round((w - resolution) / 2))
  box = (left, top, left + resolution, top + resolution)
  coins = rng.random(2) < 0.5
  flips = {"independent": coins, "shared": (coins[0], coins[0]), "none": (False, False)}[flip]
  out = []
  for img, f in zip((img_w, img_l), flips):
    img = img.crop(box)
    out.append(_to_unit_range(img.transpose(Image.FLIP_LEFT_RIGHT) if f else img))
  return {
    "pixels_w": out[0],
    "pixels_l": out[1],
    "original_size": np.array([h0, w0], np.int32),
    "crop_top_left": np.array([top, left], np.int32),
  }


def load_example(
  source: Sequence[Mapping[str, Any]],
  row: int,
  seed: int,
  epoch: int,
  resolution: int,
  **aug: Any,
) -> dict[str, Any]:
  """Row `row` of a checked source -> preprocessed pair (winner first) + caption + id.

  Augmentation is keyed by (seed, epoch, row), so it is independent of the
  reader thread, the process count and the position in the stream.
  """
  ex = source[row]
  label_0 = float(ex["label_0"])
  if label_0 not in (0.0, 1.0):
    raise RuntimeError(
      f"Row {row} (example_id {ex['example_id']}) has label_0={label_0}; the source must "
      "hold checked strict preferences (build it with pickapic.build_pickapic)."
    )
  jpg_w, jpg_l = (ex["jpg_0"], ex["jpg_1"]) if label_0 == 1.0 else (ex["jpg_1"], ex["jpg_0"])
  rng = np.random.default_rng([seed, 1, epoch, row])
  try:
    out = preprocess_pair(jpg_w, jpg_l, rng, resolution, **aug)
  except decode.ImageRejected as e:
    # Cannot happen for a source that passed the build checks; skipping here
    # would make processes disagree on batch counts, so fail loudly instead.
    raise RuntimeError(
      f"example_id {ex['example_id']} (row {row}) failed to decode although the dataset "
      f"was checked when built ({e}); the files changed since, rebuild the dataset."
    ) from e
  caption = ex["caption"]
  out["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
  out["example_id"] = np.int64(ex["example_id"])
  return out


class _LocalOrder(Sequence):
  """Process-local stream position k -> (epoch, row index); see the module docstring."""

  def __init__(
    self,
    n: int,
    seed: int,
    batches_per_epoch: int,
    local_batch: int,
    pi: int,
    pc: int,
    num_epochs: int,
  ):
    self._n, self._seed, self._local_batch = n, seed, local_batch
    self._per_epoch = batches_per_epoch * local_batch
    self._pi, self._pc, self._num_epochs = pi, pc, num_epochs
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._per_epoch * self._num_epochs

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        # Reader threads straddle at most two epochs; keep a few, drop older ones.
        for e in [e for e in self._perms if e < epoch - 2]:
          del self._perms[e]
        self._perms[epoch] = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      return self._perms[epoch]

  def __getitem__(self, k: int) -> tuple[int, int]:
    if not 0 <= k < len(self):
      raise IndexError(k)
    epoch, pos = divmod(k, self._per_epoch)
    batch, j = divmod(pos, self._local_batch)
    return epoch, int(self._perm(epoch)[(batch * self._pc + self._pi) * self._local_batch + j])


class PairBatchIterator:
  """Shuffled, per-process-sharded, checkpointable batches of preprocessed image pairs.

  Decoding runs in `num_threads` grain reader threads (Pillow releases the GIL
  while decoding and resizing). Tokenization runs once per batch in the
  consumer thread: a Hugging Face fast tokenizer shared across threads can fail
  with "Already borrowed", and one batched call is cheaper anyway.
  """

  def __init__(
    self,
    source: Sequence[Mapping[str, Any]],
    global_batch_size: int,
    resolution: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenize_fn: TokenizeFn | None = None,
    random_crop: bool = True,
    flip: str = "independent",
    jpeg_draft: bool = True,
    max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS,
    num_threads: int = 8,
    prefetch_buffer_size: int | None = None,
    num_epochs: int | None = None,
  ):
    """See the module docstring; process_index/count default to jax's."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if flip not in FLIP_POLICIES:
      raise ValueError(f"flip={flip!r}; expected one of {FLIP_POLICIES}.")
    if global_batch_size % pc:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {pc} processes.")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}.")
    n = len(source)
    self.batches_per_epoch = n // global_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(f"{n} examples cannot fill one global batch of {global_batch_size}.")
    self.epoch_remainder = n - self.batches_per_epoch * global_batch_size
    self.local_batch = global_batch_size // pc
    self._source, self._n, self._seed, self._gbs = source, n, seed, global_batch_size
    self._res, self._tokenize = resolution, tokenize_fn
    self._aug = dict(
      random_crop=random_crop,
      flip=flip,
      jpeg_draft=jpeg_draft,
      max_image_pixels=max_image_pixels,
    )
    # Per-example token shape: [L], or [2, L] for SDXL's two tokenizers.
    self._token_shape = None
    if tokenize_fn is not None:
      self._token_shape = tuple(np.asarray(tokenize_fn([""])).shape[1:])
    order = _LocalOrder(
      n, seed, self.batches_per_epoch, self.local_batch, pi, pc, num_epochs or _ENDLESS_EPOCHS
    )
    self._order, self._log_leftover, self._next_batch = order, pi == 0, 0
    options = grain.ReadOptions(
      num_threads=num_threads,
      # One batch ahead by default: an element is two float32 R x R images
      # (6 MB at 512 px), so deep buffers of large batches cost GBs of RAM.
      prefetch_buffer_size=prefetch_buffer_size or self.local_batch + num_threads,
    )
    ds = grain.MapDataset.source(order).map(self._load).to_iter_dataset(options)
    ds = ds.batch(self.local_batch, drop_remainder=True, batch_fn=self._collate)
    self._it = iter(ds)

  def _load(self, epoch_and_row: tuple[int, int]) -> dict[str, Any]:
    epoch, row = epoch_and_row
    return load_example(self._source, row, self._seed, epoch, self._res, **self._aug)

  def _collate(self, examples: Sequence[dict[str, Any]]) -> Batch:
    batch = {
      k: np.stack([e[k] for e in examples])
      for k in ("pixels_w", "pixels_l", "original_size", "crop_top_left", "example_id")
    }
    captions = [e["caption"] for e in examples]
    if self._tokenize is None:
      batch["caption"] = np.array(captions, dtype=object)
    else:
      ids = np.asarray(self._tokenize(captions), dtype=np.int32)
      if ids.shape != (len(captions), *self._token_shape):
        raise ValueError(
          f"tokenize_fn returned shape {ids.shape}; expected "
          f"{(len(captions), *self._token_shape)} "
          "(pad and truncate to a fixed length)."
        )
      batch["input_ids"] = ids
    return batch

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one per-process batch."""
    b, r = self.local_batch, self._res
    spec = {
      "pixels_w": jax.ShapeDtypeStruct((b, r, r, 3), np.float32),
      "pixels_l": jax.ShapeDtypeStruct((b, r, r, 3), np.float32),
      "original_size": jax.ShapeDtypeStruct((b, 2), np.int32),
      "crop_top_left": jax.ShapeDtypeStruct((b, 2), np.int32),
      "example_id": jax.ShapeDtypeStruct((b,), np.int64),
    }
    if self._tokenize is None:
      spec["caption"] = jax.ShapeDtypeStruct((b,), np.object_)
    else:
      spec["input_ids"] = jax.ShapeDtypeStruct((b, *self._token_shape), np.int32)
    return spec

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = next(self._it)
    epoch, b = divmod(self._next_batch, self.batches_per_epoch)
    if b == 0 and self._log_leftover and self.epoch_remainder:
      self._log_epoch_remainder(epoch)
    self._next_batch += 1
    return batch

  def leftover_rows(self, epoch: int) -> np.ndarray:
    """Rows (indices into the source) that `epoch` does not use: the N mod G left over."""
    return self._order._perm(epoch)[self.batches_per_epoch * self._gbs :]

  def _log_epoch_remainder(self, epoch: int) -> None:
    rows = self.leftover_rows(epoch)
    logging.info(
      "Data epoch %d: %d of %d rows left over (N mod global batch %d); rows %s%s. "
      "Each epoch leaves out a different set.",
      epoch,
      len(rows),
      self._n,
      self._gbs,
      sorted(int(r) for r in rows[:20]),
      "" if len(rows) <= 20 else ", ...",
    )

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position. `next_batch` counts global batches consumed,
    which is the same on every process and survives a change of process count."""
    next_index = int(self._it.get_state()["next_index"])
    next_batch = next_index // self.local_batch
    return {
      "next_batch": next_batch,
      "epoch": next_batch // self.batches_per_epoch,  # Informational.
      "seed": self._seed,
      "num_examples": self._n,
      "global_batch_size": self._gbs,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key, mine in (
      ("seed", self._seed),
      ("num_examples", self._n),
      ("global_batch_size", self._gbs),
    ):
      if state[key] != mine:
        raise ValueError(
          f"Checkpointed data {key}={state[key]} differs from the configured {mine}; "
          "resuming would silently change the data order."
        )
    self._it.set_state({"next_index": int(state["next_batch"]) * self.local_batch})
    self._next_batch = int(state["next_batch"])

  def close(self) -> None:
    """Stops the reader threads."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_pickapic_iterator(data_dir: str, split: str = "train", **kwargs: Any) -> PairBatchIterator:
  """`PairBatchIterator` over a split built by `pickapic.build_pickapic` (`builder.data_dir`)."""
  from dpo_jax.data import pickapic  # TFDS is only needed when reading a built set.

  return PairBatchIterator(pickapic.open_split(data_dir, split), **kwargs)
