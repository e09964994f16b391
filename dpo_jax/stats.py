"""Win rates between two models scored on the same prompts and seeds, with CIs.

Model A "wins" item i when score_a[i] - score_b[i] > margin, loses when it is
< -margin and ties otherwise; ties count 1/2 (the usual convention for
preference evaluation). The strict variant uses a positive margin so that
differences within scorer noise are ties.

Confidence intervals are percentile bootstraps over *prompts* (clusters):
images of one prompt share the prompt's difficulty, so resampling images
independently would understate the uncertainty when there are few prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def outcomes(score_a: np.ndarray, score_b: np.ndarray, margin: float = 0.0) -> np.ndarray:
  """Per-item outcome for A: 1 win, 0.5 tie, 0 loss.  [N] float64."""
  a = np.asarray(score_a, np.float64)
  b = np.asarray(score_b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"Scores must be matching 1-D arrays, got {a.shape} and {b.shape}.")
  d = a - b
  return np.where(d > margin, 1.0, np.where(d < -margin, 0.0, 0.5))


def win_rate(score_a: np.ndarray, score_b: np.ndarray, margin: float = 0.0) -> float:
  """Fraction of items where A beats B, ties counted 1/2."""
  return float(np.mean(outcomes(score_a, score_b, margin)))


def bootstrap_ci(
  values: np.ndarray,
  clusters: Sequence[object] | None = None,
  num_resamples: int = 2000,
  confidence: float = 0.95,
  seed: int = 0,
) -> tuple[float, float]:
  """Percentile bootstrap CI of mean(values), resampling whole clusters.

  Args:
    values: [N] per-item values (e.g. outcomes or score differences).
    clusters: [N] cluster labels (e.g. prompt ids); None = every item alone.
    num_resamples: bootstrap replicates.
    confidence: two-sided coverage.
    seed: RNG seed (the CI is deterministic given it).

  Returns:
    (low, high).
  """
  values = np.asarray(values, np.float64)
  labels = np.arange(len(values)) if clusters is None else np.asarray(clusters)
  if labels.shape != values.shape:
    raise ValueError(f"clusters has shape {labels.shape}, values {values.shape}.")
  uniq, inv = np.unique(labels, return_inverse=True)
  # Per-cluster sums and sizes make each replicate O(#clusters).
  sums = np.bincount(inv, weights=values, minlength=len(uniq))
  sizes = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
  rng = np.random.default_rng(seed)
  pick = rng.integers(0, len(uniq), size=(num_resamples, len(uniq)))
  means = sums[pick].sum(axis=1) / sizes[pick].sum(axis=1)
  alpha = (1.0 - confidence) / 2
  low, high = np.quantile(means, [alpha, 1 - alpha])
  return float(low), float(high)


def compare(
  score_a: np.ndarray,
  score_b: np.ndarray,
  prompts: Sequence[object] | None = None,
  strict_margin: float = 0.1,
  num_resamples: int = 2000,
  seed: int = 0,
) -> dict[str, float]:
  """Win rate of A over B (ties 1/2), a strict version, mean difference, with CIs."""
  out = outcomes(score_a, score_b)
  strict = outcomes(score_a, score_b, strict_margin)
  diff = np.asarray(score_a, np.float64) - np.asarray(score_b, np.float64)
  res = {"n": int(len(out)), "win_rate": float(out.mean()), "strict_win_rate": float(strict.mean())}
  res["mean_diff"] = float(diff.mean())
  for name, vals in (("win_rate", out), ("strict_win_rate", strict), ("mean_diff", diff)):
    lo, hi = bootstrap_ci(vals, prompts, num_resamples, seed=seed)
    res[f"{name}_ci_low"], res[f"{name}_ci_high"] = lo, hi
  return res


def format_mean_diff(c: Mapping[str, float], unit: str = "") -> str:
  """`compare`'s mean difference of 0 / 1 scores in points with its CI: "+2.1 [-6.2, +9.9]".

  `unit` goes after the value ("+2.1 points [-6.2, +9.9]").
  """
  return (
    f"{100 * c['mean_diff']:+.1f}{unit} [{100 * c['mean_diff_ci_low']:+.1f}, "
    f"{100 * c['mean_diff_ci_high']:+.1f}]"
  )
