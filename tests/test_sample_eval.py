"""In-training sample evaluation: fixed prompts and seeds, scored with the evaluate scorers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpo_jax import sample
from dpo_jax.data import style
from dpo_jax.models import conditioning, loader
from dpo_jax.toy import prefs, reward, world
from tests.test_toy_pipeline import random_toy_pipeline  # noqa: F401 (fixture)


def _toy_pairs(directory: str) -> list[str]:
  """A small Pick-a-Pic parquet of rendered toy images; -> its prompts."""
  specs = world.all_specs()[:4]
  images = world.render_batch(specs * 4, seed=0)
  prompts = [s.text for s in specs * 4]
  n = len(specs)
  pairs = [(i, i + n, 1.0) for i in range(3 * n)]
  prefs.write_parquet(directory, images, prompts, list(range(4 * n)), pairs)
  return [s.text for s in specs]


def test_trainer_logs_sample_eval_scores_of_the_current_params(random_toy_pipeline, tmp_path):  # noqa: F811
  from configs import toy as toy_config
  from dpo_jax import trainer

  texts = _toy_pairs(str(tmp_path / "pairs"))
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("\n".join(texts[:2]) + "\n")
  c = toy_config.get_config()
  c.unlock()
  c.pretrained_path = random_toy_pipeline
  c.data.path = str(tmp_path / "pairs")
  c.data.global_batch_size = 8
  c.data.eval_batch_size = 8
  c.max_steps = 2
  c.eval_every = 0
  c.checkpoint_every = 2
  c.log_every = 1
  se = c.sample_eval
  se.every = 1
  se.prompts = str(prompt_file)
  se.images_per_prompt = 3
  se.seed = 7
  se.num_inference_steps = 4
  se.scorers = "toy_reward,style_amber_duotone"
  workdir = tmp_path / "run"
  result = trainer.train_and_evaluate(c, str(workdir))

  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r for r in rows if "sample_eval/toy_reward" in r}
  assert sorted(logged) == [1, 2]
  assert sorted(os.listdir(workdir / "sample_eval")) == ["step_0000001.png", "step_0000002.png"]
  # Independent recomputation at the last step: same prompts, seeds (seed + j), settings.
  prompts = [p for p in texts[:2] for _ in range(3)]
  seeds = [7 + j for _ in range(2) for j in range(3)]
  images = sample.generate(
    loader.load_pipeline(random_toy_pipeline),
    result["state"].params,
    prompts,
    seeds,
    sample.SampleSettings(num_inference_steps=4, guidance_scale=se.guidance_scale, batch_size=16),
  )
  want_reward = reward.reward(images, [world.parse_prompt(p) for p in prompts]).mean()
  assert logged[2]["sample_eval/toy_reward"] == pytest.approx(want_reward, abs=1e-5)
  want_style = style.palette_score(images).mean()
  assert logged[2]["sample_eval/style_amber_duotone"] == pytest.approx(want_style, abs=1e-5)
  assert result["eval"]["sample_eval/toy_reward"] == logged[2]["sample_eval/toy_reward"]


def test_sample_eval_needs_a_pipeline():
  from dpo_jax import sample_eval
  from tests.fixtures import make_train_config

  config = make_train_config(**{"sample_eval.every": 5})
  with pytest.raises(ValueError, match="needs config.pretrained_path"):
    sample_eval.make_sample_eval(config, "/tmp/unused", sample.make_mesh())
  config.sample_eval.every = 0
  assert sample_eval.make_sample_eval(config, "/tmp/unused", sample.make_mesh()) is None


def test_share_encoders_uses_the_placed_arrays(random_toy_pipeline):  # noqa: F811
  """The trainer hands its replicated data-encoder params over: no second device copy."""
  import jax

  from configs import toy as toy_config
  from dpo_jax import sample_eval, sharding

  c = toy_config.get_config()
  c.unlock()
  c.pretrained_path = random_toy_pipeline
  c.sample_eval.every = 1
  mesh = sample.make_mesh()
  ev = sample_eval.make_sample_eval(c, "/tmp/unused", mesh)
  assert ev.frozen is None
  # What the data side places: the encoders, plus RPO's CLIP tower when used.
  data_frozen = {
    **conditioning.frozen_params(ev.pipeline),
    "rpo_clip": {"w": np.ones(3, np.float32)},
  }
  placed = jax.device_put(data_frozen, sharding.replicated(mesh))
  ev.share_encoders(placed)
  assert set(ev.frozen) == set(conditioning.frozen_params(ev.pipeline)) == {"text_encoder"}
  for got, want in zip(jax.tree.leaves(ev.frozen), jax.tree.leaves(placed["text_encoder"])):
    assert got is want


def test_sampling_over_two_processes_with_fsdp_params_matches_one_process(tmp_path):
  """The in-training sampling path: a 2-process mesh, FSDP-sharded UNet, all images everywhere.

  Process 1 compiles the sampler 40 s slower: gloo gives a late peer 30 s, `generate` waits.
  """
  from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline
  from tests import multihost_worker as worker
  from tests.fixtures import run_two_processes

  pipe_dir = make_tiny_pipeline("sd15", str(tmp_path / "pipe"), seed=3)
  out = str(tmp_path / "images")
  run_two_processes("sample", pipe_dir, out, timeout=600, slow_compile_s=40)
  per_process = [np.load(f"{out}.{p}.npy") for p in range(2)]
  np.testing.assert_array_equal(per_process[0], per_process[1])

  pipe = loader.load_pipeline(pipe_dir)
  settings = sample.SampleSettings(**worker.SAMPLE_SETTINGS)  # 8 local devices, replicated.
  fn = sample.make_sample_fn(pipe, settings, "float")
  want = sample.generate(
    pipe, pipe.unet_params, worker.SAMPLE_PROMPTS, worker.SAMPLE_SEEDS, settings, sample_fn=fn
  )
  assert per_process[0].shape == want.shape == (5, 32, 32, 3)
  np.testing.assert_allclose(per_process[0], want, atol=1e-5)
  assert np.std(want, axis=0).mean() > 1e-2  # Distinct prompts and seeds, distinct images.
