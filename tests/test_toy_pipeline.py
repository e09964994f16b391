"""Toy world end to end: pixel-space pipeline, sampling, pairs, and DPO improving the base."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from dpo_jax import sample
from dpo_jax.data import encode
from dpo_jax.models import loader
from dpo_jax.toy import base, prefs, world


@pytest.fixture(scope="module")
def random_toy_pipeline(tmp_path_factory) -> str:
  """An untrained toy pipeline folder."""
  return base.write_random_pipeline(str(tmp_path_factory.mktemp("toy_random")))


def test_pixel_space_pipeline_loads_without_vae(random_toy_pipeline):
  pipe = loader.load_pipeline(random_toy_pipeline)
  assert pipe.vae is None and pipe.vae_params is None and pipe.vae_scaling_factor == 1.0
  assert pipe.scheduler_config["prediction_type"] == "v_prediction"
  assert pipe.tokenizer.model_max_length == base.MAX_TOKENS
  assert sample.image_size(pipe) == 16 and sample.latent_shape(pipe) == (3, 16, 16)
  # The encode stage passes images through as NCHW "latents".
  raw = {
    "pixels_w": np.linspace(-1, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3),
    "pixels_l": np.zeros((2, 16, 16, 3), np.float32),
    "input_ids": encode.make_tokenize_fn(pipe)(["a red circle at the top left", ""]),
  }
  out = encode.encode_batch(pipe, encode.frozen_params(pipe), raw, 16)
  np.testing.assert_array_equal(out["latents_w"], raw["pixels_w"].transpose(0, 3, 1, 2))
  assert out["context"].shape == (2, base.MAX_TOKENS, 32)


def test_pipeline_without_vae_entry_is_an_error(random_toy_pipeline, tmp_path):
  import json
  import shutil

  broken = tmp_path / "broken"
  shutil.copytree(random_toy_pipeline, broken)
  index = json.loads((broken / "model_index.json").read_text())
  del index["vae"]
  (broken / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"broken/model_index.json has no 'vae' entry"):
    loader.load_pipeline(str(broken))


def test_generate_is_per_seed_and_batch_independent(random_toy_pipeline):
  pipe = loader.load_pipeline(random_toy_pipeline)
  prompts = ["a red circle at the top left", "a blue square at the bottom right", "a green x"]
  settings = sample.SampleSettings(num_inference_steps=3, guidance_scale=2.0, batch_size=2)
  a = sample.generate(pipe, pipe.unet_params, prompts, [5, 6, 7], settings)
  assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
  # Same (prompt, seed) in another order and batch layout -> the same image.
  b = sample.generate(
    pipe, pipe.unet_params, prompts[::-1], [7, 6, 5], sample.SampleSettings(3, 2.0, 3)
  )
  np.testing.assert_allclose(a.astype(int), b[::-1].astype(int), atol=1)
  # Another seed gives another image.
  c = sample.generate(pipe, pipe.unet_params, prompts[:1], [8], settings)
  assert np.abs(c[0].astype(int) - a[0].astype(int)).max() > 5
  with pytest.raises(ValueError, match="one seed per image"):
    sample.generate(pipe, pipe.unet_params, prompts, [1], settings)


def test_sample_cli_writes_images_grid_and_metadata(random_toy_pipeline, tmp_path):
  import subprocess
  import sys

  from PIL import Image

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "a red circle at the top left"}\n{"caption": "a blue square"}\n')
  out = tmp_path / "out"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "dpo_jax.sample", f"--pipeline={random_toy_pipeline}"]
  cmd += [f"--prompts={prompts}", f"--output={out}", "--num_images_per_prompt=2", "--seed=3"]
  cmd += ["--num_inference_steps=3", "--guidance_scale=2", "--batch_size=4"]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": repo}
  subprocess.run(cmd, check=True, env=env, cwd=repo, capture_output=True, timeout=600)
  rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
  assert [(r["prompt"], r["seed"]) for r in rows] == [
    ("a red circle at the top left", 3),
    ("a red circle at the top left", 4),
    ("a blue square", 3),
    ("a blue square", 4),
  ]
  pipe = loader.load_pipeline(random_toy_pipeline)
  expect = sample.generate(
    pipe,
    pipe.unet_params,
    [r["prompt"] for r in rows],
    [r["seed"] for r in rows],
    sample.SampleSettings(3, 2.0, 4),
  )
  for r, e in zip(rows, expect):
    got = np.asarray(Image.open(out / r["file"]))
    np.testing.assert_allclose(got.astype(int), e.astype(int), atol=1)
  assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 18, 2 * 18, 3)


def test_missing_checkpoint_names_the_path(tmp_path):
  from dpo_jax import checkpoint

  with pytest.raises(FileNotFoundError, match=f"No checkpoint at {tmp_path}"):
    checkpoint.resolve_step_dir(str(tmp_path))


def test_label_pairs_hand_example():
  rewards = np.array([0.9, 0.2, 0.9005, 0.5, -0.4])
  groups = ["p", "p", "p", "q", "q"]
  pairs, counts = prefs.label_pairs(rewards, groups, min_gap=0.3, tie_tol=1e-3)
  # p: (0,1) gap .7 -> 0 wins; (0,2) gap -5e-4 -> tie; (1,2) gap -.7005 -> 2 wins.
  # q: (3,4) gap .9 -> 3 wins.
  assert pairs == [(0, 1, 1.0), (0, 2, 0.5), (1, 2, 0.0), (3, 4, 1.0)]
  assert counts == {"preference": 3, "tie": 1, "ambiguous": 0}
  _, counts = prefs.label_pairs(np.array([0.0, 0.1]), ["p", "p"], 0.3, 1e-3)
  assert counts == {"preference": 0, "tie": 0, "ambiguous": 1}
  with pytest.raises(ValueError, match="NaN"):
    prefs.label_pairs(np.array([0.0, np.nan]), ["p", "p"], 0.3, 1e-3)


def test_write_parquet_round_trip(tmp_path):
  specs = world.all_specs()[:2]
  images = world.render_batch(specs * 2, seed=0)
  prompts = [s.text for s in specs * 2]
  path = prefs.write_parquet(str(tmp_path), images, prompts, [1, 1, 2, 2], [(0, 2, 0.0)])
  table = pq.read_table(path).to_pylist()
  assert len(table) == 1 and table[0]["caption"] == prompts[0]
  assert (table[0]["label_0"], table[0]["label_1"]) == (0.0, 1.0)
  assert table[0]["best_image_uid"] == f"{prompts[2]}|2"
  from dpo_jax.data import decode

  np.testing.assert_array_equal(np.asarray(decode.decode_rgb(table[0]["jpg_1"])[0]), images[2])


# ------------------------------------------------------- reduced end-to-end run


def test_reduced_toy_run_dpo_raises_train_prompt_reward(tmp_path):
  """Pretrain a small base, sample + label pairs, DPO through the trainer, re-score.

  A reduced version of `python -m dpo_jax.toy`: fewer pretraining steps,
  seeds and DPO steps, through the same code path (parquet -> TFDS -> grain ->
  trainer). The assertion is the direction: DPO raises the mean reward of the
  training prompts on fresh seeds.
  """
  from configs import toy as toy_config
  from dpo_jax import checkpoint, trainer
  from dpo_jax.toy import run

  c = toy_config.get_config()
  c.unlock()
  c.toy.cache_dir = str(tmp_path / "cache")
  c.toy.base_steps = REDUCED["base_steps"]
  c.toy.pair_seeds = REDUCED["pair_seeds"]
  c.toy.pair_prompts = REDUCED["pair_prompts"]
  c.toy.sample_steps = REDUCED["sample_steps"]
  c.max_steps = REDUCED["dpo_steps"]
  c.data.global_batch_size = 8
  c.data.eval_batch_size = 8
  c.eval_every = 0
  c.checkpoint_every = REDUCED["dpo_steps"]
  c.log_every = 5
  c = run.materialize(c)
  with open(os.path.join(c.data.path, "pairs_report.json")) as f:
    report = json.load(f)
  assert report["rows_written"] >= 8 * REDUCED["dpo_steps"] // 4, report
  result = trainer.train_and_evaluate(c, str(tmp_path / "dpo"))
  assert result["state"].step == REDUCED["dpo_steps"]
  # What `python -m dpo_jax.sample --checkpoint=WORKDIR` reads back: the final params.
  restored, meta = checkpoint.load_params_for_inference(str(tmp_path / "dpo"))
  assert meta["step"] == REDUCED["dpo_steps"] and meta["config"]["pretrained_path"]
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(result["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  pipe = loader.load_pipeline(c.pretrained_path)
  scored = run.score_models(
    pipe,
    {"base": pipe.unet_params, "dpo": result["state"].params},
    run.pair_prompts(c.toy),
    list(range(10_000, 10_000 + REDUCED["eval_seeds"])),
    run.sample_settings(c.toy),
  )
  base_r, dpo_r = scored["base"][1], scored["dpo"][1]
  print(f"reduced toy run: base {base_r.mean():.3f} -> dpo {dpo_r.mean():.3f}")
  assert dpo_r.mean() > base_r.mean() + 0.02, (base_r.mean(), dpo_r.mean())

  # Style alignment on the same base: DPO on (amber duotone > original) pairs
  # built from the pairs' images moves fresh samples toward the palette.
  c.toy.style = "amber_duotone"
  c.data.path = ""
  c.max_steps = c.checkpoint_every = REDUCED["style_steps"]
  c = run.materialize(c)
  with open(os.path.join(c.data.path, "style_report.json")) as f:
    assert json.load(f)["splits"]["train"]["pairs_written"] >= 8
  styled = trainer.train_and_evaluate(c, str(tmp_path / "style"))["state"].params
  heldout = run.train_and_heldout(c.toy)[1]
  seeds = list(range(10_000, 10_000 + REDUCED["eval_seeds"]))
  scored = run.score_models(
    pipe, {"base": pipe.unet_params, "style": styled}, heldout, seeds, run.sample_settings(c.toy)
  )
  prompts = [p.text for p in run.grid_specs(heldout, seeds)[0]]
  summary = run.summarize(run.style_scores(scored, "amber_duotone"), prompts, "base")
  print("reduced toy style run (held-out prompts):", summary)
  assert summary["style"]["mean_reward"] > summary["base"]["mean_reward"] + 0.02
  assert summary["style"]["vs_base"]["win_rate_ci_low"] > 0.5


REDUCED = {
  "base_steps": 100,
  "pair_seeds": 8,
  "pair_prompts": 8,
  "sample_steps": 10,
  "dpo_steps": 30,
  "style_steps": 20,
  "eval_seeds": 6,
}
