"""Latent cache: resumable writing, equality with the raw-image path, training from it.

The cache is written with a tiny CLIP folder as `rpo.clip_path`, so it also
holds Diffusion-RPO's frozen features, and the training run is an RPO run.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import step as step_lib
from dpo_jax import trainer
from dpo_jax.data import cache, encode, pickapic, pipeline, sources
from dpo_jax.models import build as build_lib
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline
from tests.fixtures import good_rows, tiny_pipeline_train_config, write_parquet
from tests.test_scorers import write_tiny_clip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  pipe = make_tiny_pipeline("sd15", str(root / "pipe"), seed=0)
  parquet = root / "parquet"
  parquet.mkdir()
  write_parquet(str(parquet / "train-00000-of-00001.parquet"), good_rows(20)[0])
  config = tiny_pipeline_train_config("sd15", pipe, str(parquet))
  config.data.random_crop = False
  config.data.flip = "none"
  config.data.tfds_dir = str(root / "tfds")
  config.rpo.clip_path = write_tiny_clip(str(root / "clip"))
  models = build_lib.build_models(config, with_encoders=True)
  cache_dir = str(root / "latents")
  n = cache.write_cache(config, models, cache_dir, shard_size=8)
  return config, models, cache_dir, n


def test_cache_is_complete_and_resumable(world):
  config, models, cache_dir, n = world
  assert n == 20
  shards = sorted(f for f in os.listdir(cache_dir) if f.startswith("shard-"))
  assert shards == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
  before = {f: np.load(os.path.join(cache_dir, f))["latents_w"] for f in shards}
  mtimes = {f: os.path.getmtime(os.path.join(cache_dir, f)) for f in shards}
  os.remove(os.path.join(cache_dir, "shard-00001.npz"))
  with pytest.raises(FileNotFoundError, match="incomplete"):
    cache.read_cache(cache_dir)
  cache.write_cache(config, models, cache_dir, shard_size=8)
  for f in shards:
    np.testing.assert_array_equal(np.load(os.path.join(cache_dir, f))["latents_w"], before[f])
  # Only the missing shard was recomputed.
  assert os.path.getmtime(os.path.join(cache_dir, "shard-00000.npz")) == mtimes["shard-00000.npz"]
  arrays, uncond, info = cache.read_cache(cache_dir)
  assert len(arrays["latents_w"]) == 20 and info["kind"] == "sd15"
  assert uncond["context"].shape == arrays["context"].shape[1:]


def test_cache_and_raw_images_give_the_same_loss(world):
  config, models, cache_dir, _ = world
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
  raw["input_ids"] = encode.make_tokenize_fn(pipe)(captions)
  frozen = encode.frozen_params(pipe)
  embedder, frozen["rpo_clip"] = sources.rpo_image_embedder(config)
  from_raw = encode.encode_batch(pipe, frozen, raw, 32, encode.RPO_FEATURE_KEYS, embedder)
  arrays, _, _ = cache.read_cache(cache_dir)
  flat = {k: jnp.asarray(v[np.asarray(rows)]) for k, v in arrays.items()}
  from_cache = cache.to_step_batch(flat)
  assert set(from_cache) == {"latents_w", "latents_l", "context"}

  # The encoders saw batches of 8 (cache) and 4 (here): equal up to float
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
  _, _, cache_dir, _ = world
  arrays, _, _ = cache.read_cache(cache_dir)
  assert set(cache.select_arrays(arrays, cache_dir, "")).isdisjoint(encode.RPO_FEATURE_KEYS)
  assert "rpo_image_w" not in cache.select_arrays(arrays, cache_dir, "text")
  no_clip = {k: v for k, v in arrays.items() if not k.startswith("rpo_image")}
  assert "rpo_text" in cache.select_arrays(no_clip, cache_dir, "text")
  with pytest.raises(ValueError, match=r"rpo_image_w.*rpo.clip_path=CLIP_DIR"):
    cache.select_arrays(no_clip, cache_dir, "text+image")


def test_rpo_training_from_cache_loads_no_encoders(world, tmp_path):
  config, _, cache_dir, _ = world
  config = config.copy_and_resolve_references()
  config.data.source = "cache"
  config.data.cache_dir = cache_dir
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
