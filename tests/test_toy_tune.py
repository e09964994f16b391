"""The toy tuning tool's choice rule and bookkeeping (`dpo_jax.toy.tune`)."""

from __future__ import annotations

import json

import ml_collections
import pytest

from dpo_jax.toy import tune


def _row(change: float, low: float, shape: float = 0.9) -> dict[str, float]:
  return {"change": change, "change_ci_low": low, "change_ci_high": change + 0.1, "shape": shape}


def test_choose_prefers_the_best_worst_seed_over_the_best_mean():
  # A: big mean, but one seed's CI reaches below zero. B: smaller, positive on both seeds.
  a, b = (500.0, 1e-4, 200), (500.0, 3e-5, 300)
  rows = {
    0: {a: _row(0.30, 0.20), b: _row(0.15, 0.08)},
    1: {a: _row(0.10, -0.05), b: _row(0.12, 0.05)},
  }
  chosen = tune.choose(rows)
  assert (chosen["beta"], chosen["lr"], chosen["steps"]) == b
  assert chosen["worst_ci_low"] == pytest.approx(0.05)
  assert chosen["mean_change"] == pytest.approx(0.135)


def test_choose_breaks_ties_by_mean_and_ignores_settings_missing_a_seed():
  a, b, c = (500.0, 1e-4, 100), (2000.0, 1e-4, 100), (500.0, 1e-5, 100)
  rows = {
    0: {a: _row(0.10, 0.05), b: _row(0.20, 0.05), c: _row(0.9, 0.8)},
    1: {a: _row(0.10, 0.05), b: _row(0.20, 0.05)},
  }
  chosen = tune.choose(rows)
  assert (chosen["beta"], chosen["lr"], chosen["steps"]) == b
  with pytest.raises(ValueError, match="every seed"):
    tune.choose({0: {a: _row(0.1, 0.0)}, 1: {b: _row(0.1, 0.0)}})


def test_checkpoint_interval_lands_on_every_listed_step():
  assert tune.checkpoint_every([100, 200, 300]) == 100
  assert tune.checkpoint_every([150, 200]) == 50
  assert all(n % tune.checkpoint_every([60, 90, 300]) == 0 for n in (60, 90, 300))


def test_table_has_a_cell_per_seed_setting_and_step():
  rows = {
    0: {(500.0, 1e-4, 100): _row(0.125, 0.05), (500.0, 1e-4, 200): _row(-0.02, -0.1, 0.7)},
    1: {(500.0, 1e-4, 100): _row(0.0, -0.04)},
  }
  table = tune.format_table(rows).splitlines()
  assert table[0] == "| beta | lr | seed | 100 steps | 200 steps |"
  assert (
    table[2]
    == "| 500 | 0.0001 | 0 | +12.5 [+5.0, +22.5] (shape 90 %) | -2.0 [-10.0, +8.0] (shape 70 %) |"
  )
  assert table[3] == "| 500 | 0.0001 | 1 | +0.0 [-4.0, +10.0] (shape 90 %) | - |"


def test_finished_scores_are_reused_only_for_the_same_config_and_steps(tmp_path):
  config = ml_collections.ConfigDict({"beta": 500.0, "toy": {"seed": 0}})
  scores = {"100": _row(0.1, 0.0), "200": _row(0.2, 0.1)}
  (tmp_path / "scores.json").write_text(json.dumps({"config": config.to_dict(), "scores": scores}))
  # Reused: nothing is trained or sampled (the pipeline and the base's scores are not needed).
  assert tune._tune_one(config, str(tmp_path), [100, 200], None, None, None, None) == {
    100: scores["100"],
    200: scores["200"],
  }
  with pytest.raises(ValueError, match="another config or other steps"):
    tune._tune_one(config, str(tmp_path), [100, 300], None, None, None, None)
  config.beta = 2000.0
  with pytest.raises(ValueError, match=str(tmp_path)):
    tune._tune_one(config, str(tmp_path), [100, 200], None, None, None, None)


def test_one_base_is_not_tuned_as_several_seeds(tmp_path):
  config = ml_collections.ConfigDict({"pretrained_path": "/some/base", "data": {"path": ""}})
  with pytest.raises(ValueError, match="one seed's base"):
    tune.tune(config, str(tmp_path), [0, 1], [500.0], [1e-4], [100])
  with pytest.raises(ValueError, match="non-positive"):
    tune.tune(config, str(tmp_path), [0], [500.0], [1e-4], [0, 100])


@pytest.mark.parametrize(
  "frac,max_steps,steps", [(0.1, 400, 100), (0.1, 400, 400), (0.25, 300, 200)]
)
def test_the_chosen_warmup_reproduces_the_tuning_runs_schedule(frac, max_steps, steps):
  from dpo_jax import optim

  long = optim.lr_schedule(ml_collections.ConfigDict({"lr": 3e-5, "warmup_frac": frac}), max_steps)
  f = tune.warmup_frac_for(frac, max_steps, steps)
  short = optim.lr_schedule(ml_collections.ConfigDict({"lr": 3e-5, "warmup_frac": f}), steps)
  assert [float(short(t)) for t in range(steps + 1)] == [float(long(t)) for t in range(steps + 1)]
