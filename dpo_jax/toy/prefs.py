"""Preference pairs from the toy base model, labelled by the programmatic reward.

For every training prompt the base samples `num_seeds` images (fixed seeds);
every within-prompt pair of images becomes one Pick-a-Pic row whose label
follows the reward:
  - |reward gap| > `min_gap`: a preference (label 1 for the better image);
  - |reward gap| <= `tie_tol`: a tie (labels 0.5 / 0.5), as Pick-a-Pic has
    them; the data pipeline counts and skips ties like any other;
  - in between: too close to call, not written (counted in the report).
Images are PNG bytes in the `jpg_0` / `jpg_1` columns (the pipeline accepts
PNG), so the pairs flow through the real data path (`data.source=pickapic`).
Which image goes to `jpg_0` follows seed order, so the winner's position is
not a constant the model could learn.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """How preference pairs are drawn and labelled (feeds the cache key)."""

  num_seeds: int = 16
  min_gap: float = 0.3
  tie_tol: float = 1e-3
  first_seed: int = 1000
  num_inference_steps: int = 20
  guidance_scale: float = 3.0


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG file bytes."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def label_pairs(
  rewards: np.ndarray, groups: Sequence[int], min_gap: float, tie_tol: float
) -> tuple[list[tuple[int, int, float]], dict[str, int]]:
  """Within-group pairs (i < j) with label_0 for image i, and counts by outcome.

  Args:
    rewards: [N] reward of each image.
    groups: [N] group (prompt) id of each image; only same-group pairs are formed.
    min_gap: smallest |gap| that makes a preference.
    tie_tol: largest |gap| that makes a tie (must be <= min_gap).

  Returns:
    ([(i, j, label_0)], {"preference": n, "tie": n, "ambiguous": n}).
  """
  if tie_tol > min_gap:
    raise ValueError(f"tie_tol={tie_tol} must not exceed min_gap={min_gap}.")
  rewards = np.asarray(rewards, np.float64)
  if not np.all(np.isfinite(rewards)):
    raise ValueError("Rewards contain NaN or inf; cannot label pairs.")
  by_group: dict[Any, list[int]] = {}
  for i, g in enumerate(groups):
    by_group.setdefault(g, []).append(i)
  pairs, counts = [], {"preference": 0, "tie": 0, "ambiguous": 0}
  for members in by_group.values():
    for i, j in itertools.combinations(members, 2):
      gap = rewards[i] - rewards[j]
      if abs(gap) > min_gap:
        pairs.append((i, j, 1.0 if gap > 0 else 0.0))
        counts["preference"] += 1
      elif abs(gap) <= tie_tol:
        pairs.append((i, j, 0.5))
        counts["tie"] += 1
      else:
        counts["ambiguous"] += 1
  return pairs, counts


def write_parquet(
  directory: str,
  images: np.ndarray,
  prompts: Sequence[str],
  seeds: Sequence[int],
  pairs: Sequence[tuple[int, int, float]],
  model_name: str = "toy-base",
  split: str = "train",
) -> str:
  """Writes `pairs` as one Pick-a-Pic-format shard `<split>-00000-of-00001.parquet`."""
  os.makedirs(directory, exist_ok=True)
  pngs = [png_bytes(im) for im in images]
  rows = []
  for rid, (i, j, label_0) in enumerate(pairs):
    best = f"{prompts[i]}|{seeds[i]}" if label_0 == 1.0 else f"{prompts[j]}|{seeds[j]}"
    rows.append(
      {
        "ranking_id": rid,
        "caption": prompts[i],
        "jpg_0": pngs[i],
        "jpg_1": pngs[j],
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": model_name,
        "model_1": model_name,
        "image_0_uid": f"{prompts[i]}|{seeds[i]}",
        "image_1_uid": f"{prompts[j]}|{seeds[j]}",
        "best_image_uid": best if label_0 != 0.5 else "",
        "user_id": 0,
        "has_label": True,
        "are_different": True,
        "created_at": "",
      }
    )
  path = os.path.join(directory, f"{split}-00000-of-00001.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def write_report(path: str, report: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
