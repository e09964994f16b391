"""Tunes a toy fine-tune's beta, learning rate and steps on the training prompts only.

  python -m dpo_jax.toy.tune --output=runs/toy_tune --seeds=0,1 \
      --betas=500,2000 --lrs=1e-4,3e-5 --steps=100,200,300 [--config.objective=sft ...]

For every seed (the whole toy world: base, pairs) and every (beta, lr) it
fine-tunes the base once for max(--steps) steps through the real trainer,
keeping a checkpoint at each listed step, and scores the base and each
checkpoint with the judge (`toy.judge`) on the *training* prompts only
(`toy.eval_seeds_train` fresh seeds each). Held-out prompts are never sampled
here: they are for the final comparison (`python -m dpo_jax.toy`) alone.

The fine-tune behind a checkpoint at k < max(--steps) warms up over
`optim.warmup_frac` x max(--steps) steps; the chosen setting comes with the
`warmup_frac` that gives a k-step run that same learning-rate schedule, so
that run (same seed and data order) is the checkpoint that was scored.

The choice: the setting whose worst seed has the highest lower 95 % bound of
the all-three change vs the base (a setting must help every seed, not one
seed a lot); ties go to the higher mean change. Writes to --output:
  tune.json   every (seed, beta, lr, steps): all-three change vs base with CI,
              the judge's rates, and the choice
  tune.md     the same as a table
  seed<S>/beta<B>_lr<LR>/   the fine-tunes' workdirs (a rerun resumes them and
              reuses finished scores: scores.json in each)
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from dpo_jax import logs

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "toy.py"
)

Setting = tuple[float, float, int]  # (beta, lr, steps)


def setting_name(beta: float, lr: float) -> str:
  return f"beta{beta:g}_lr{lr:g}"


def checkpoint_every(steps: Sequence[int]) -> int:
  """The checkpoint interval that lands on every listed step."""
  return math.gcd(*steps)


def warmup_frac_for(warmup_frac: float, max_steps: int, steps: int) -> float:
  """The warmup fraction of a `steps`-step run whose lr schedule is a `max_steps` run's.

  `optim.lr_schedule` warms up over round(warmup_frac x max_steps) steps, then
  stays constant, so a shorter run with this fraction follows the longer run's
  schedule step for step.
  """
  return int(round(warmup_frac * max_steps)) / steps


def change_row(summary: Mapping[str, Any]) -> dict[str, float]:
  """One fine-tune's line: its judge rates and the all-three change vs the base (in [0, 1])."""
  vs = summary["all_three"]["vs_base"]
  row = {m: v["rate"] for m, v in summary.items()}
  row.update(
    change=vs["mean_diff"],
    change_ci_low=vs["mean_diff_ci_low"],
    change_ci_high=vs["mean_diff_ci_high"],
  )
  return row


def choose(rows: Mapping[int, Mapping[Setting, Mapping[str, float]]]) -> dict[str, Any]:
  """The setting with the best worst-seed lower CI bound (ties: the higher mean change).

  Args:
    rows: seed -> (beta, lr, steps) -> `change_row`. Only settings present for
      every seed compete.

  Returns:
    {"beta", "lr", "steps", "worst_ci_low", "mean_change"}.

  Raises:
    ValueError: no setting was scored on every seed.
  """
  common = set.intersection(*(set(r) for r in rows.values())) if rows else set()
  if not common:
    raise ValueError("No (beta, lr, steps) was scored on every seed: nothing to choose from.")

  def key(s: Setting) -> tuple[float, float]:
    per_seed = [rows[seed][s] for seed in rows]
    worst = min(r["change_ci_low"] for r in per_seed)
    return worst, sum(r["change"] for r in per_seed) / len(per_seed)

  best = max(sorted(common), key=key)
  worst, mean = key(best)
  return {
    "beta": best[0],
    "lr": best[1],
    "steps": best[2],
    "worst_ci_low": worst,
    "mean_change": mean,
  }


def format_table(rows: Mapping[int, Mapping[Setting, Mapping[str, float]]]) -> str:
  """Markdown: one line per (beta, lr, seed), one column per step count."""
  steps = sorted({s[2] for r in rows.values() for s in r})
  lines = [
    "| beta | lr | seed | " + " | ".join(f"{n} steps" for n in steps) + " |",
    "|---|---|---|" + "---|" * len(steps),
  ]
  pairs = sorted({s[:2] for r in rows.values() for s in r}, key=lambda p: (p[0], -p[1]))
  for beta, lr in pairs:
    for seed, r in sorted(rows.items()):
      cells = []
      for n in steps:
        x = r.get((beta, lr, n))
        cells.append(
          "-"
          if x is None
          else f"{100 * x['change']:+.1f} [{100 * x['change_ci_low']:+.1f}, "
          f"{100 * x['change_ci_high']:+.1f}] (shape {100 * x['shape']:.0f} %)"
        )
      lines.append(f"| {beta:g} | {lr:g} | {seed} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _tune_one(config, workdir: str, steps: Sequence[int], pipeline, base_scored, specs, seeds):
  """Fine-tunes one (seed, beta, lr) and returns steps -> `change_row` (cached in scores.json)."""
  from dpo_jax import checkpoint, lora, trainer
  from dpo_jax.toy import run, world

  cache = os.path.join(workdir, "scores.json")
  settings_json = json.loads(config.to_json_best_effort())
  if os.path.exists(cache):
    with open(cache) as f:
      stored = json.load(f)
    if stored.get("config") != settings_json or sorted(map(int, stored["scores"])) != list(steps):
      raise ValueError(
        f"{cache} holds scores of another config or other steps: delete {workdir} or choose "
        "another --output."
      )
    return {int(k): v for k, v in stored["scores"].items()}
  trainer.train_and_evaluate(config, workdir)
  settings = run.sample_settings(config.toy)
  grid = world.grid_specs(specs, seeds)[0]
  out = {}
  for n in steps:
    params, _ = checkpoint.load_params_for_inference(os.path.join(workdir, "checkpoints", str(n)))
    scored = run.score_models(
      pipeline, {"ft": lora.full_unet(config, params, pipeline.unet_params)}, specs, seeds, settings
    )
    summary = run.summarize_attributes({"base": base_scored, **scored}, grid, "base")
    out[n] = change_row(summary["ft"])
  with open(cache, "w") as f:
    json.dump({"config": settings_json, "scores": out}, f, indent=2)
  return out


def tune(
  config,
  out_dir: str,
  seeds: Sequence[int],
  betas: Sequence[float],
  lrs: Sequence[float],
  steps: Sequence[int],
) -> dict[str, Any]:
  """Runs the grid (see the module docstring); writes tune.json / tune.md and returns tune.json.

  Raises:
    ValueError: a step count that is not positive, or an empty grid.
  """
  from dpo_jax.models import loader
  from dpo_jax.toy import run

  steps = sorted(set(steps))
  if not steps or steps[0] <= 0 or not seeds or not betas or not lrs:
    raise ValueError(
      f"Empty grid or non-positive steps: seeds {seeds}, betas {betas}, lrs {lrs}, steps {steps}."
    )
  if len(seeds) > 1 and (config.pretrained_path or config.data.path):
    raise ValueError(
      "A given pretrained_path / data.path is one seed's base and pairs: tune one seed with it, "
      f"or leave both empty to build each of seeds {list(seeds)}."
    )
  os.makedirs(out_dir, exist_ok=True)
  rows: dict[int, dict[Setting, dict[str, float]]] = {}
  for seed in seeds:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.toy.seed = seed
      c.max_steps = steps[-1]
      c.checkpoint_every = checkpoint_every(steps)
      c.keep_checkpoints = steps[-1] // c.checkpoint_every
      c.eval_every = 0
    c = run.materialize(c)
    pipeline = loader.load_pipeline(c.pretrained_path)
    specs = run.train_and_heldout(c.toy)[0]
    eval_seeds = run.eval_seeds(c.toy, train_prompts=True)
    settings = run.sample_settings(c.toy)
    base = run.score_models(pipeline, {"base": pipeline.unet_params}, specs, eval_seeds, settings)
    rows[seed] = {}
    for beta in betas:
      for lr in lrs:
        ft = copy.deepcopy(c)
        with ft.unlocked():
          ft.beta = beta
          ft.optim.lr = lr
        workdir = os.path.join(out_dir, f"seed{seed}", setting_name(beta, lr))
        scores = _tune_one(ft, workdir, steps, pipeline, base["base"], specs, eval_seeds)
        rows[seed].update({(beta, lr, n): scores[n] for n in steps})
        print(format_table(rows), flush=True)
  chosen = choose(rows)
  chosen["warmup_frac"] = warmup_frac_for(config.optim.warmup_frac, steps[-1], chosen["steps"])
  result = {
    "objective": config.objective,
    "chosen": chosen,
    "rows": [
      {"seed": seed, "beta": s[0], "lr": s[1], "steps": s[2], **row}
      for seed, per_setting in rows.items()
      for s, row in per_setting.items()
    ],
  }
  with open(os.path.join(out_dir, "tune.json"), "w") as f:
    json.dump(result, f, indent=2)
  summary = (
    f"Chosen: beta {chosen['beta']:g}, lr {chosen['lr']:g}, {chosen['steps']} steps, "
    f"optim.warmup_frac {chosen['warmup_frac']:g} (worst seed's lower bound "
    f"{100 * chosen['worst_ci_low']:+.1f}, mean change {100 * chosen['mean_change']:+.1f} points)."
  )
  with open(os.path.join(out_dir, "tune.md"), "w") as f:
    f.write(
      f"# Toy {config.objective} tuning on training prompts only\n\nAll three right: change vs "
      f"base in points [95 % CI over prompts].\n\n{format_table(rows)}\n\n{summary}\n"
    )
  print(summary)
  return result


def _define_flags() -> None:
  # Defined only when run as a program (`--config` is also the trainer's flag).
  config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Toy config (configs/toy.py).", lock_config=True
  )
  flags.DEFINE_string("output", "runs/toy_tune", "Where workdirs and the tables go.")
  flags.DEFINE_list("seeds", ["0", "1"], "Toy-world seeds (each its own base and pairs).")
  flags.DEFINE_list("betas", ["500", "2000"], "Values of config.beta (DPO's and RPO's beta).")
  flags.DEFINE_list("lrs", ["1e-4", "3e-5"], "Learning rates.")
  flags.DEFINE_list("steps", ["100", "200", "300"], "Steps at which to score.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  f = flags.FLAGS
  try:
    tune(
      f.config,
      os.path.abspath(f.output),
      [int(s) for s in f.seeds],
      [float(b) for b in f.betas],
      [float(x) for x in f.lrs],
      [int(n) for n in f.steps],
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  _define_flags()
  app.run(main)
