"""Pooling several fine-tunes' judged images (`dpo_jax.toy.pool`) on hand-built run folders."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from dpo_jax.toy import pool, world

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]
SEEDS = [10_000, 10_001, 10_002]


def _write_run(root, model: str, right: dict[str, list[bool]]) -> str:
  """A `python -m dpo_jax.toy`-style folder: per split, one PNG per (prompt, seed).

  right[split][i] says whether image i (prompt-major) shows its prompt or the
  same shape in the opposite quadrant.
  """
  folder = os.path.join(root, "images", model)
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(len(os.listdir(folder)))
  flip = {"top left": "bottom right", "bottom right": "top left"}
  with open(os.path.join(folder, "metadata.jsonl"), "w") as meta:
    for split, flags in right.items():
      grid = [(p, s) for p in PROMPTS for s in SEEDS]
      # Written in another order than sorted: the tool must sort.
      for (prompt, seed), ok in reversed(list(zip(grid, flags))):
        spec = world.parse_prompt(prompt)
        if not ok:
          spec = dataclasses.replace(spec, quadrant=flip[spec.quadrant])
        name = f"{split}_{prompt.replace(' ', '_')}_{seed}.png"
        Image.fromarray(world.render(spec, rng)).save(os.path.join(folder, name))
        row = {"model": model, "split": split, "prompt": prompt, "seed": seed, "file": name}
        meta.write(json.dumps(row) + "\n")
  return str(root)


def _bits(n_right: int) -> list[bool]:
  return [i < n_right for i in range(len(PROMPTS) * len(SEEDS))]


def test_pooled_change_is_the_mean_of_the_runs_changes(tmp_path):
  base = _write_run(tmp_path / "base", "base", {s: _bits(1) for s in pool.SPLITS})
  counts = {"a": 4, "b": 6, "c": 2}
  runs = [
    _write_run(tmp_path / name, "dpo", {s: _bits(n) for s in pool.SPLITS})
    for name, n in counts.items()
  ]
  result = pool.pool(base, runs, "dpo")
  n = len(PROMPTS) * len(SEEDS)
  for split in pool.SPLITS:
    got = [r["all_three"]["mean_diff"] for r in result[split]["runs"]]
    np.testing.assert_allclose(got, [(k - 1) / n for k in counts.values()])
    mean = result[split]["mean"]["all_three"]
    assert mean["mean_diff"] == pytest.approx((np.mean(list(counts.values())) - 1) / n)
    assert mean["mean_diff_ci_low"] <= mean["mean_diff"] <= mean["mean_diff_ci_high"]
    # The colour and shape are right in every image: no change.
    assert result[split]["mean"]["colour"]["mean_diff"] == 0.0
  table = pool.format_table(result).splitlines()
  assert table[0] == "| prompts | a | b | c | mean of 3 |"
  assert table[2].startswith("| heldout prompts | +50.0 [")


def test_runs_on_another_grid_or_without_images_are_errors(tmp_path):
  base = _write_run(tmp_path / "base", "base", {s: _bits(1) for s in pool.SPLITS})
  short = _write_run(tmp_path / "short", "dpo", {s: _bits(3)[:4] for s in pool.SPLITS})
  with pytest.raises(ValueError, match="same base, prompts and evaluation seeds"):
    pool.pool(base, [short], "dpo")
  with pytest.raises(FileNotFoundError, match="rpo"):
    pool.pool(base, [short], "rpo")
  with pytest.raises(ValueError, match="No runs"):
    pool.pooled_changes({"all_three": np.zeros(2)}, [], ["p", "q"])
