"""Precomputed latent / text-embedding cache, and training from it.

  python -m dpo_jax.data.cache --config=configs/sd15.py --output=DIR \\
      --config.pretrained_path=... --config.data.path=... [--shard_size=256 --encode_batch=8]

encodes every checked example of the train split, and of `data.eval_split`
when the parquet folder has it, once, with a fixed centre crop and no flip,
through the frozen VAE (posterior mean) and text encoder(s). Layout (any
`etils.epath` path: local, gs://, ...):

  DIR/meta.json                    settings, splits, {key: dtype, row shape}
  DIR/uncond/<key>.npy             empty-prompt conditioning
  DIR/<split>/shard-XXXXX/<key>.npy  rows [k * shard_size, ...) of each array
  DIR/<split>/shard-XXXXX/shard.json written last: the shard is complete

One uncompressed `.npy` per array and shard, so a reader memory-maps local
files and reads only the rows it gathers from remote ones. `.npy` cannot name
ml_dtypes types (bfloat16 is stored as raw `V2`), so the JSON files carry
each array's dtype and readers view the bytes as that dtype: a bf16-compute
cache trains as bf16. A shard counts only once its `shard.json` exists (a
single-object write, atomic on object stores too), so an interrupted run
resumes by skipping complete shards; with several processes, process p writes
shards p, p+P, ... Each shard is encoded in micro-batches of `encode_batch`
pairs, so the encoder's memory is bounded whatever the shard size.

Training with `--config.data.source=cache --config.data.cache_dir=DIR` then
reads only the UNet from `pretrained_path`: the VAE and text encoders are
never loaded, and eval reads the cached eval split, never training rows.
Augmentation is what a cache gives up (one crop, no flips); that is the trade
the reference trainers make too.

For Diffusion-RPO the cache also keeps the frozen features behind its pair
embedding: the pooled prompt embedding (`rpo_text`, always) and, when the
cache is written with `--config.rpo.clip_path=CLIP_DIR`, that CLIP image
tower's features of both images (`rpo_image_w/l`), so every `rpo.embedding`
trains from the cache without loading an encoder.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import ml_dtypes  # noqa: F401  (registers "bfloat16" etc. with np.dtype)
import numpy as np
from absl import flags, logging
from etils import epath

from dpo_jax import distributed
from dpo_jax.models import conditioning

FORMAT = 2  # 1: .npz shards (not memory-mappable), no dtypes, no eval split.
META = "meta.json"
SHARD = "shard-{:05d}"
SHARD_DONE = "shard.json"
UNCOND = "uncond"
# Open memory maps kept per array: each holds a file descriptor (a full
# Pick-a-Pic cache has thousands of shards), and the kernel may map whole
# cached file folios around a touched row, so the resident file pages of a
# reader are bounded by about this many shards per array.
MAX_OPEN_SHARDS = 16


def _dtype_name(dtype: np.dtype) -> str:
  return np.dtype(dtype).name  # "float32", "bfloat16", ...


def _spec(x: np.ndarray) -> dict[str, Any]:
  return {"dtype": _dtype_name(x.dtype), "shape": list(x.shape)}


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _write_npy(path: epath.Path, x: np.ndarray) -> None:
  with path.open("wb") as f:
    np.lib.format.write_array(f, np.ascontiguousarray(x), allow_pickle=False)


def write_shard(shard_dir: epath.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes one shard: `<key>.npy` per array, then `shard.json` (dtypes) to complete it."""
  shard_dir.mkdir(parents=True, exist_ok=True)
  for k, v in arrays.items():
    _write_npy(shard_dir / f"{k}.npy", v)
  rows = {len(v) for v in arrays.values()}
  if len(rows) != 1:
    raise ValueError(f"Shard {shard_dir}: arrays of different lengths {sorted(rows)}.")
  info = {"rows": rows.pop(), "arrays": {k: _spec(v) for k, v in arrays.items()}}
  (shard_dir / SHARD_DONE).write_text(json.dumps(info))


def _shard_examples(source, rows: Sequence[int], resolution: int, tokenize) -> dict[str, Any]:
  from dpo_jax.data import pipeline

  examples = [
    pipeline.load_example(source, r, 0, 0, resolution, random_crop=False, flip="none") for r in rows
  ]
  batch = {
    k: np.stack([e[k] for e in examples])
    for k in ("pixels_w", "pixels_l", "original_size", "crop_top_left", "example_id")
  }
  batch["input_ids"] = np.asarray(tokenize([e["caption"] for e in examples]), np.int32)
  return batch


def _make_encoder(pipe, resolution: int, features, embedder) -> Callable[[Any, Any], Any]:
  """(frozen params, raw device batch) -> encoded batch, jitted (one compile per shape)."""
  from dpo_jax.data import encode

  return jax.jit(lambda p, raw: encode.encode_batch(pipe, p, raw, resolution, features, embedder))


def _flat_outputs(out: Mapping[str, Any], features: Sequence[str]) -> dict[str, np.ndarray]:
  arrays = {k: out[k] for k in ("latents_w", "latents_l", "context", *features)}
  if "added_cond" in out:
    arrays["text_embeds"] = out["added_cond"]["text_embeds"]
    arrays["time_ids"] = out["added_cond"]["time_ids"]
  return arrays


def encode_rows(
  source, rows: Sequence[int], enc, frozen, encode_batch: int, resolution: int, tokenize, features
) -> dict[str, np.ndarray]:
  """Encodes `rows` of `source` in micro-batches of exactly `encode_batch` pairs.

  The last micro-batch is padded with copies of its last row (one compiled
  shape) and the padding dropped; images are decoded per micro-batch too, so
  host and device memory are bounded by `encode_batch`, not the shard size.
  """
  from dpo_jax.data import encode

  parts = []
  for start in range(0, len(rows), encode_batch):
    chunk = list(rows[start : start + encode_batch])
    m = len(chunk)
    raw = _shard_examples(source, chunk + [chunk[-1]] * (encode_batch - m), resolution, tokenize)
    out = _flat_outputs(jax.device_get(enc(frozen, encode.device_keys(raw))), features)
    out["example_id"] = raw["example_id"]
    parts.append({k: np.asarray(v)[:m] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def write_cache(
  config: ml_collections.ConfigDict,
  models,
  output: str,
  shard_size: int = 256,
  encode_batch: int = 8,
) -> int:
  """Encodes the train split (and `config.data.eval_split` when the data has one) into `output`.

  Returns:
    The number of train examples in the cache.
  """
  from dpo_jax.data import build, encode, pickapic

  if shard_size < 1 or encode_batch < 1:
    raise ValueError(f"shard_size={shard_size} and encode_batch={encode_batch} must be >= 1.")
  pipe = models.pipeline
  # Every process checks its share of the parquet rows (data/build.py).
  tfds_dir = config.data.tfds_dir or os.fspath(epath.Path(output) / "tfds")
  built = build.prepare_dataset(config, tfds_dir)
  splits = ["train"]
  eval_split = config.data.eval_split
  if eval_split and eval_split != "train":
    if eval_split in pickapic.split_files(config.data.path):
      splits.append(eval_split)
    else:
      logging.warning(
        "No %r split in %s: the cache has no eval split, and training from it holds out "
        "data.eval_batch_size train rows for eval.",
        eval_split,
        config.data.path,
      )
  res = config.data.resolution
  tokenize = conditioning.make_tokenize_fn(pipe)
  frozen = conditioning.frozen_params(pipe)
  features, embedder = ("rpo_text",), None
  if config.rpo.clip_path:
    features = encode.RPO_FEATURE_KEYS
    embedder, frozen["rpo_clip"] = encode.rpo_image_embedder(config)
  enc = _make_encoder(pipe, res, features, embedder)
  out_dir = epath.Path(output)
  sizes = {}
  for split in splits:
    source = pickapic.open_split(built, split)
    n = sizes[split] = len(source)
    num_shards = -(-n // shard_size)
    for k in range(jax.process_index(), num_shards, jax.process_count()):
      shard_dir = out_dir / split / SHARD.format(k)
      rows = range(k * shard_size, min(n, (k + 1) * shard_size))
      if (shard_dir / SHARD_DONE).exists():  # Written by an earlier (interrupted) run.
        done = json.loads((shard_dir / SHARD_DONE).read_text())["rows"]
        if done != len(rows):
          raise ValueError(
            f"{shard_dir} holds {done} rows, not {len(rows)}: {output} was written with "
            "another --shard_size (or other data); resume with the same settings or write a "
            "new cache."
          )
        continue
      arrays = encode_rows(source, rows, enc, frozen, encode_batch, res, tokenize, features)
      write_shard(shard_dir, arrays)
      logging.info(
        "Cache %s shard %d/%d: %d examples -> %s", split, k + 1, num_shards, len(rows), shard_dir
      )
  # meta.json, written last, marks the whole cache complete. A coordination-service
  # barrier, not a device collective: processes finish their shards far apart.
  distributed.barrier("dpo_jax_cache_shards_written", timeout_s=24 * 3600)
  if jax.process_index() == 0:
    uncond = {k: np.asarray(v) for k, v in conditioning.empty_prompt_conditioning(pipe).items()}
    (out_dir / UNCOND).mkdir(parents=True, exist_ok=True)
    for k, v in uncond.items():
      _write_npy(out_dir / UNCOND / f"{k}.npy", v)
    first = out_dir / "train" / SHARD.format(0) / SHARD_DONE
    arrays_spec = json.loads(first.read_text())["arrays"]
    info = {
      "format": FORMAT,
      "num_examples": sizes["train"],
      "splits": sizes,
      "shard_size": shard_size,
      "resolution": res,
      "kind": pipe.kind,
      "pretrained_path": config.pretrained_path,
      "rpo_clip_path": config.rpo.clip_path,
      "compute_dtype": config.precision.compute_dtype,
      # Row shapes: the leading (example) axis dropped.
      "arrays": {k: {**v, "shape": v["shape"][1:]} for k, v in arrays_spec.items()},
      "uncond": {k: _spec(v) for k, v in uncond.items()},
    }
    (out_dir / META).write_text(json.dumps(info, indent=2))
  return sizes["train"]


class _RemoteNpy:
  """Rows of one `.npy` file read by byte offset (gs:// and other non-local paths).

  The header is read on first use; each gather reads only the runs of
  consecutive rows it needs.
  """

  def __init__(self, path: epath.Path, dtype: np.dtype, shape: tuple[int, ...]):
    self._path, self.dtype, self.shape = path, dtype, shape
    self._offset: int | None = None
    self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

  def _header(self, f) -> int:
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
      raise ValueError(f"{self._path}: .npy format {version} (the cache writes 1.0 or 2.0).")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
    shape, fortran, dtype = (read or np.lib.format.read_array_header_2_0)(f)
    if tuple(shape) != self.shape or fortran or dtype.itemsize != self.dtype.itemsize:
      raise ValueError(
        f"{self._path}: header says shape {shape}, dtype {dtype}, fortran_order {fortran}; "
        f"the cache metadata says {self.shape}, {self.dtype}. Rewrite this shard."
      )
    return f.tell()

  def __getitem__(self, idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx)
    out = np.empty((len(idx),) + self.shape[1:], self.dtype)
    if not len(idx):
      return out
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    with self._path.open("rb") as f:
      if self._offset is None:
        self._offset = self._header(f)
      # Runs of consecutive (or repeated) rows -> one read each.
      breaks = np.flatnonzero(np.diff(sorted_idx) > 1) + 1
      for run in np.split(np.arange(len(idx)), breaks):
        lo, hi = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
        f.seek(self._offset + lo * self._row_bytes)
        buf = f.read((hi - lo) * self._row_bytes)
        if len(buf) != (hi - lo) * self._row_bytes:
          raise ValueError(f"{self._path} is truncated: rows [{lo}, {hi}) not all present.")
        rows = np.frombuffer(buf, self.dtype).reshape((hi - lo,) + self.shape[1:])
        out[order[run]] = rows[sorted_idx[run] - lo]
    return out


class ShardedArray:
  """Read-only row gather over one array split into the `.npy` files of many shards.

  Opens nothing until rows are read. Local shards are memory-mapped (an LRU of
  at most `MAX_OPEN_SHARDS` maps), remote ones read by byte offset, so a
  process reads only the rows it gathers: no process holds the cache in RAM.
  """

  def __init__(
    self,
    paths: Sequence[epath.Path],
    shard_size: int,
    num_rows: int,
    row_shape: Sequence[int],
    dtype: Any,
  ):
    self._paths = list(paths)
    self._shard_size = shard_size
    self._total = num_rows  # Rows in all shards (the last one may be short).
    self._start = 0  # First row of this view (see `rows`).
    self.dtype = np.dtype(dtype)
    self._row_shape = tuple(row_shape)
    self.shape = (num_rows,) + self._row_shape
    self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()

  def __len__(self) -> int:
    return self.shape[0]

  def rows(self, start: int, stop: int) -> ShardedArray:
    """A view of rows [start, stop) of this array."""
    if not 0 <= start <= stop <= len(self):
      raise IndexError(f"Rows [{start}, {stop}) out of range for {len(self)} rows.")
    view = ShardedArray(self._paths, self._shard_size, self._total, self._row_shape, self.dtype)
    view._start = self._start + start
    view.shape = (stop - start,) + self._row_shape
    return view

  def part(self, k: int):
    """Shard k's rows: an np.memmap (local) or a lazy byte-offset reader (remote)."""
    if k in self._open:
      self._open.move_to_end(k)
      return self._open[k]
    rows = min(self._shard_size, self._total - k * self._shard_size)
    shape = (rows,) + self._row_shape
    path = self._paths[k]
    if _is_local(path):
      mm = np.load(os.fspath(path), mmap_mode="r")
      if mm.shape != shape or mm.dtype.itemsize != self.dtype.itemsize:
        raise ValueError(
          f"{path}: shape {mm.shape}, dtype {mm.dtype}; the cache metadata says {shape}, "
          f"{self.dtype}. Rewrite this shard."
        )
      if hasattr(mm, "_mmap") and hasattr(mmap, "MADV_RANDOM"):
        # Rows are gathered in random order: no readahead of the neighbouring
        # rows (which this process does not feed) from disk or network storage.
        mm._mmap.madvise(mmap.MADV_RANDOM)
      part = mm.view(self.dtype)  # Still a memmap: bf16 bytes stored as "V2".
    else:
      part = _RemoteNpy(path, self.dtype, shape)
    self._open[k] = part
    if len(self._open) > MAX_OPEN_SHARDS:
      self._open.popitem(last=False)
    return part

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
      raise TypeError(f"ShardedArray rows are gathered by integer indices, not {idx.dtype}.")
    scalar = idx.ndim == 0
    idx = np.atleast_1d(idx).astype(np.int64)
    n = len(self)
    if idx.size and (idx.min() < -n or idx.max() >= n):
      raise IndexError(f"Row index out of range for {n} rows.")
    idx = np.where(idx < 0, idx + n, idx) + self._start
    out = np.empty((len(idx),) + self._row_shape, self.dtype)
    shard = idx // self._shard_size
    for k in np.unique(shard):
      sel = np.flatnonzero(shard == k)
      out[sel] = self.part(int(k))[idx[sel] - int(k) * self._shard_size]
    return out[0] if scalar else out


def _read_npy(path: epath.Path, spec: Mapping[str, Any]) -> np.ndarray:
  with path.open("rb") as f:
    x = np.lib.format.read_array(f, allow_pickle=False)
  return x.view(np.dtype(spec["dtype"])).reshape(spec["shape"])


def read_cache(
  cache_dir: str, split: str = "train"
) -> tuple[dict[str, ShardedArray], dict[str, np.ndarray], dict[str, Any]]:
  """-> (arrays {key: ShardedArray} of `split` in the step's flat layout, uncond, info).

  Raises:
    FileNotFoundError: no cache, an old-format cache, an absent split, or
      missing shards.
  """
  root = epath.Path(cache_dir)
  meta_path = root / META
  if not meta_path.exists():
    if (root / "meta.npz").exists():
      raise FileNotFoundError(
        f"{cache_dir} is a latent cache of an older format (.npz shards: not memory-mappable, "
        "bfloat16 stored as raw bytes); write a new one with `python -m dpo_jax.data.cache`."
      )
    raise FileNotFoundError(
      f"{meta_path} not found: expected a complete cache written by "
      "`python -m dpo_jax.data.cache` (meta.json is written last)."
    )
  info = json.loads(meta_path.read_text())
  if info.get("format") != FORMAT:
    raise FileNotFoundError(
      f"{meta_path}: cache format {info.get('format')}, expected {FORMAT}; rewrite the cache."
    )
  if split not in info["splits"]:
    raise FileNotFoundError(
      f"Cache {cache_dir} has no {split!r} split (it has {sorted(info['splits'])})."
    )
  n, size = info["splits"][split], info["shard_size"]
  split_dir = root / split
  shard_dirs = [split_dir / SHARD.format(k) for k in range(-(-n // size))]
  done = {p.parent.name for p in split_dir.glob(f"shard-*/{SHARD_DONE}")}
  missing = [p for p in shard_dirs if p.name not in done]
  if missing:
    raise FileNotFoundError(
      f"Cache {cache_dir} is incomplete: {len(missing)} of {len(shard_dirs)} {split} shards "
      f"missing (first: {missing[0]}); rerun `python -m dpo_jax.data.cache` to finish it."
    )
  arrays = {
    k: ShardedArray([d / f"{k}.npy" for d in shard_dirs], size, n, spec["shape"], spec["dtype"])
    for k, spec in info["arrays"].items()
    if k != "example_id"
  }
  uncond = {k: _read_npy(root / UNCOND / f"{k}.npy", s) for k, s in info["uncond"].items()}
  return arrays, uncond, info


def select_arrays(arrays: dict[str, Any], cache_dir: str, rpo_embedding: str) -> dict[str, Any]:
  """The cache arrays a run reads: the RPO features only for `rpo_embedding` ("" = none)."""
  from dpo_jax.data import encode

  needed = encode.rpo_feature_keys(rpo_embedding) if rpo_embedding else ()
  missing = [k for k in needed if k not in arrays]
  if missing:
    hint = (
      "write it with --config.rpo.clip_path=CLIP_DIR"
      if "rpo_image_w" in missing
      else "rewrite it with this version of `python -m dpo_jax.data.cache`"
    )
    raise ValueError(
      f"Cache {cache_dir} has no {missing} for rpo.embedding={rpo_embedding!r}: {hint}, "
      "or train RPO with data.source='pickapic'."
    )
  return {k: v for k, v in arrays.items() if k not in encode.RPO_FEATURE_KEYS or k in needed}


def to_step_batch(flat: dict[str, Any], rpo_embedding: str = "") -> dict[str, Any]:
  """Flat cache rows -> the step's batch format (SDXL extras under added_cond).

  rpo_embedding (objective "rpo"): adds `rpo_embeds` from the cached features.
  """
  from dpo_jax.data import encode  # The encoders' modules, only for the writer and RPO.

  out = {k: flat[k] for k in ("latents_w", "latents_l", "context")}
  if "text_embeds" in flat:
    out["added_cond"] = {"text_embeds": flat["text_embeds"], "time_ids": flat["time_ids"]}
  if rpo_embedding:
    feats = {k: flat[k] for k in encode.rpo_feature_keys(rpo_embedding) if k in flat}
    out = encode.with_rpo_embeds({**out, **feats}, rpo_embedding)
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from dpo_jax import preflight
  from dpo_jax.models import build as build_lib

  config, output = flags.FLAGS.config, flags.FLAGS.output
  preflight.preflight(config, source="pickapic")  # It reads parquet shards through the encoders.
  distributed.initialize_from_flags()  # Several processes split the shards.
  n = write_cache(
    config,
    build_lib.build_models(config, with_encoders=True),
    output,
    shard_size=flags.FLAGS.shard_size,
    encode_batch=flags.FLAGS.encode_batch,
  )
  logging.info("Cache of %d examples complete in %s.", n, output)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module
  # (the trainer does) never clashes with another entry point's flags.
  import sys

  from ml_collections import config_flags

  from dpo_jax import preflight

  preflight.check_config_args(sys.argv)  # One line for a misspelt --config.FIELD.
  distributed.define_flags()
  config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
  flags.DEFINE_string("output", None, "Cache directory to write (any etils.epath path: gs://...).")
  flags.DEFINE_integer("shard_size", 256, "Examples per cache shard (the unit of resumption).")
  flags.DEFINE_integer(
    "encode_batch",
    8,
    "Pairs per encoder call: bounds the VAE's device memory (XLA's estimate for the SD VAE "
    "in bf16: ~0.75 GiB per pair at 512 px, ~3 GiB at 1024 px).",
  )
  flags.mark_flags_as_required(["config", "output"])
  preflight.run(main)  # app.run, with one-line errors for flag mistakes and bad inputs.
