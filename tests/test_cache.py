"""Latent cache: resumable writing in bounded micro-batches, a held-out eval
split, equality with the raw-image path, training from it (bf16 and gs:// too).

The cache is written with a tiny CLIP folder as `rpo.clip_path`, so it also
holds Diffusion-RPO's frozen features, and the training run is an RPO run.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dpo_jax import step as step_lib
from dpo_jax import trainer
from dpo_jax.data import cache, encode, pickapic, pipeline, sources
from dpo_jax.models import build as build_lib
from dpo_jax.models import conditioning
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline
from tests.fixtures import (
  tiny_pipeline_train_config,
  write_pickapic_splits,
)
from tests.test_scorers import write_tiny_clip

ENCODE_BATCH = 3


def _counting_encoder(calls):
  """Wraps `cache._make_encoder` to record the rows of every encoder call."""
  make = cache._make_encoder

  def make_counting(*args):
    enc = make(*args)

    def counted(frozen, raw):
      calls.append(len(raw["pixels_w"]))
      return enc(frozen, raw)

    return counted

  return make_counting


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  pipe = make_tiny_pipeline("sd15", str(root / "pipe"), seed=0)
  parquet = write_pickapic_splits(root / "parquet", 20)
  config = tiny_pipeline_train_config("sd15", pipe, str(parquet))
  config.data.random_crop = False
  config.data.flip = "none"
  config.data.tfds_dir = str(root / "tfds")
  config.rpo.clip_path = write_tiny_clip(str(root / "clip"))
  models = build_lib.build_models(config, with_encoders=True)
  cache_dir = str(root / "latents")
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(cache, "_make_encoder", _counting_encoder(calls))
    n = cache.write_cache(config, models, cache_dir, shard_size=8, encode_batch=ENCODE_BATCH)
  return config, models, cache_dir, n, calls


def test_cache_is_complete_resumable_and_encoded_in_micro_batches(world):
  config, models, cache_dir, n, calls = world
  assert n == 20
  # Shards of 8, 8, 4 train and 8 validation rows, 3 pairs per encoder call
  # (the last call of a shard padded): never a whole shard in one call.
  assert calls == [ENCODE_BATCH] * (3 + 3 + 2 + 3)
  train = os.path.join(cache_dir, "train")
  shards = sorted(os.listdir(train))
  assert shards == ["shard-00000", "shard-00001", "shard-00002"]
  npy = lambda k, key="latents_w": os.path.join(train, shards[k], f"{key}.npy")  # noqa: E731
  before = [np.load(npy(k)) for k in range(3)]
  mtime = os.path.getmtime(npy(0))
  os.remove(os.path.join(train, "shard-00001", cache.SHARD_DONE))  # As if interrupted.
  with pytest.raises(FileNotFoundError, match="incomplete"):
    cache.read_cache(cache_dir)
  cache.write_cache(config, models, cache_dir, shard_size=8, encode_batch=ENCODE_BATCH)
  for k in range(3):
    np.testing.assert_array_equal(np.load(npy(k)), before[k])
  assert os.path.getmtime(npy(0)) == mtime  # Only the incomplete shard was recomputed.
  arrays, uncond, info = cache.read_cache(cache_dir)
  assert len(arrays["latents_w"]) == 20 and info["kind"] == "sd15"
  assert info["splits"] == {"train": 20, "validation_unique": 8}
  assert uncond["context"].shape == arrays["context"].shape[1:]
  # The eval split holds the validation rows, none of the train rows.
  val_ids = np.load(os.path.join(cache_dir, "validation_unique", "shard-00000", "example_id.npy"))
  train_ids = np.concatenate([np.load(npy(k, "example_id")) for k in range(3)])
  np.testing.assert_array_equal(val_ids, np.arange(5000, 5008))
  np.testing.assert_array_equal(train_ids, np.arange(1000, 1020))


def test_training_data_never_evaluates_on_training_rows(world):
  config, _, cache_dir, _, _ = world
  config = config.copy_and_resolve_references()
  config.data.source, config.data.cache_dir = "cache", cache_dir
  data = sources.make_data(config, None, "")
  val, _, _ = cache.read_cache(cache_dir, "validation_unique")
  for k in ("latents_w", "context"):
    np.testing.assert_array_equal(data.eval_batch[k], val[k][np.arange(8)])
  assert data.train.get_state()["num_examples"] == 20
  # No such split cached: the last 8 train rows are held out of training.
  config.data.eval_split = "test_unique"
  config.data.global_batch_size = 4
  data = sources.make_data(config, None, "")
  train, _, _ = cache.read_cache(cache_dir)
  held = train["context"][np.arange(12, 20)]
  np.testing.assert_array_equal(data.eval_batch["context"], held)
  assert data.train.get_state()["num_examples"] == 12
  # Two epochs of training rows: all 12 first rows (distinct captions), no held-out one.
  # The iterator yields micro-batches (global_batch_size / grad_accum pairs).
  micro = sources.micro_batch_size(config)
  trained = np.concatenate([next(data.train)["context"] for _ in range(24 // micro)])
  same = (trained.reshape(24, 1, -1) == train["context"][np.arange(20)].reshape(1, 20, -1)).all(-1)
  assert (same.sum(1) == 1).all()  # Each trained row is exactly one cached row...
  np.testing.assert_array_equal(np.unique(same.argmax(1)), np.arange(12))  # ... of rows 0-11.


def test_cache_and_raw_images_give_the_same_loss(world):
  config, models, cache_dir, _, _ = world
  pipe = models.pipeline
  built = pickapic.build_pickapic(config.data.path, config.data.tfds_dir).data_dir
  source = pickapic.open_split(built, "train")
  rows = [3, 7, 11, 19]
  raw = {
    k: np.stack(
      [pipeline.load_example(source, r, 0, 0, 32, random_crop=False, flip="none")[k] for r in rows]
    )
    for k in ("pixels_w", "pixels_l", "original_size", "crop_top_left")
  }
  captions = [
    pipeline.load_example(source, r, 0, 0, 32, random_crop=False, flip="none")["caption"]
    for r in rows
  ]
  raw["input_ids"] = conditioning.make_tokenize_fn(pipe)(captions)
  frozen = conditioning.frozen_params(pipe)
  embedder, frozen["rpo_clip"] = sources.rpo_image_embedder(config)
  from_raw = encode.encode_batch(pipe, frozen, raw, 32, encode.RPO_FEATURE_KEYS, embedder)
  arrays, _, _ = cache.read_cache(cache_dir)
  flat = {k: jnp.asarray(v[np.asarray(rows)]) for k, v in arrays.items()}
  from_cache = cache.to_step_batch(flat)
  assert set(from_cache) == {"latents_w", "latents_l", "context"}

  # The encoders saw batches of 3 (cache) and 4 (here): equal up to float
  # reassociation in XLA's batched kernels.
  for k in ("latents_w", "latents_l", "context"):
    np.testing.assert_allclose(from_raw[k], from_cache[k], rtol=1e-5, atol=1e-5)
  for embedding in ("text", "image", "text+image"):
    want = encode.with_rpo_embeds(from_raw, embedding)["rpo_embeds"]
    got = cache.to_step_batch(flat, embedding)["rpo_embeds"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Distinct captions and images give distinct embeddings (not a constant).
  assert np.ptp(np.asarray(got) @ np.asarray(got).T) > 1e-3
  unet_apply = pipe.unet
  from dpo_jax import optim
  from dpo_jax.models import unet as unet_lib

  tx, lr_fn = optim.make_optimizer(config.optim, 10)
  spec = step_lib.build_step_spec(
    config, unet_lib.make_unet_apply(unet_apply), tx, lr_fn, None, models.scheduler_config
  )
  spec = step_lib.StepSpec(**{**spec.__dict__, "caption_dropout": 0.0})
  params = pipe.unet_params
  ref = jax.tree.map(lambda x: x * 0.98, params)  # So the DPO loss is not just log 2.
  key = jax.random.PRNGKey(5)
  ev = jax.jit(lambda b: step_lib.eval_step(params, ref, b, key, spec=spec))
  a, b = ev(from_raw), ev(from_cache)
  assert not math.isclose(float(a["loss"]), math.log(2.0), abs_tol=1e-4)
  for k in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
    np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5)
  # beta = 5000 multiplies MSE differences of ~1e-7 by 2500 inside the sigmoid.
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-3)


def test_cache_without_rpo_features_is_refused_by_name(world):
  _, _, cache_dir, _, _ = world
  arrays, _, _ = cache.read_cache(cache_dir)
  assert set(cache.select_arrays(arrays, cache_dir, "")).isdisjoint(encode.RPO_FEATURE_KEYS)
  assert "rpo_image_w" not in cache.select_arrays(arrays, cache_dir, "text")
  no_clip = {k: v for k, v in arrays.items() if not k.startswith("rpo_image")}
  assert "rpo_text" in cache.select_arrays(no_clip, cache_dir, "text")
  with pytest.raises(ValueError, match=r"rpo_image_w.*rpo.clip_path=CLIP_DIR"):
    cache.select_arrays(no_clip, cache_dir, "text+image")


def test_bf16_cache_on_gs_trains_rpo_without_encoders(world, memory_gcs, tmp_path):
  """The shipped configs compute in bf16: the cache keeps bf16 (not raw bytes), also on
  gs://, and an RPO run trains from it without loading an encoder."""
  config, _, _, _, _ = world
  config = config.copy_and_resolve_references()
  config.precision.compute_dtype = "bfloat16"
  models = build_lib.build_models(config, with_encoders=True)
  gs_dir = "gs://bucket/bf16_cache"
  cache.write_cache(config, models, gs_dir, shard_size=16, encode_batch=8)
  assert memory_gcs.exists(f"{gs_dir}/train/shard-00001/latents_w.npy")
  arrays, uncond, _ = cache.read_cache(gs_dir)
  for k in ("latents_w", "latents_l", "context"):
    assert arrays[k].dtype == ml_dtypes.bfloat16, k
  assert uncond["context"].dtype == ml_dtypes.bfloat16
  # The stored values are the bf16 encoder's outputs for those rows.
  built = pickapic.build_pickapic(config.data.path, config.data.tfds_dir).data_dir
  source = pickapic.open_split(built, "train")
  pipe, rows = models.pipeline, np.arange(8)
  examples = [
    pipeline.load_example(source, r, 0, 0, 32, random_crop=False, flip="none") for r in rows
  ]
  raw = {k: np.stack([e[k] for e in examples]) for k in ("pixels_w", "pixels_l")}
  raw["input_ids"] = conditioning.make_tokenize_fn(pipe)([e["caption"] for e in examples])
  want = jax.jit(lambda p, r: encode.encode_batch(pipe, p, r, 32))(
    conditioning.frozen_params(pipe), raw
  )
  for k in ("latents_w", "latents_l", "context"):
    assert want[k].dtype == jnp.bfloat16
    got = arrays[k][rows].astype(np.float32)
    np.testing.assert_allclose(got, np.asarray(want[k], np.float32), rtol=2e-2, atol=2e-2)
    assert np.abs(got).max() > 0.05  # Not zeros.

  config.data.source, config.data.cache_dir = "cache", gs_dir
  # The bf16 arrays feed a float32 step: bf16 convolutions are slow on CPU,
  # and what failed (raw "V2" bytes reaching JAX) is the same either way.
  config.precision.compute_dtype = "float32"
  config.objective = "rpo"
  config.rpo.embedding = "text+image"
  config.rpo.clip_path = ""  # The cache already holds the image features.
  config.optim.grad_accum = 1
  config.optim.warmup_frac = 0.0  # Step 1 already moves the policy.
  config.max_steps = 2
  config.checkpoint_every = 2
  assert build_lib.build_models(config).pipeline is None
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  history = result["history"]
  # RPO's step-0 loss is log 2 like DPO's (policy == reference); the policy
  # and reference forwards are separate XLA programs whose ~1e-9 rounding
  # differences beta = 5000 scales up in the off-diagonal terms.
  assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
  assert abs(history[1]["loss"] - math.log(2.0)) > 1e-4  # The policy moved.
  # The cached features give distinct pairs: each row spreads weight over a few.
  assert 1.0 < history[0]["rpo_neighbours"] < config.data.global_batch_size
  assert 0.0 < result["eval"]["rpo_offdiag_weight"] < 1.0


def test_two_processes_write_the_cache_one_process_writes(world, tmp_path):
  """`python -m dpo_jax.data.cache` as two processes of one jax.distributed job: both
  build their share of the dataset and of the shards (no race), and the cache equals the
  one-process cache of the `world` fixture, array for array."""
  import sys

  from tests.fixtures import REPO, _run_pair

  config, _, one_dir, _, _ = world
  two_dir = str(tmp_path / "two")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  overrides = {
    "pretrained_path": config.pretrained_path,
    "data.path": config.data.path,
    "data.tfds_dir": str(tmp_path / "tfds"),
    "data.resolution": 32,
    "data.random_crop": False,
    "data.flip": "none",
    "rpo.clip_path": config.rpo.clip_path,
    "precision.compute_dtype": "float32",
    "precision.ref_dtype": "float32",
  }

  def command(pid, port):
    args = [sys.executable, "-m", "dpo_jax.data.cache", "--config=configs/sd15.py"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    args += [f"--output={two_dir}", "--shard_size=8", f"--encode_batch={ENCODE_BATCH}"]
    args += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return args + [f"--process_id={pid}"], env

  _run_pair(command, timeout=400)
  for split in ("train", "validation_unique"):
    one, _, info_one = cache.read_cache(one_dir, split)
    two, uncond_two, info_two = cache.read_cache(two_dir, split)
    assert set(one) == set(two) and len(two["latents_w"]) == len(one["latents_w"])
    rows = np.arange(len(one["latents_w"]))
    for k in one:
      np.testing.assert_array_equal(two[k][rows], one[k][rows], err_msg=k)
  assert info_two["splits"] == info_one["splits"] == {"train": 20, "validation_unique": 8}
  # Both processes wrote shards: process 1 took shard 1 of train.
  assert sorted(os.listdir(os.path.join(two_dir, "train"))) == [
    "shard-00000",
    "shard-00001",
    "shard-00002",
  ]
