"""A reduced `python -m dpo_jax.toy`: base, pairs, DPO and style runs, re-scored.

Its own module so that pytest-xdist runs it beside the other toy tests.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest

from dpo_jax.models import loader


@pytest.fixture(scope="module")
def reduced_config(tmp_path_factory):
  """The toy config at the reduced scale, its base and pairs built (in a temporary cache)."""
  from configs import toy as toy_config
  from dpo_jax.toy import run

  c = toy_config.get_config()
  c.unlock()
  c.toy.cache_dir = str(tmp_path_factory.mktemp("toy_cache"))
  c.toy.base_steps = REDUCED["base_steps"]
  c.toy.base_max_steps = 0
  c.toy.pair_seeds = REDUCED["pair_seeds"]
  c.toy.pair_prompts = REDUCED["pair_prompts"]
  c.toy.sample_steps = REDUCED["sample_steps"]
  c.max_steps = REDUCED["dpo_steps"]
  # The reduced recipe's own warmup (3 of 30 steps): the default's 0.4 (40 of 100
  # steps, the tuned checkpoint's schedule) would spend 12 of these 30 warming up.
  c.optim.warmup_frac = 0.1
  c.data.global_batch_size = 8
  c.data.eval_batch_size = 8
  c.eval_every = 0
  c.checkpoint_every = REDUCED["dpo_steps"]
  c.log_every = 5
  return run.materialize(c)


def test_reduced_toy_run_dpo_raises_train_prompt_reward(reduced_config, tmp_path):
  """Pretrain a small base, sample + label pairs, DPO through the trainer, re-score.

  A reduced version of `python -m dpo_jax.toy`: fewer pretraining steps,
  seeds and DPO steps, through the same code path (parquet -> TFDS -> grain ->
  trainer). The assertion is the direction: DPO raises the mean reward of the
  training prompts on fresh seeds (the judge's attribute rates are printed).
  """
  from dpo_jax import checkpoint, trainer
  from dpo_jax.toy import judge, run, world

  c = copy.deepcopy(reduced_config)
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
  # The judge's view, printed but not asserted: issue #17 asks this test to
  # assert that DPO raises the share of attributes drawn right, but at a scale
  # the suite can afford it does not. A base learns the quadrant words only
  # after 750-1500 steps (docs/toy_experiments.md); measured with a 400-step
  # base (batch 16) and 60 DPO steps on 8 prompts x 24 seeds: all three right
  # 5.7 % -> 7.8 %, quadrant 18.8 -> 25.0 %, colour 76 -> 60 %, while the reward
  # rose -1.12 -> -1.02. The full comparison (`python -m dpo_jax.toy`) is where
  # the attribute gain is measured.
  grid = world.grid_specs(run.pair_prompts(c.toy), range(REDUCED["eval_seeds"]))[0]
  acc = {k: judge.accuracy(v[0], grid) for k, v in scored.items()}
  attrs = ("colour", "quadrant", "shape")
  right = {k: float(np.mean([a[m].mean() for m in attrs])) for k, a in acc.items()}
  print("reduced toy run, attributes right:", right, [a["all_three"].mean() for a in acc.values()])

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
  prompts = [p.text for p in world.grid_specs(heldout, seeds)[0]]
  summary = run.summarize(run.style_scores(scored, "amber_duotone"), prompts, "base")
  print("reduced toy style run (held-out prompts):", summary)
  assert summary["style"]["mean_reward"] > summary["base"]["mean_reward"] + 0.02
  assert summary["style"]["vs_base"]["win_rate_ci_low"] > 0.5


def test_tuning_scores_training_prompts_only_and_reuses_finished_runs(
  reduced_config, tmp_path, monkeypatch
):
  """`toy.tune` on the reduced base: a checkpoint per listed step, scored on training prompts."""
  from dpo_jax import trainer
  from dpo_jax.toy import run, tune

  c = copy.deepcopy(reduced_config)
  c.toy.eval_seeds_train = 1
  heldout = {s.text for s in run.train_and_heldout(c.toy)[1]}
  sampled = []
  score_models = run.score_models

  def recording(pipeline, models, specs, seeds, settings):
    sampled.extend(s.text for s in specs)
    return score_models(pipeline, models, specs, seeds, settings)

  monkeypatch.setattr(run, "score_models", recording)
  out = str(tmp_path / "tune")
  result = tune.tune(c, out, [c.toy.seed], [500.0], [1e-4], [4, 8])
  assert sampled and heldout and not heldout & set(sampled)
  assert len(sampled) == 40 * 3  # 40 prompts: the base, then the checkpoints at 4 and 8 steps.
  rows = {r["steps"]: r for r in result["rows"]}
  assert sorted(rows) == [4, 8] and {(r["beta"], r["lr"]) for r in rows.values()} == {(500, 1e-4)}
  for r in rows.values():
    assert -1 <= r["change_ci_low"] <= r["change"] <= r["change_ci_high"] <= 1
  chosen = dict(result["chosen"])
  assert chosen.pop("warmup_frac") == tune.warmup_frac_for(0.1, 8, chosen["steps"])
  assert chosen == tune.choose({c.toy.seed: {(500.0, 1e-4, n): rows[n] for n in rows}})
  workdir = os.path.join(out, f"seed{c.toy.seed}", "beta500_lr0.0001")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  with open(os.path.join(out, "tune.md")) as f:
    assert "Chosen: beta 500, lr 0.0001" in f.read()

  # A rerun reuses the finished fine-tune's scores: no training.
  monkeypatch.setattr(trainer, "train_and_evaluate", lambda *a: pytest.fail("retrained"))
  assert tune.tune(c, out, [c.toy.seed], [500.0], [1e-4], [4, 8]) == result


REDUCED = {
  "base_steps": 100,
  "pair_seeds": 8,
  "pair_prompts": 8,
  "sample_steps": 10,
  "dpo_steps": 30,
  "style_steps": 20,
  "eval_seeds": 6,
}
