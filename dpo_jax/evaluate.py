"""Scores sampled images of several models with reward models and compares them.

  python -m dpo_jax.evaluate --samples=runs/samples_base,runs/samples_dpo --baseline=samples_base \
      --scorers=clip_score=/models/clip-vit-large-patch14,pickscore=/models/PickScore_v1,\
aesthetic=/models/aesthetic [--workdir=runs/sd15_dpo] --output=runs/eval

Each `--samples` folder is one model's output of `python -m dpo_jax.sample`
(PNGs + `metadata.jsonl` with `file`, `prompt`, `seed`); the model's name is
the folder's base name unless `--names` says otherwise. Images are matched
across models by (prompt, seed): every model must have exactly the same set,
otherwise the run stops and names what is missing where. Sample every model
with the same prompt file, `--num_images_per_prompt` and `--seed`.

Per metric (scorer) and model: mean score with a 95 % CI, and against the
baseline the win rate (ties 1/2), a strict win rate (differences within
`--strict_margins` are ties) and the mean score difference, each with a 95 %
CI. All CIs are `dpo_jax.stats`' percentile bootstraps over prompts (images of
one prompt are not independent). Written to --output:

  results.json              settings and every number above
  scores.jsonl              one line per image: model, prompt, seed, file, score per metric
  report.md                 one table per metric, and the plots
  score_distributions.png   box plots of each metric's scores per model
  win_rates.png             win rate vs the baseline per metric and model, CI error bars
  training_curves.png       (with --workdir) loss / implicit accuracy / reward margin /
                            grad norm / lr from each workdir's metrics.jsonl

`evaluate_scores` is the pure core (scores in, numbers out) that the toy
world and in-training evaluation can call directly.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from dpo_jax import builtin_scores, logs, stats

METADATA = "metadata.jsonl"
DEFAULT_STRICT_MARGIN = 0.1  # As `stats.compare`; pass one per metric scale.
# metrics.jsonl keys (after the train/ or eval/ prefix) drawn as training curves.
CURVE_KEYS = ("loss", "implicit_acc", "reward_margin", "grad_norm", "lr")

Key = tuple[str, int]  # (prompt, seed)


# ---------------------------------------------------------------------------
# Sample folders.


def read_samples(directory: str) -> list[dict[str, Any]]:
  """Rows of `directory/metadata.jsonl`, each with `path` = the image's full path."""
  path = os.path.join(directory, METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Missing {path}: not a folder written by `python -m dpo_jax.sample`.")
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      row = json.loads(line)
      missing = [k for k in ("file", "prompt", "seed") if k not in row]
      if missing:
        raise ValueError(f"{path} line {i + 1} lacks {missing}.")
      rows.append({**row, "seed": int(row["seed"]), "path": os.path.join(directory, row["file"])})
  if not rows:
    raise ValueError(f"{path} lists no images.")
  return rows


def _by_key(name: str, rows: Sequence[Mapping[str, Any]]) -> dict[Key, str]:
  out: dict[Key, str] = {}
  for row in rows:
    key = (row["prompt"], row["seed"])
    if key in out:
      raise ValueError(f"Model {name!r} has two images for (prompt, seed) {key}.")
    out[key] = row["path"]
  return out


def match_samples(
  samples: Mapping[str, Sequence[Mapping[str, Any]]],
) -> tuple[list[Key], dict[str, list[str]]]:
  """Aligns models' images by (prompt, seed).

  Args:
    samples: model name -> rows with `prompt`, `seed`, `path` (`read_samples`).

  Returns:
    (keys in the first model's order, model -> image paths in that order).

  Raises:
    ValueError: when the models' (prompt, seed) sets differ, naming for each
      model how many and which pairs it lacks.
  """
  maps = {name: _by_key(name, rows) for name, rows in samples.items()}
  union = set().union(*(m.keys() for m in maps.values()))
  problems = []
  for name, m in maps.items():
    lacking = sorted(union - m.keys())
    if lacking:
      problems.append(f"{name!r} lacks {len(lacking)} (prompt, seed) pair(s), e.g. {lacking[:5]}")
  if problems:
    raise ValueError(
      "The models were not sampled on the same (prompt, seed) pairs: "
      + "; ".join(problems)
      + ". Sample every model with the same prompts, --num_images_per_prompt and --seed."
    )
  first = next(iter(samples.values()))
  keys = [(r["prompt"], r["seed"]) for r in first]
  return keys, {name: [m[k] for k in keys] for name, m in maps.items()}


def load_image(path: str) -> np.ndarray:
  """An image file -> uint8 [H,W,3] (alpha composited on white, like the data path)."""
  from PIL import Image

  from dpo_jax.data import decode

  with Image.open(path) as img:
    img.load()
    return np.asarray(decode.to_rgb(img))


def score_files(
  scorer: Any, paths: Sequence[str], prompts: Sequence[str], chunk: int = 256
) -> np.ndarray:
  """Scores image files in chunks (bounded memory): -> float64 [N]."""
  out = [
    scorer([load_image(p) for p in paths[i : i + chunk]], prompts[i : i + chunk])
    for i in range(0, len(paths), chunk)
  ]
  return np.concatenate(out) if out else np.zeros((0,))


# ---------------------------------------------------------------------------
# The pure core.


def evaluate_scores(
  scores_by_model: Mapping[str, np.ndarray],
  prompts: Sequence[object],
  baseline: str,
  strict_margin: float = DEFAULT_STRICT_MARGIN,
  num_resamples: int = 2000,
  seed: int = 0,
) -> dict[str, Any]:
  """Mean scores and win rates vs `baseline` of models scored on the same items.

  Args:
    scores_by_model: model -> [N] scores; item i is the same (prompt, seed) for all.
    prompts: [N] prompt of each item (the bootstrap's clusters).
    baseline: the model the others are compared with.
    strict_margin: score differences within this are ties in `strict_win_rate`.
    num_resamples, seed: bootstrap settings (deterministic given the seed).

  Returns:
    {"baseline", "n", "num_prompts", "strict_margin", "models": {model: {"mean",
    "mean_ci": [lo, hi], "std", "vs_baseline": `stats.compare(model, baseline)`
    (win_rate, strict_win_rate, mean_diff, each with _ci_low/_ci_high), None for
    the baseline}}}.
  """
  if baseline not in scores_by_model:
    raise ValueError(f"Baseline {baseline!r} is not one of the models {sorted(scores_by_model)}.")
  n = len(prompts)
  arrays = {k: np.asarray(v, np.float64) for k, v in scores_by_model.items()}
  for name, a in arrays.items():
    if a.shape != (n,):
      raise ValueError(f"Scores of {name!r} have shape {a.shape}, expected ({n},).")
  base = arrays[baseline]
  models = {}
  for name, a in arrays.items():
    row: dict[str, Any] = {"mean": float(a.mean()), "std": float(a.std())}
    row["mean_ci"] = list(stats.bootstrap_ci(a, prompts, num_resamples, seed=seed))
    row["vs_baseline"] = (
      None
      if name == baseline
      else stats.compare(a, base, prompts, strict_margin, num_resamples, seed=seed)
    )
    models[name] = row
  return {
    "baseline": baseline,
    "n": n,
    "num_prompts": len(set(prompts)),
    "strict_margin": float(strict_margin),
    "models": models,
  }


def evaluate_metrics(
  scores: Mapping[str, Mapping[str, np.ndarray]],
  prompts: Sequence[object],
  baseline: str,
  strict_margins: Mapping[str, float] | None = None,
  num_resamples: int = 2000,
) -> dict[str, dict[str, Any]]:
  """`evaluate_scores` for each metric: {metric: {model: scores}} -> {metric: result}."""
  margins = strict_margins or {}
  return {
    metric: evaluate_scores(
      by_model,
      prompts,
      baseline,
      margins.get(metric, DEFAULT_STRICT_MARGIN),
      num_resamples,
    )
    for metric, by_model in scores.items()
  }


def _value_ci(value: float, lo: float, hi: float, fmt: str) -> str:
  return f"{value:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def format_report(metrics: Mapping[str, Mapping[str, Any]], plots: Sequence[str] = ()) -> str:
  """Markdown: one table per metric (mean, win rates, mean difference, 95 % CIs), then plots."""
  lines = ["# Evaluation", ""]
  for metric, res in metrics.items():
    base = res["baseline"]
    lines += [
      f"## {metric}",
      "",
      f"{res['n']} images per model, {res['num_prompts']} prompts; 95 % CIs are bootstraps "
      f"over prompts; strict = differences > {res['strict_margin']:g} (else ties).",
      "",
      f"| model | mean [95% CI] | win rate vs {base} [95% CI] | strict win rate [95% CI] "
      f"| mean diff vs {base} [95% CI] |",
      "|---|---|---|---|---|",
    ]
    for name, row in res["models"].items():
      mean = _value_ci(row["mean"], *row["mean_ci"], ".4g")
      vs = row["vs_baseline"]
      cells = ["(baseline)", "-", "-"]
      if vs is not None:
        cells = [
          _value_ci(vs[k], vs[k + "_ci_low"], vs[k + "_ci_high"], fmt)
          for k, fmt in (("win_rate", ".3f"), ("strict_win_rate", ".3f"), ("mean_diff", ".4g"))
        ]
      lines.append(f"| {name} | {mean} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend).


def _figure(ncols: int, width: float = 4.5, height: float = 3.5):
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width * ncols, height), layout="constrained")
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  return fig, axes


def plot_score_distributions(scores: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
  """One panel per metric: box plot of every model's scores, mean marked."""
  fig, axes = _figure(len(scores))
  for ax, (metric, by_model) in zip(axes, scores.items()):
    names = list(by_model)
    data = [np.asarray(by_model[m], np.float64) for m in names]
    ax.boxplot(data, tick_labels=names, showmeans=True)
    ax.set_title(metric)
    ax.set_ylabel("score")
    ax.tick_params(axis="x", labelrotation=20)
  fig.savefig(path, dpi=100)


def plot_win_rates(metrics: Mapping[str, Mapping[str, Any]], path: str) -> None:
  """Grouped bars: win rate vs the baseline per metric and model, 95 % CI error bars."""
  first = next(iter(metrics.values()))
  models = [m for m, row in first["models"].items() if row["vs_baseline"] is not None]
  fig, axes = _figure(1, width=max(4.5, 1.5 * len(metrics) * max(1, len(models))))
  ax = axes[0]
  width = 0.8 / max(1, len(models))
  x = np.arange(len(metrics))
  for j, model in enumerate(models):
    rows = [res["models"][model]["vs_baseline"] for res in metrics.values()]
    rate = np.array([r["win_rate"] for r in rows])
    low = rate - np.array([r["win_rate_ci_low"] for r in rows])
    high = np.array([r["win_rate_ci_high"] for r in rows]) - rate
    offset = (j - (len(models) - 1) / 2) * width
    ax.bar(x + offset, rate, width, yerr=np.stack([low, high]), capsize=4, label=model)
  ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
  ax.set_xticks(x, list(metrics))
  ax.set_ylim(0, 1)
  ax.set_ylabel(f"win rate vs {first['baseline']}")
  ax.legend()
  fig.savefig(path, dpi=100)


def read_metrics_jsonl(workdir: str) -> dict[str, dict[int, float]]:
  """`workdir/metrics.jsonl` -> {key: {step: value}}.

  Only finite numbers are kept (NaN is logged as a string); after a resume, the
  last value written for a step wins.
  """
  path = epath.Path(workdir) / "metrics.jsonl"  # Local or gs:// (etils.epath).
  if not path.is_file():
    raise FileNotFoundError(f"Missing {path}: --workdir must be a training workdir.")
  curves: dict[str, dict[int, float]] = {}
  with path.open("r") as f:
    for line in f:
      if not line.strip():
        continue
      row = json.loads(line)
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          curves.setdefault(key, {})[int(row["step"])] = float(value)
  return curves


def plot_training_curves(runs: Mapping[str, Mapping[str, Mapping[int, float]]], path: str) -> None:
  """A panel per `CURVE_KEYS` entry present; train/ solid, eval/ dots; a colour per run."""
  present = [
    k for k in CURVE_KEYS if any(f"{p}/{k}" in c for c in runs.values() for p in ("train", "eval"))
  ]
  if not present:
    raise ValueError(f"No curves {CURVE_KEYS} (train/ or eval/) in the workdirs' metrics.jsonl.")
  fig, axes = _figure(len(present), width=4.0)
  for ax, key in zip(axes, present):
    for i, (run, curves) in enumerate(runs.items()):
      for prefix, style in (("train", "-"), ("eval", "o--")):
        points = curves.get(f"{prefix}/{key}")
        if points:
          steps = sorted(points)
          ax.plot(steps, [points[s] for s in steps], style, color=f"C{i}", label=f"{run} {prefix}")
    ax.set_title(key)
    ax.set_xlabel("step")
  axes[0].legend(fontsize="small")
  fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Command line.


def model_names(dirs: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
  """`names`, or each folder's base name; must be distinct."""
  out = list(names) if names else [os.path.basename(os.path.normpath(d)) for d in dirs]
  if len(out) != len(dirs):
    raise ValueError(f"{len(dirs)} sample folders but {len(out)} names.")
  if len(set(out)) != len(out):
    raise ValueError(f"Model names {out} are not distinct; pass --names.")
  return out


def parse_margins(spec: Sequence[str]) -> dict[str, float]:
  """["clip_score=0.5", ...] -> {"clip_score": 0.5}."""
  out = {}
  for item in spec:
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--strict_margins item {item!r} is not METRIC=VALUE.")
    out[name] = float(value)
  return out


def run(
  sample_dirs: Sequence[str],
  baseline: str,
  scorers: Mapping[str, Any],
  output: str,
  *,
  names: Sequence[str] | None = None,
  workdirs: Sequence[str] = (),
  strict_margins: Mapping[str, float] | None = None,
  num_resamples: int = 2000,
  scorer_paths: Mapping[str, str] | None = None,
) -> dict[str, Any]:
  """Scores, compares and writes everything listed in the module docstring.

  Args:
    sample_dirs: `dpo_jax.sample` output folders, one per model.
    baseline: the model name (see `model_names`) the others are compared with.
    scorers: metric name -> callable `(images, prompts) -> [N]` (a `scorers.Scorer`).
    output: output folder (created).
    names, workdirs, strict_margins, num_resamples: see the flags.
    scorer_paths: metric -> model folder, recorded in results.json.

  Returns:
    The contents of results.json.
  """
  names = model_names(sample_dirs, names)
  if baseline not in names:
    raise ValueError(f"--baseline={baseline!r} is not one of the models {names}.")
  keys, files = match_samples({n: read_samples(d) for n, d in zip(names, sample_dirs)})
  prompts = [k[0] for k in keys]
  scores = {
    metric: {name: score_files(scorer, files[name], prompts) for name in names}
    for metric, scorer in scorers.items()
  }
  metrics = evaluate_metrics(scores, prompts, baseline, strict_margins, num_resamples)
  os.makedirs(output, exist_ok=True)
  plots = ["score_distributions.png", "win_rates.png"]
  plot_score_distributions(scores, os.path.join(output, plots[0]))
  if len(names) > 1:
    plot_win_rates(metrics, os.path.join(output, plots[1]))
  else:
    plots.pop()
  if workdirs:
    runs = {os.path.basename(os.path.normpath(w)): read_metrics_jsonl(w) for w in workdirs}
    plot_training_curves(runs, os.path.join(output, "training_curves.png"))
    plots.append("training_curves.png")
  with open(os.path.join(output, "scores.jsonl"), "w", encoding="utf-8") as f:
    for name in names:
      for i, (prompt, seed) in enumerate(keys):
        row = {"model": name, "prompt": prompt, "seed": seed, "file": files[name][i]}
        row.update({metric: float(scores[metric][name][i]) for metric in scores})
        f.write(json.dumps(row) + "\n")
  results = {
    "baseline": baseline,
    "models": dict(zip(names, [os.path.abspath(d) for d in sample_dirs])),
    "scorers": dict(scorer_paths or {}),
    "num_images_per_model": len(keys),
    "num_prompts": len(set(prompts)),
    "num_resamples": num_resamples,
    "workdirs": [os.path.abspath(w) for w in workdirs],
    "metrics": metrics,
    "plots": plots,
  }
  with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(output, "report.md"), "w", encoding="utf-8") as f:
    f.write(format_report(metrics, plots))
  return results


def parse_flags(argv: Sequence[str]):
  """absl flags in their own FlagValues (no process-wide FLAGS), so `main` can be called twice."""
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_list("samples", None, "Comma-separated `dpo_jax.sample` folders.", flag_values=fv)
  flags.DEFINE_list("names", [], "Model names (default: the folders' base names).", flag_values=fv)
  flags.DEFINE_string("baseline", None, "Model the others are compared with.", flag_values=fv)
  flags.DEFINE_string(
    "scorers", None, "NAME=PATH,...; names: clip_score, pickscore, aesthetic.", flag_values=fv
  )
  flags.DEFINE_string("output", None, "Output folder.", flag_values=fv)
  flags.DEFINE_list(
    "workdir", [], "Training workdir(s) whose metrics.jsonl to plot.", flag_values=fv
  )
  flags.DEFINE_list(
    "strict_margins", [], "METRIC=VALUE,... tie margins of the strict win rate.", flag_values=fv
  )
  flags.DEFINE_integer("batch_size", 32, "Images per scorer call.", flag_values=fv)
  flags.DEFINE_integer("num_resamples", 2000, "Bootstrap resamples.", flag_values=fv)
  return logs.parse_own_flags(fv, argv, __doc__, ("samples", "baseline", "scorers", "output"))


def main(argv: Sequence[str]) -> dict[str, Any]:
  """`python -m dpo_jax.evaluate`: see the module docstring."""
  from dpo_jax import scorers as scorers_lib

  fv = parse_flags(argv)
  builtin_scores.register()  # The model-free scores, by name.
  specs = scorers_lib.parse_scorer_specs(fv.scorers)
  scorers = {
    name: scorers_lib.make_scorer(name, path, batch_size=fv.batch_size)
    for name, path in specs.items()
  }
  results = run(
    fv.samples,
    fv.baseline,
    scorers,
    fv.output,
    names=fv.names or None,
    workdirs=fv.workdir,
    strict_margins=parse_margins(fv.strict_margins),
    num_resamples=fv.num_resamples,
    scorer_paths=specs,
  )
  print(format_report(results["metrics"]))
  print(f"Wrote results.json, scores.jsonl, report.md and {results['plots']} to {fv.output}")
  return results


if __name__ == "__main__":
  main(sys.argv)
