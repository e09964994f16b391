"""Training diagnostics (per-bucket accuracy / margin, drift, saturation), the alarm, the report."""

import functools
import json
import logging
import math
import os

import jax
import numpy as np
import pytest

from dpo_jax import diagnostics, diffusion, report, trainer
from dpo_jax import step as step_lib
from tests.fixtures import make_train_config

T = 1000


def read_jsonl(workdir: str) -> dict[int, dict]:
  """{step: every key written for that step} (train and eval rows merged)."""
  rows: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(row)
  return rows


def _numpy_reference(pw, pl, rw, rl, t, beta, num_buckets=4, sat=diagnostics.SATURATION_LOGIT):
  """Per-pair numpy version of the documented metrics (loops, no shares)."""
  pw, pl, rw, rl = (np.asarray(x, np.float64) for x in (pw, pl, rw, rl))
  inside = -0.5 * beta * ((pw - pl) - (rw - rl))
  ref = {
    "drift_w": np.mean(pw - rw),
    "drift_l": np.mean(pl - rl),
    "saturated": np.mean(np.abs(inside) > sat),
    "drift_rel": max(abs(np.mean(pw - rw)), abs(np.mean(pl - rl))) / np.mean((rw + rl) / 2),
  }
  for k in range(num_buckets):
    members = [
      i for i in range(len(t)) if k * T // num_buckets <= t[i] < (k + 1) * T // num_buckets
    ]
    ref[f"pairs_t{k}"] = len(members) / len(t)
    ref[f"implicit_acc_t{k}"] = np.mean([inside[i] > 0 for i in members]) if members else np.nan
    ref[f"reward_margin_t{k}"] = np.mean([inside[i] for i in members]) if members else np.nan
  return ref


def _random_pairs(b, seed, t_high=T):
  r = np.random.default_rng(seed)
  rw, rl = r.uniform(0.5, 1.5, b), r.uniform(0.5, 1.5, b)
  pw, pl = rw + r.normal(0, 2e-3, b), rl + r.normal(0, 2e-3, b)
  # float32 inputs, as the step's MSEs: the reference then differs only by float32 rounding
  # of the logit (beta x a difference of ~1-sized numbers: ~1e-4 relative).
  return (*(x.astype(np.float32) for x in (pw, pl, rw, rl)), r.integers(0, t_high, b))


def _assert_metrics_equal(got, ref):
  assert set(ref) <= set(got), sorted(set(ref) - set(got))
  for k, v in ref.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=2e-4, atol=1e-6, err_msg=k)


def test_pair_diagnostics_match_numpy_including_an_empty_bucket():
  pw, pl, rw, rl, t = _random_pairs(16, 0, t_high=700)  # No t in [750, 1000): bucket 3 empty.
  got = diagnostics.finalize(diagnostics.pair_diagnostics(pw, pl, rw, rl, t, 2000.0, T))
  ref = _numpy_reference(pw, pl, rw, rl, t, 2000.0)
  assert ref["pairs_t3"] == 0 and np.isnan(ref["implicit_acc_t3"])
  assert 0 < ref["saturated"] < 1  # Both sides of the threshold are exercised.
  _assert_metrics_equal(got, ref)
  assert not any(k.endswith("/num") or "/den" in k for k in got)


def test_micro_batch_mean_then_finalize_equals_the_whole_batch():
  """The step's aggregation (mean of micro-batch dicts, then finalize) is exact."""
  pw, pl, rw, rl, t = _random_pairs(12, 1)
  # First micro-batch: 6 right pairs in bucket 0; the second: one wrong pair there, the rest
  # elsewhere. Truth 6/7 right, the mean of the per-half accuracies (1 + 0) / 2.
  t[:] = [0, 40, 80, 120, 160, 200, 10, 300, 400, 500, 600, 900]
  pw[:7], pl[:7] = rw[:7] - 1e-3, rl[:7]
  pw[6] = rw[6] + 1e-3
  halves = [
    diagnostics.pair_diagnostics(pw[s], pl[s], rw[s], rl[s], t[s], 3000.0, T)
    for s in (slice(0, 6), slice(6, 12))
  ]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
  ref = _numpy_reference(pw, pl, rw, rl, t, 3000.0)
  _assert_metrics_equal(diagnostics.finalize(mean), ref)
  # Averaging the finalized per-bucket accuracies instead would be wrong here.
  per_half = [diagnostics.finalize(h)["implicit_acc_t0"] for h in halves]
  naive = np.nanmean([float(x) for x in per_half])
  assert ref["implicit_acc_t0"] == pytest.approx(6 / 7) and naive == pytest.approx(0.5)


def test_train_step_with_grad_accumulation_logs_exact_bucket_metrics():
  """Through the real step (2 micro-batches): metrics = numpy over the step's own MSEs and t."""
  from tests.test_step import _one_level_config, _setup

  spec, params, batch = _setup(_one_level_config(), grad_accum=2, batch_size=8)
  ref_params = jax.tree.map(lambda x: x * 0.9, params)
  rng = jax.random.PRNGKey(5)
  state = step_lib.init_train_state(params, spec.tx)
  _, m = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, ref_params, batch, rng)
  # Independent replay of what each micro-batch j (rows j::2, key fold_in(step_rng, j)) drew.
  step_rng = jax.random.fold_in(rng, 0)
  cols = []
  for j in range(2):
    mb = jax.tree.map(lambda x, j=j: x[j::2], batch)
    shape = mb["latents_w"].shape
    noise, t = diffusion.sample_noise_and_timesteps(
      jax.random.fold_in(step_rng, j), shape, spec.num_train_timesteps
    )
    mses = step_lib._policy_and_ref_mses(spec, params, ref_params, mb, noise, t)
    cols.append([np.asarray(x) for x in (*mses, t)])
  pw, pl, rw, rl, t = (np.concatenate(c) for c in zip(*cols))
  ref = _numpy_reference(pw, pl, rw, rl, t, spec.beta)
  assert len({ref[f"pairs_t{k}"] for k in range(4)}) > 1  # Unequal buckets.
  # The step's MSEs and the replay's are separately compiled float32 reductions, a few ulps
  # apart (how many depends on the CPU's vector width); the margin scales their difference by
  # beta / 2: 4 MSEs x 4 ulps. (CI on an AVX-512 machine: 1.5e-4 off of 0.128.)
  mses = np.concatenate([pw, pl, rw, rl])
  margin_atol = 0.5 * spec.beta * 4 * 4 * np.finfo(np.float32).eps * np.abs(mses).max()
  print(f"beta {spec.beta}, max |mse| {np.abs(mses).max():.3g}, margin atol {margin_atol:.3g}")
  for k, v in ref.items():
    atol = margin_atol if k.startswith("reward_margin") else 1e-6
    np.testing.assert_allclose(float(m[k]), v, rtol=1e-3, atol=atol, err_msg=k)


# --- the alarm ------------------------------------------------------------------


def test_alarm_trips_on_drift_and_on_a_grad_norm_jump_only():
  alarm = diagnostics.DivergenceAlarm(drift_threshold=0.5, grad_norm_jump=10.0, window=3)
  healthy = [1.0, 3.0, 0.5, 2.0, 4.5, 1.0]  # Up to 4.5x the running median: no trip.
  for s, g in enumerate(healthy, 1):
    assert alarm.update(s, {"grad_norm": g, "drift_rel": 0.49}) is None
  trip = alarm.update(7, {"grad_norm": 21.0, "drift_rel": 0.1})  # Median(2, 4.5, 1) = 2 -> 20.
  assert (trip.metric, trip.value, trip.threshold) == ("grad_norm", 21.0, 20.0)
  assert "step 7" in trip.message and "grad_norm = 21 > threshold 20" in trip.message
  trip = alarm.update(8, {"grad_norm": 1.0, "drift_rel": 0.51})
  assert (trip.metric, trip.value, trip.threshold) == ("drift_rel", 0.51, 0.5)
  assert "config.alarm.drift_threshold" in trip.message
  assert [t.step for t in alarm.trips] == [7, 8]


def test_alarm_needs_a_full_window_ignores_nonfinite_and_can_be_off():
  alarm = diagnostics.DivergenceAlarm(grad_norm_jump=2.0, window=3)
  assert alarm.update(1, {"grad_norm": 1.0}) is None
  assert alarm.update(2, {"grad_norm": 100.0, "drift_rel": math.nan}) is None  # Window not full.
  assert alarm.update(3, {"grad_norm": math.inf}) is None  # A skipped step: not in the window.
  assert alarm.update(4, {"grad_norm": 1.0}) is None
  assert alarm.update(5, {"grad_norm": 2.1}).metric == "grad_norm"  # Median(1, 100, 1) = 1.
  off = diagnostics.DivergenceAlarm(drift_threshold=0.1, action="off")
  assert off.update(1, {"drift_rel": 5.0}) is None
  zero = diagnostics.DivergenceAlarm(drift_threshold=0.0, grad_norm_jump=0.0, window=1)
  assert zero.update(1, {"drift_rel": 5.0, "grad_norm": 1.0}) is None
  assert zero.update(2, {"grad_norm": 1e9}) is None


def test_alarm_warns_once_per_metric_and_rejects_bad_settings(caplog):
  alarm = diagnostics.DivergenceAlarm(drift_threshold=0.1)
  with caplog.at_level(logging.WARNING):
    for s in range(3):
      assert alarm.update(s, {"drift_rel": 1.0}) is not None
  assert sum("Divergence alarm" in r.getMessage() for r in caplog.records) == 1
  with pytest.raises(ValueError, match=r"config.alarm.action='halt'"):
    diagnostics.DivergenceAlarm(action="halt")
  with pytest.raises(ValueError, match="config.alarm.window=0"):
    diagnostics.DivergenceAlarm(window=0)
  bad = make_train_config(**{"alarm.action": "abort"})
  with pytest.raises(ValueError, match="config.alarm.action='abort'"):
    trainer.check_config(bad, 8)


# --- tiny runs ------------------------------------------------------------------

# The one-level UNet of test_step (fast to compile), 6 steps; the alarm stops
# on a trip, with a window short enough to judge grad-norm jumps within 6 steps.
RUN = {
  "model.block_out_channels": (32,),
  "model.down_block_types": ("CrossAttnDownBlock2D",),
  "model.up_block_types": ("CrossAttnUpBlock2D",),
  "max_steps": 6,
  "checkpoint_every": 100,
  "optim.warmup_frac": 0.0,
  "alarm.action": "stop",
  "alarm.window": 3,
}


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("healthy"))
  return workdir, trainer.train_and_evaluate(make_train_config(**RUN), workdir)


def test_healthy_run_logs_diagnostics_for_train_and_eval_and_trips_nothing(healthy_run):
  workdir, result = healthy_run
  assert result["alarms"] == [] and int(result["state"].step) == 6
  rows = read_jsonl(workdir)
  keys = ["drift_w", "drift_l", "drift_rel", "saturated"]
  keys += [f"{m}_t{k}" for m in ("implicit_acc", "reward_margin", "pairs") for k in range(4)]
  for prefix, step in (("train", 1), ("train", 6), ("eval", 6)):
    for k in keys:
      assert f"{prefix}/{k}" in rows[step], (prefix, step, k)
  assert sum(rows[6][f"eval/pairs_t{k}"] for k in range(4)) == pytest.approx(1.0)
  # Step 1: policy = reference, so no drift and no saturation.
  assert rows[1]["train/drift_rel"] == 0 and rows[1]["train/saturated"] == 0
  assert 0 < rows[6]["train/drift_rel"] < 0.5


def test_report_plots_the_numbers_of_metrics_jsonl(healthy_run, tmp_path):
  workdir, _ = healthy_run
  rows = read_jsonl(workdir)
  out = str(tmp_path / "plots")
  panels = report.report(workdir, out)
  assert set(panels) == set(report.PANELS)
  for panel in panels:
    assert os.path.getsize(os.path.join(out, f"{panel}.png")) > 1000
  assert set(panels["implicit_acc"]) >= {
    f"{p}/implicit_acc_t{k}" for p in ("train", "eval") for k in range(4)
  }
  n = 0
  for series in panels.values():
    for key, (steps, values) in series.items():
      expected = [(s, r[key]) for s, r in sorted(rows.items()) if isinstance(r.get(key), float)]
      expected = [(s, v) for s, v in expected if math.isfinite(v)]  # NaN: empty bucket, a gap.
      assert list(zip(steps, values)) == expected, key
      n += len(steps)
  assert n > 100
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    report.report(str(tmp_path))


def test_run_made_to_diverge_stops_with_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "diverged")
  config = make_train_config(**RUN, **{"beta": 1e5, "optim.lr": 1.0})
  with pytest.raises(diagnostics.DivergenceError) as err:
    trainer.train_and_evaluate(config, workdir)
  msg = str(err.value)
  step = int(msg.split("Divergence alarm at step ")[1].split(":")[0])
  assert step < 6 and "drift_rel = " in msg and "> threshold 1 " in msg, msg
  assert f"Stopped after saving step {step}" in msg
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  assert read_jsonl(workdir)[step]["train/drift_rel"] > 1.0
