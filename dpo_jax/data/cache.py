"""Precomputed latent / text-embedding cache, and training from it.

  python -m dpo_jax.data.cache --config=configs/sd15.py --output=DIR \\
      --config.pretrained_path=... --config.data.path=...

encodes every checked example of the train split once, with a fixed centre
crop and no flip, through the frozen VAE (posterior mean) and text encoder(s)
into `DIR/shard-XXXXX.npz` files plus `DIR/meta.npz` (empty-prompt
conditioning, shapes, settings). Shards are written atomically (temp file +
rename) and existing ones are skipped, so an interrupted run resumes; with
several processes, process p writes shards p, p+P, ... Training with
`--config.data.source=cache --config.data.cache_dir=DIR` then reads only the
UNet from `pretrained_path`: the VAE and text encoders are never loaded.
Augmentation is what a cache gives up (one crop, no flips); that is the
trade the reference trainers make too.

For Diffusion-RPO the cache also keeps the frozen features behind its pair
embedding: the pooled prompt embedding (`rpo_text`, always) and, when the
cache is written with `--config.rpo.clip_path=CLIP_DIR`, that CLIP image
tower's features of both images (`rpo_image_w/l`), so every `rpo.embedding`
trains from the cache without loading an encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from dpo_jax.data import encode, pipeline

SHARD = "shard-{:05d}.npz"
META = "meta.npz"


def _shard_examples(source, rows: Sequence[int], resolution: int, tokenize) -> dict[str, Any]:
  examples = [
    pipeline.load_example(source, r, 0, 0, resolution, random_crop=False, flip="none") for r in rows
  ]
  batch = {
    k: np.stack([e[k] for e in examples])
    for k in ("pixels_w", "pixels_l", "original_size", "crop_top_left", "example_id")
  }
  batch["input_ids"] = np.asarray(tokenize([e["caption"] for e in examples]), np.int32)
  return batch


def write_cache(
  config: ml_collections.ConfigDict,
  models,
  output: str,
  split: str = "train",
  shard_size: int = 256,
) -> int:
  """Encodes `split` into `output`; returns the number of examples in the cache."""
  from dpo_jax.data import build, pickapic

  pipe = models.pipeline
  built = build.prepare_dataset(config, config.data.tfds_dir or os.path.join(output, "tfds"))
  source = pickapic.open_split(built, split)
  n = len(source)
  res = config.data.resolution
  tokenize = encode.make_tokenize_fn(pipe)
  frozen = encode.frozen_params(pipe)
  features, embedder = ("rpo_text",), None
  if config.rpo.clip_path:
    features = encode.RPO_FEATURE_KEYS
    embedder, frozen["rpo_clip"] = encode.rpo_image_embedder(config)
  enc = jax.jit(lambda p, raw: encode.encode_batch(pipe, p, raw, res, features, embedder))
  os.makedirs(output, exist_ok=True)
  num_shards = -(-n // shard_size)
  for k in range(jax.process_index(), num_shards, jax.process_count()):
    path = os.path.join(output, SHARD.format(k))
    if os.path.exists(path):
      continue  # Written by an earlier (interrupted) run.
    rows = range(k * shard_size, min(n, (k + 1) * shard_size))
    raw = _shard_examples(source, rows, res, tokenize)
    out = jax.device_get(enc(frozen, encode.device_keys(raw)))
    arrays = {
      "latents_w": out["latents_w"],
      "latents_l": out["latents_l"],
      "context": out["context"],
      "example_id": raw["example_id"],
      **{k: out[k] for k in features},
    }
    if "added_cond" in out:
      arrays["text_embeds"] = out["added_cond"]["text_embeds"]
      arrays["time_ids"] = out["added_cond"]["time_ids"]
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    logging.info("Cache shard %d/%d: %d examples -> %s", k + 1, num_shards, len(rows), path)
  if jax.process_index() == 0:
    uncond = encode.empty_prompt_conditioning(pipe)
    meta = {f"uncond_{k}": v for k, v in uncond.items()}
    info = {"num_examples": n, "shard_size": shard_size, "resolution": res, "kind": pipe.kind}
    info["pretrained_path"] = config.pretrained_path
    info["rpo_clip_path"] = config.rpo.clip_path
    np.savez(os.path.join(output, META), info=json.dumps(info), **meta)
  return n


class ShardedArray:
  """Read-only row gather over the same array in many .npz shards (memory-mapped)."""

  def __init__(self, paths: Sequence[str], key: str):
    self._parts = [np.load(p, mmap_mode="r")[key] for p in paths]
    self._starts = np.cumsum([0] + [len(p) for p in self._parts])
    self.shape = (int(self._starts[-1]),) + self._parts[0].shape[1:]
    self.dtype = self._parts[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.atleast_1d(np.asarray(idx))
    part = np.searchsorted(self._starts, idx, side="right") - 1
    return np.stack([self._parts[p][i - self._starts[p]] for p, i in zip(part, idx)])


def read_cache(cache_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
  """-> (arrays {key: ShardedArray} in the step's flat layout, uncond, info)."""
  meta_path = os.path.join(cache_dir, META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
      f"{meta_path} not found: expected a cache written by `python -m dpo_jax.data.cache`."
    )
  meta = np.load(meta_path)
  info = json.loads(str(meta["info"]))
  num_shards = -(-info["num_examples"] // info["shard_size"])
  paths = [os.path.join(cache_dir, SHARD.format(k)) for k in range(num_shards)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
      f"Cache {cache_dir} is incomplete: {len(missing)} of {len(paths)} shards missing "
      f"(first: {missing[0]}); rerun `python -m dpo_jax.data.cache` to finish it."
    )
  keys = [k for k in np.load(paths[0]).files if k != "example_id"]
  arrays = {k: ShardedArray(paths, k) for k in keys}
  uncond = {k[len("uncond_") :]: meta[k] for k in meta.files if k.startswith("uncond_")}
  return arrays, uncond, info


def select_arrays(arrays: dict[str, Any], cache_dir: str, rpo_embedding: str) -> dict[str, Any]:
  """The cache arrays a run reads: the RPO features only for `rpo_embedding` ("" = none)."""
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
  out = {k: flat[k] for k in ("latents_w", "latents_l", "context")}
  if "text_embeds" in flat:
    out["added_cond"] = {"text_embeds": flat["text_embeds"], "time_ids": flat["time_ids"]}
  if rpo_embedding:
    feats = {k: flat[k] for k in encode.rpo_feature_keys(rpo_embedding) if k in flat}
    out = encode.with_rpo_embeds({**out, **feats}, rpo_embedding)
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from dpo_jax import distributed, preflight
  from dpo_jax.models import build as build_lib

  config, output = flags.FLAGS.config, flags.FLAGS.output
  preflight.preflight(config, source="pickapic")  # It reads parquet shards through the encoders.
  distributed.initialize_from_flags()  # Several processes split the shards.
  n = write_cache(config, build_lib.build_models(config, with_encoders=True), output)
  logging.info("Cache of %d examples complete in %s.", n, output)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module
  # (the trainer does) never clashes with another entry point's flags.
  import sys

  from ml_collections import config_flags

  from dpo_jax import distributed, preflight

  preflight.check_config_args(sys.argv)  # One line for a misspelt --config.FIELD.
  distributed.define_flags()
  config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
  flags.DEFINE_string("output", None, "Cache directory to write.")
  flags.mark_flags_as_required(["config", "output"])
  preflight.run(main)  # app.run, with one-line errors for flag mistakes and bad inputs.
