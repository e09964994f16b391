"""Is training working? Per-step diagnostics of the pair objectives and a divergence alarm.

A flat or near-zero DPO loss says little (official Diffusion-DPO issues #1, #2,
#23), and at beta 2000-5000 a run can diverge within a few steps (#17). Logged
every step, for train and eval batches, from the per-pair MSEs any pair
objective computes (DPO, RPO, ...):

  implicit_acc_t{k}, reward_margin_t{k}: accuracy / mean of the DPO logit
      inside = -0.5 beta ((m_w - m_l) - (r_w - r_l)) over the pairs whose
      timestep falls in bucket k, t in [k T / K, (k + 1) T / K) (NaN when the
      batch has no pair there); pairs_t{k} is that bucket's share of the batch.
  drift_w, drift_l: mean policy - reference MSE on winners / losers. Their
      difference drives the loss; their size is a KL proxy (how far the policy
      moved from the reference); drift_rel = max(|drift_w|, |drift_l|) / mean
      reference MSE is the scale-free version the alarm watches.
  saturated: share of pairs with |inside| > `SATURATION_LOGIT`, where the
      sigmoid is flat: those pairs contribute (almost) no gradient when right,
      and a beta-sized one when wrong.

Aggregation: the step averages metrics over micro-batches (equal sizes), so
`pair_diagnostics` returns only batch *means*, per-bucket ones as shares of
the whole batch ("acc_t0/num" = #{correct in bucket 0} / B), and `finalize`
divides them after averaging. Averaging per-bucket means instead would weight
each micro-batch's bucket equally whatever its pair count.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping
from typing import Any

import chex
import jax.numpy as jnp
from absl import logging

NUM_T_BUCKETS = 4
# sigmoid(-5) = 0.0067: beyond it a right pair's gradient weight is < 1 % of
# its step-0 value (0.5), and a wrong pair's loss is linear in the logit.
SATURATION_LOGIT = 5.0
ALARM_ACTIONS = ("off", "warn", "stop")

_NUM = "/num"  # Suffix of a bucket numerator `finalize` divides by the bucket's share.
_REF_SCALE = "drift_rel/den"


def t_buckets(t: chex.Array, num_train_timesteps: int, num_buckets: int) -> chex.Array:
  """[B] int timesteps in [0, T) -> [B] bucket indices floor(t K / T) in [0, K)."""
  k = (t.astype(jnp.int32) * num_buckets) // num_train_timesteps
  return jnp.clip(k, 0, num_buckets - 1)


def pair_diagnostics(
  policy_mse_w: chex.Array,
  policy_mse_l: chex.Array,
  ref_mse_w: chex.Array,
  ref_mse_l: chex.Array,
  t: chex.Array,
  beta: float | chex.Array,
  num_train_timesteps: int,
  num_buckets: int = NUM_T_BUCKETS,
  saturation: float = SATURATION_LOGIT,
) -> dict[str, chex.Array]:
  """Diagnostics of one (micro-)batch of pairs, as batch means (call `finalize` after averaging).

  Args:
    policy_mse_w: [B] policy noise-prediction MSE on the preferred image.
    policy_mse_l: [B] policy MSE on the rejected image (same noise, timestep).
    ref_mse_w: [B] frozen-reference MSE on the preferred image.
    ref_mse_l: [B] frozen-reference MSE on the rejected image.
    t: [B] integer timesteps of the pairs.
    beta: scalar DPO temperature (the logit is DPO's `inside`).
    num_train_timesteps: T, the number of diffusion steps t is drawn from.
    num_buckets: K, the number of equal timestep ranges.
    saturation: |logit| above which a pair counts as saturated.

  Returns:
    Scalar float32 metrics: `drift_w`, `drift_l`, `saturated`, `pairs_t{k}`
    and the partial keys `implicit_acc_t{k}/num`, `reward_margin_t{k}/num`,
    `drift_rel/den` that `finalize` turns into the documented metrics.
  """
  mses = [jnp.asarray(x, jnp.float32) for x in (policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l)]
  chex.assert_rank(mses + [t], 1)
  chex.assert_equal_shape(mses + [t])
  pw, pl, rw, rl = mses
  inside = -0.5 * beta * ((pw - pl) - (rw - rl))
  onehot = t_buckets(t, num_train_timesteps, num_buckets)[:, None] == jnp.arange(num_buckets)
  onehot = onehot.astype(jnp.float32)  # [B, K]
  correct = (inside > 0).astype(jnp.float32)
  share = jnp.mean(onehot, axis=0)
  acc_num = jnp.mean(onehot * correct[:, None], axis=0)
  margin_num = jnp.mean(onehot * inside[:, None], axis=0)
  out = {
    "drift_w": jnp.mean(pw - rw),
    "drift_l": jnp.mean(pl - rl),
    "saturated": jnp.mean((jnp.abs(inside) > saturation).astype(jnp.float32)),
    _REF_SCALE: jnp.mean(0.5 * (rw + rl)),
  }
  for k in range(num_buckets):
    out[f"pairs_t{k}"] = share[k]
    out[f"implicit_acc_t{k}{_NUM}"] = acc_num[k]
    out[f"reward_margin_t{k}{_NUM}"] = margin_num[k]
  return out


def finalize(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Turns the averaged partial keys of `pair_diagnostics` into ratios; other keys pass through.

  `implicit_acc_t{k}` = its numerator / `pairs_t{k}` (NaN for an empty bucket),
  `drift_rel` = max(|drift_w|, |drift_l|) / mean reference MSE. Works on jax
  arrays inside jit and on host floats alike.
  """
  out = {k: v for k, v in metrics.items() if not k.endswith(_NUM) and k != _REF_SCALE}
  for key, num in metrics.items():
    if key.endswith(_NUM):
      name = key[: -len(_NUM)]
      share = metrics[f"pairs_{name.rsplit('_', 1)[1]}"]
      # Safe denominator: where(share > 0, num / share, nan) alone would still
      # evaluate 0 / 0 (harmless here, but noisy under jax_debug_nans).
      out[name] = jnp.where(share > 0, num / jnp.where(share > 0, share, 1.0), jnp.nan)
  if _REF_SCALE in metrics:
    drift = jnp.maximum(jnp.abs(metrics["drift_w"]), jnp.abs(metrics["drift_l"]))
    out["drift_rel"] = drift / metrics[_REF_SCALE]
  return out


# ---------------------------------------------------------------------------
# Divergence alarm (host side, on the fetched metric rows).


class DivergenceError(RuntimeError):
  """The divergence alarm fired with `alarm.action = "stop"` (after saving a checkpoint)."""


@dataclasses.dataclass(frozen=True)
class Trip:
  """One alarm: which metric crossed which threshold at which step."""

  step: int
  metric: str
  value: float
  threshold: float
  message: str


class DivergenceAlarm:
  """Watches `drift_rel` and jumps of `grad_norm` over the logged train rows.

  Trips when
    - drift_rel > `drift_threshold` (the policy's MSE moved by more than that
      fraction of the reference's: a diverging policy forgets how to denoise), or
    - grad_norm > `grad_norm_jump` x the median grad norm of the previous
      `window` finite steps (checked once `window` steps are seen).
  A threshold of 0 turns its check off; `action` "off" turns off both.
  Non-finite values are left to the trainer's skipped-step logic.
  """

  def __init__(
    self,
    drift_threshold: float = 1.0,
    grad_norm_jump: float = 10.0,
    window: int = 20,
    action: str = "warn",
  ):
    if action not in ALARM_ACTIONS:
      raise ValueError(f"config.alarm.action={action!r}; expected one of {ALARM_ACTIONS}.")
    if window < 1:
      raise ValueError(f"config.alarm.window={window}; expected >= 1.")
    if drift_threshold < 0 or grad_norm_jump < 0:
      raise ValueError(
        f"config.alarm.drift_threshold={drift_threshold} and grad_norm_jump={grad_norm_jump} "
        "must be >= 0 (0 = that check off)."
      )
    self.drift_threshold = float(drift_threshold)
    self.grad_norm_jump = float(grad_norm_jump)
    self.window = int(window)
    self.action = action
    self._grad_norms: list[float] = []
    self._warned: set[str] = set()
    self.trips: list[Trip] = []

  @classmethod
  def from_config(cls, alarm: Mapping[str, Any]) -> DivergenceAlarm:
    """From `config.alarm` (configs/common.py)."""
    return cls(
      float(alarm["drift_threshold"]),
      float(alarm["grad_norm_jump"]),
      int(alarm["window"]),
      str(alarm["action"]),
    )

  def update(self, step: int, row: Mapping[str, float]) -> Trip | None:
    """Checks one step's host metrics; logs a warning on a trip (once per metric with "warn").

    Returns:
      The trip, or None. With action "stop" the caller saves and raises
      `DivergenceError(trip.message)`.
    """
    if self.action == "off":
      return None
    trip = None
    drift = row.get("drift_rel", math.nan)
    if self.drift_threshold and math.isfinite(drift) and drift > self.drift_threshold:
      trip = self._trip(
        step,
        "drift_rel",
        drift,
        self.drift_threshold,
        "the policy's MSE moved that far from the reference's (relative)",
      )
    g = row.get("grad_norm", math.nan)
    if math.isfinite(g):
      history = self._grad_norms[-self.window :]
      if trip is None and self.grad_norm_jump and len(history) >= self.window:
        median = statistics.median(history)
        if median > 0 and g > self.grad_norm_jump * median:
          trip = self._trip(
            step,
            "grad_norm",
            g,
            self.grad_norm_jump * median,
            f"{g / median:.3g} x the median {median:.3g} of the previous {self.window} steps "
            f"(alarm.grad_norm_jump={self.grad_norm_jump:g})",
          )
      self._grad_norms = history + [g]
    if trip is not None:
      self.trips.append(trip)
      if self.action == "stop" or trip.metric not in self._warned:
        logging.warning("%s", trip.message)
        self._warned.add(trip.metric)
    return trip

  def _trip(self, step: int, metric: str, value: float, threshold: float, why: str) -> Trip:
    name = "drift_threshold" if metric == "drift_rel" else "grad_norm_jump"
    message = (
      f"Divergence alarm at step {step}: {metric} = {value:.4g} > threshold {threshold:.4g} "
      f"({why}). Lower optim.lr or beta; or raise config.alarm.{name} (0 = off) / set "
      "config.alarm.action='warn' if this is expected."
    )
    return Trip(step, metric, float(value), float(threshold), message)
