"""The full toy comparison: base vs DPO vs SFT vs RPO on held-out prompts, and style alignment.

  python -m dpo_jax.toy --output=runs/toy_compare [--objectives=dpo,sft,rpo,style]
  (also available, not in the default list: mapo, kto, dspo, sdpo; each with
  the authors' hyperparameters from configs/common.py unless overridden, e.g.
  --config.mapo.beta=...)

Builds (or reuses from the cache) the toy base and its preference pairs,
fine-tunes the base with each objective through the real trainer
(`trainer.train_and_evaluate`, Pick-a-Pic data path), samples every model on
the same prompts and seeds, scores the images with the toy reward and writes
to --output:
  results.json   per model: mean reward (95 % CI), win rate vs base (95 % CI,
                 prompt-clustered bootstrap), strict win rate; the judge's
                 attribute rates ("attributes": colour, quadrant, shape, all
                 three right, blank; each with CI and change vs base with CI);
                 DPO vs SFT and X vs DPO (X = rpo, mapo, kto, dspo, sdpo: those
                 run) on both; the style score table
                 ("style": DPO on the `--config.toy.style` preference set); settings
  report.md      the tables and the grid, plus the data / timing facts
  grid.png       held-out prompts (rows) x seeds, one labelled block of columns per
                 model, each image with its reward and judged attributes
  images/        every generated image as PNG, and images/metadata.jsonl with
                 model, prompt, seed, file, reward and the judge's reading, so
                 anyone can re-score them
  <objective>/   each fine-tune's workdir (checkpoints, TensorBoard, metrics.jsonl)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dpo_jax import logs  # noqa: E402

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "toy.py"
)
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  _DEFAULT_CONFIG,
  "Toy config (configs/toy.py); its objective is ignored.",
  lock_config=True,
)
_OUTPUT = flags.DEFINE_string("output", "runs/toy_compare", "Where results, report and images go.")
_OBJECTIVES = flags.DEFINE_list(
  "objectives",
  ["dpo", "sft", "rpo", "style"],
  "Fine-tunes to compare with the base: dpo, sft, rpo, mapo, kto, dspo, sdpo (on the reward "
  "pairs; kto treats winners as liked and losers as disliked images) and style (DPO on the "
  "style preference set of --config.toy.style, default amber_duotone).",
)
# Each listed comparison (a vs b) is reported when both were run.
_COMPARISONS = (
  ("dpo", "sft"),
  ("rpo", "dpo"),
  ("mapo", "dpo"),
  ("kto", "dpo"),
  ("dspo", "dpo"),
  ("sdpo", "dpo"),
)
_DEFAULT_STYLE = "amber_duotone"
_GRID_SEEDS = 6


def _slug(text: str) -> str:
  return text.replace(" ", "_")


def write_images(
  out_dir: str,
  scored: Mapping[str, tuple[np.ndarray, np.ndarray]],
  prompts: Sequence[str],
  seeds: Sequence[int],
  split: str,
  meta,
) -> None:
  """PNG per image under out_dir/images/<model>/, one metadata line each.

  Lines go to `meta` (all models, paths relative to out_dir) and to
  images/<model>/metadata.jsonl (paths relative to that folder), so each model
  folder is also a `python -m dpo_jax.sample`-style folder that
  `python -m dpo_jax.evaluate --samples=...` scores.
  """
  from PIL import Image

  from dpo_jax.toy import judge

  for model, (images, rewards) in scored.items():
    folder = os.path.join(out_dir, "images", model)
    os.makedirs(folder, exist_ok=True)
    seen = judge.describe(images)
    with open(os.path.join(folder, "metadata.jsonl"), "a") as own:
      for img, r, p, s, saw in zip(images, rewards, prompts, seeds, seen):
        name = f"{split}_{_slug(p)}_{s}.png"
        Image.fromarray(img).save(os.path.join(folder, name))
        row = {"model": model, "split": split, "prompt": p, "seed": int(s), "reward": float(r)}
        row["judge"] = saw
        meta.write(json.dumps({**row, "file": f"images/{model}/{name}"}) + "\n")
        own.write(json.dumps({**row, "file": name}) + "\n")


def report_markdown(results: dict[str, Any], models: Sequence[str], heldout: Sequence[str]) -> str:
  from dpo_jax import stats
  from dpo_jax.toy import run

  table = run.format_table(results["rewards"])
  lines = [
    "# Toy world: base vs " + " vs ".join(m for m in models if m != "base"),
    "",
    "Reward: `dpo_jax.toy.reward` (1 = ideal rendering, ~0.87 = jittered ground truth, 0 = "
    "wrong colour in the right place, ~-0.9 = right shape in the wrong quadrant, ~-1.8 = "
    "blank). Win rates count ties as 1/2; strict = only differences > 0.1 count. 95 % CIs: "
    "bootstrap over prompts.",
    "",
    table,
    "",
    "Attributes: `dpo_jax.toy.judge` reads the colour, quadrant and shape from each image "
    "alone (dominant colour blob, the quadrant holding most of it, best-matching shape "
    "template) and compares them with the prompt; all three right on >= 98 % of jittered "
    "ground-truth renders. Blank = less than a quarter of a shape's ink.",
    "",
    run.format_attribute_table(results["attributes"]),
    "",
  ]
  for a, b in _COMPARISONS:
    if f"{a}_vs_{b}" in results:
      d = results[f"{a}_vs_{b}"]
      t = results[f"{a}_vs_{b}_attributes"]["all_three"]
      k = results[f"{a}_vs_{b}_attributes"]["blank"]
      verdict = "beats" if d["win_rate_ci_low"] > 0.5 else "does not clearly beat"
      lines += [
        f"{a.upper()} vs {b.upper()} on held-out prompts: reward win rate {d['win_rate']:.2f} "
        f"[{d['win_rate_ci_low']:.2f}, {d['win_rate_ci_high']:.2f}] (so {a.upper()} {verdict} "
        f"{b.upper()} on the reward); all three right "
        f"{stats.format_mean_diff(t, ' points')}; blank {stats.format_mean_diff(k, ' points')}.",
        "",
      ]
  style = {k: v for k, v in results["style"].items() if k != "name"}
  lines += [
    f"Style alignment: `style` is DPO on (image in {results['style']['name']} > original) pairs "
    "built from the reward pairs' images; style score = share of colour on the palette "
    "(`dpo_jax.data.style`).",
    "",
    run.format_table(style, metric="style score"),
    "",
  ]
  lines += [
    "Held-out prompts (never in pretraining or preference data; every word is): "
    + "; ".join(heldout),
    "",
    f"![grid](grid.png) — rows: held-out prompts; column blocks: {', '.join(models)}; "
    "same seeds in every block; under each image its reward and the judge's C(olour) "
    "Q(uadrant) S(hape), green = right, red = wrong.",
    "",
    "```json",
    json.dumps({k: results[k] for k in ("pairs", "timings_s", "base")}, indent=2),
    "```",
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  from PIL import Image

  from dpo_jax import lora, stats, trainer
  from dpo_jax.models import loader
  from dpo_jax.step import OBJECTIVES
  from dpo_jax.toy import grid, judge, run, world

  unknown = [n for n in _OBJECTIVES.value if n != "style" and n not in OBJECTIVES]
  if unknown:
    raise app.UsageError(
      f"--objectives: unknown {unknown}; expected names from {list(OBJECTIVES)} or 'style'."
    )
  out_dir = os.path.abspath(_OUTPUT.value)
  os.makedirs(out_dir, exist_ok=True)
  timings = {}
  t0 = time.perf_counter()
  config = run.materialize(_CONFIG.value)
  timings["base_and_pairs"] = time.perf_counter() - t0
  toy = config.toy

  params = {}
  style_name = toy.style or _DEFAULT_STYLE
  for name in _OBJECTIVES.value:
    c = copy.deepcopy(config)
    c.toy.style = ""
    c.objective = name
    if name == "style":
      c.objective = "dpo"
      c.data.path = run.ensure_style_pairs(config.data.path, style_name)
    t0 = time.perf_counter()
    result = trainer.train_and_evaluate(c, os.path.join(out_dir, name))
    params[name] = result["state"].params
    timings[f"train_{name}"] = time.perf_counter() - t0

  pipeline = loader.load_pipeline(config.pretrained_path)
  # A LoRA run's state holds only adapters: merge them into the base to sample.
  models = {
    "base": pipeline.unet_params,
    **{k: lora.full_unet(config, p, pipeline.unet_params) for k, p in params.items()},
  }
  settings = run.sample_settings(toy)
  train_specs, heldout = run.train_and_heldout(toy)
  rewards, attributes, style, all_scored = {}, {}, {}, {}
  t0 = time.perf_counter()
  shutil.rmtree(os.path.join(out_dir, "images"), ignore_errors=True)  # A previous run's.
  with open(os.path.join(out_dir, "images_metadata.tmp"), "w") as meta:
    for split, specs, seeds in (
      ("heldout_prompts", heldout, run.eval_seeds(toy)),
      ("train_prompts", train_specs, run.eval_seeds(toy, train_prompts=True)),
    ):
      scored = run.score_models(pipeline, models, specs, seeds, settings)
      grid_specs, grid_seeds = world.grid_specs(specs, seeds)
      prompts = [s.text for s in grid_specs]
      rewards[split] = run.summarize({k: v[1] for k, v in scored.items()}, prompts, "base")
      attributes[split] = run.summarize_attributes(scored, grid_specs, "base")
      style[split] = run.summarize(run.style_scores(scored, style_name), prompts, "base")
      write_images(out_dir, scored, prompts, grid_seeds, split, meta)
      all_scored[split] = (scored, grid_specs, len(specs), len(seeds))
  os.replace(
    os.path.join(out_dir, "images_metadata.tmp"), os.path.join(out_dir, "images", "metadata.jsonl")
  )
  timings["evaluation"] = time.perf_counter() - t0

  scored, specs_grid, n_prompts, n_seeds = all_scored["heldout_prompts"]
  prompts = [s.text for s in specs_grid]
  results = {
    "rewards": rewards,
    "attributes": attributes,
    "style": {"name": style_name, **style},
    "timings_s": timings,
  }
  for a, b in _COMPARISONS:
    if a in scored and b in scored:
      results[f"{a}_vs_{b}"] = stats.compare(scored[a][1], scored[b][1], prompts)
      acc_a = judge.accuracy(scored[a][0], specs_grid)
      acc_b = judge.accuracy(scored[b][0], specs_grid)
      results[f"{a}_vs_{b}_attributes"] = {
        m: stats.compare(acc_a[m], acc_b[m], prompts) for m in judge.METRICS
      }
  with open(os.path.join(config.data.path, "pairs_report.json")) as f:
    results["pairs"] = {k: v for k, v in json.load(f).items() if k != "settings"}
  with open(os.path.join(config.pretrained_path, "toy_base.json")) as f:
    results["base"] = {k: v for k, v in json.load(f).items() if not k.endswith("_prompts")}
  results["config"] = json.loads(config.to_json_best_effort())
  picture = grid.annotated_grid(scored, specs_grid, n_prompts, n_seeds, _GRID_SEEDS)
  Image.fromarray(picture).save(os.path.join(out_dir, "grid.png"))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_markdown(results, list(models), [s.text for s in heldout]))
  print(run.format_table(rewards))
  print(run.format_attribute_table(attributes))
  print(run.format_table(style, metric=f"{style_name} style score"))
  print(f"Wrote {out_dir}/report.md, results.json, grid.png, images/")


if __name__ == "__main__":
  app.run(main)
