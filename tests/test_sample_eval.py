"""In-training sample evaluation: fixed prompts and seeds, scored with the evaluate scorers."""

from __future__ import annotations

import json
import os

import pytest

from dpo_jax import sample
from dpo_jax.data import style
from dpo_jax.models import loader
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
    sample_eval.make_sample_eval(config, "/tmp/unused")
  config.sample_eval.every = 0
  assert sample_eval.make_sample_eval(config, "/tmp/unused") is None
