"""Pools several runs of one fine-tune: the judge's change vs the base, per run and on average.

  python -m dpo_jax.toy --output=runs/s0 --config.toy.seed=0
  python -m dpo_jax.toy --output=runs/s0_ft1 --objectives=dpo --config.seed=1 --config.toy.seed=0
  python -m dpo_jax.toy.pool --base=runs/s0 --runs=runs/s0,runs/s0_ft1 [--model=dpo] [--out=F.json]

One fine-tune's CI over prompts does not cover the spread between fine-tunes
with other seeds (noise, timesteps, batch order). This reads the images that
`python -m dpo_jax.toy` wrote (`images/<model>/metadata.jsonl` and the PNGs)
of the base and of the same model in several runs on the same base, prompts
and evaluation seeds, re-judges every image (`toy.judge`), and reports per run
and for the mean of the runs (each image's 0 / 1 score averaged over the runs,
then the prompt-clustered bootstrap) the change vs the base of each judge
metric, with 95 % CIs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLITS = ("heldout_prompts", "train_prompts")


def load_judged(run_dir: str, model: str, split: str) -> tuple[dict[str, np.ndarray], list]:
  """The judge's 0 / 1 scores of one model's images in one split, sorted by (prompt, seed).

  Returns:
    ({metric: [N] float64}, [(prompt, seed)] * N).

  Raises:
    FileNotFoundError: no metadata.jsonl for that model (naming the path), or a
      listed PNG is missing.
    ValueError: the split has no images.
  """
  from PIL import Image

  from dpo_jax.toy import judge, world

  folder = os.path.join(run_dir, "images", model)
  meta = os.path.join(folder, "metadata.jsonl")
  if not os.path.isfile(meta):
    raise FileNotFoundError(
      f"No {meta}: expected the output folder of `python -m dpo_jax.toy` with model {model!r}."
    )
  with open(meta) as f:
    rows = [r for r in map(json.loads, f) if r["split"] == split]
  if not rows:
    raise ValueError(f"{meta} has no images of split {split!r}.")
  rows.sort(key=lambda r: (r["prompt"], r["seed"]))
  images = np.stack(
    [np.asarray(Image.open(os.path.join(folder, r["file"])).convert("RGB")) for r in rows]
  )
  scores = judge.accuracy(images, [world.parse_prompt(r["prompt"]) for r in rows])
  return scores, [(r["prompt"], r["seed"]) for r in rows]


def pooled_changes(
  base: Mapping[str, np.ndarray],
  runs: Sequence[Mapping[str, np.ndarray]],
  prompts: Sequence[str],
) -> dict[str, Any]:
  """Per metric: each run's and the runs' mean change vs the base (`stats.compare`).

  Args:
    base: metric -> [N] 0 / 1 scores of the base.
    runs: per run, metric -> [N] scores on the same (prompt, seed) grid.
    prompts: the N prompts (bootstrap clusters).

  Returns:
    {"runs": [{metric: compare}], "mean": {metric: compare of the per-image
    mean over runs}}; compare's mean_diff is the change of the rate.
  """
  from dpo_jax import stats

  if not runs:
    raise ValueError("No runs to pool.")
  metrics = list(base)
  return {
    "runs": [{m: stats.compare(r[m], base[m], prompts) for m in metrics} for r in runs],
    "mean": {
      m: stats.compare(np.mean([r[m] for r in runs], axis=0), base[m], prompts) for m in metrics
    },
  }


def pool(base_dir: str, run_dirs: Sequence[str], model: str) -> dict[str, Any]:
  """`pooled_changes` for every split; every run must hold the base's (prompt, seed) grid.

  Raises:
    ValueError: a run's images are not on the base's (prompt, seed) grid.
  """
  out = {"base": base_dir, "runs": list(run_dirs), "model": model}
  for split in SPLITS:
    base, keys = load_judged(base_dir, "base", split)
    runs = []
    for d in run_dirs:
      scores, got = load_judged(d, model, split)
      if got != keys:
        raise ValueError(
          f"{d}: its {split} images are not on the base's (prompt, seed) grid ({len(got)} vs "
          f"{len(keys)} images, or other prompts / seeds): pool only runs on the same base, "
          "prompts and evaluation seeds."
        )
      runs.append(scores)
    out[split] = pooled_changes(base, runs, [p for p, _ in keys])
  return out


def format_table(result: Mapping[str, Any], metric: str = "all_three") -> str:
  """Markdown: per split, each run's change and the mean of the runs' change."""
  from dpo_jax import stats

  n = len(result["runs"])
  lines = [
    f"| prompts | {' | '.join(os.path.basename(os.path.normpath(d)) for d in result['runs'])} "
    f"| mean of {n} |",
    "|---|" + "---|" * (n + 1),
  ]
  for split in SPLITS:
    r = result[split]
    runs = [*r["runs"], r["mean"]]
    cells = [stats.format_mean_diff(run[metric]) for run in runs]
    lines.append(f"| {split.replace('_', ' ')} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    result = pool(f.base, f.runs, f.model)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  if f.out:
    with open(f.out, "w") as out:
      json.dump(result, out, indent=2)
  print(f"{f.model}: judge's all three right, change vs base in points [95 % CI over prompts]")
  print(format_table(result))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("base", None, "A `python -m dpo_jax.toy` output folder (its base).")
  flags.DEFINE_list("runs", None, "Output folders of runs on that base (may include --base).")
  flags.DEFINE_string("model", "dpo", "The model to pool (images/<model>/).")
  flags.DEFINE_string("out", "", "Also write the numbers here as JSON.")
  flags.mark_flags_as_required(["base", "runs"])
  app.run(main)
