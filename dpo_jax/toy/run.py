"""Builds, caches and evaluates the toy world's assets around the real trainer.

  ensure_base   -> a pretrained toy pipeline folder (diffusers format)
  ensure_pairs  -> its preference pairs as Pick-a-Pic parquet + a report
  materialize   -> the run config with `pretrained_path` / `data.path` filled in
  score_models  -> images and rewards of several UNet parameter sets on the
                   same prompts and seeds
  summarize / summarize_attributes -> reward and judge (`toy.judge`) numbers
                   with prompt-clustered bootstrap CIs

Both assets live under `toy.cache_dir` (default ~/.cache/dpo_jax/toy) in
folders named by a hash of every setting that shapes them, written to a
temporary folder and renamed when complete, so an interrupted build is never
reused and changed settings never pick up a stale build. The toy world is a
single-host, CPU-scale workload: in a multi-process run, process 0 builds and
the others wait at a barrier.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from dpo_jax import distributed, lora, sample, stats
from dpo_jax.data import style as style_lib
from dpo_jax.models import loader
from dpo_jax.toy import base, judge, prefs, reward, world

Params = dict[str, Any]
_COMPLETE = "COMPLETE"


@dataclasses.dataclass(frozen=True)
class PromptSubset:
  """How many training prompts get pairs (0 = all); part of the pairs' cache key."""

  pair_prompts: int


def base_settings(toy: ml_collections.ConfigDict) -> base.BaseSettings:
  return base.BaseSettings(
    steps=toy.base_steps,
    batch_size=toy.base_batch_size,
    lr=toy.base_lr,
    text_lr_mult=toy.base_text_lr_mult,
    lr_schedule=toy.base_lr_schedule,
    ema_decay=toy.base_ema_decay,
    max_steps=toy.base_max_steps,
    check_every=toy.base_check_every,
    check_seeds=toy.base_check_seeds,
    target_all_three=toy.base_target_all_three,
    corrupt_frac=toy.corrupt_frac,
    clean_frac=toy.clean_frac,
    drop_frac=toy.drop_frac,
    num_heldout=toy.num_heldout,
    seed=toy.seed,
  )


def pair_settings(toy: ml_collections.ConfigDict) -> prefs.PairSettings:
  return prefs.PairSettings(
    num_seeds=toy.pair_seeds,
    min_gap=toy.min_gap,
    tie_tol=toy.tie_tol,
    num_inference_steps=toy.sample_steps,
    guidance_scale=toy.guidance_scale,
  )


def sample_settings(toy: ml_collections.ConfigDict, batch_size: int = 128) -> sample.SampleSettings:
  return sample.SampleSettings(toy.sample_steps, toy.guidance_scale, batch_size)


def cache_root(toy: ml_collections.ConfigDict) -> str:
  root = toy.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dpo_jax", "toy")
  return os.path.abspath(root)


def settings_key(*parts: Any) -> str:
  """Short stable hash of dataclass settings (the cache folder's name)."""
  blob = json.dumps([dataclasses.asdict(p) for p in parts], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build_once(final: str, build: Callable[[str], None]) -> str:
  """Runs `build(tmp)` and renames tmp -> `final`, unless `final` is complete already."""
  if os.path.exists(os.path.join(final, _COMPLETE)):
    return final
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  build(tmp)
  with open(os.path.join(tmp, _COMPLETE), "w") as f:
    f.write(time.strftime("%Y-%m-%dT%H:%M:%S"))
  shutil.rmtree(final, ignore_errors=True)  # An incomplete leftover.
  os.rename(tmp, final)
  return final


def ensure_base(toy: ml_collections.ConfigDict) -> str:
  """The pretrained toy base pipeline folder, built once per settings."""
  settings = base_settings(toy)
  final = os.path.join(cache_root(toy), f"base-{settings_key(settings)}")
  if os.path.exists(os.path.join(final, _COMPLETE)):
    logging.info("Toy base: reusing %s", final)
    return final
  logging.info(
    "Toy base: pretraining %d steps (up to %d) -> %s", settings.steps, settings.max_steps, final
  )

  def build(tmp):
    total = max(settings.steps, settings.max_steps)  # It may stop early (BaseSettings).
    with tqdm(total=total, desc="toy base (SFT pretraining)", unit="step") as bar:

      def progress(step, loss):
        bar.update(1)
        if step % 25 == 0:
          bar.set_postfix(loss=f"{float(loss):.4f}")

      base.train_base(tmp, settings, progress)

  return _build_once(final, build)


def train_and_heldout(toy: ml_collections.ConfigDict):
  """(train specs, held-out specs) of the toy split."""
  return world.split_specs(toy.num_heldout, toy.seed)


def pair_prompts(toy: ml_collections.ConfigDict) -> list[world.PromptSpec]:
  """The training prompts that get preference pairs: all, or `toy.pair_prompts` spread evenly."""
  train_specs, _ = train_and_heldout(toy)
  n = toy.pair_prompts
  if n <= 0 or n >= len(train_specs):
    return train_specs
  return [train_specs[i] for i in np.linspace(0, len(train_specs) - 1, n).round().astype(int)]


def sample_rewards(
  pipeline: loader.Pipeline,
  params: Params,
  specs: Sequence[world.PromptSpec],
  seeds: Sequence[int],
  settings: sample.SampleSettings,
  sample_fn: Callable | None = None,
  desc: str = "sampling",
) -> tuple[np.ndarray, np.ndarray]:
  """Images of `specs[i]` from `seeds[i]` and their rewards: (uint8 [N,H,W,3], [N])."""
  with tqdm(total=len(specs), desc=desc, unit="img") as bar:
    images = sample.generate(
      pipeline,
      params,
      [s.text for s in specs],
      seeds,
      settings,
      sample_fn=sample_fn,
      progress=bar.update,
    )
  return images, reward.reward(images, specs)


def ensure_pairs(toy: ml_collections.ConfigDict, base_path: str) -> str:
  """Pick-a-Pic parquet of base-model pairs (+ `pairs_report.json`), built once."""
  key = settings_key(base_settings(toy), pair_settings(toy), PromptSubset(toy.pair_prompts))
  final = os.path.join(cache_root(toy), f"pairs-{key}")
  if os.path.exists(os.path.join(final, _COMPLETE)):
    logging.info("Toy pairs: reusing %s", final)
    return final
  ps = pair_settings(toy)

  def build(tmp):
    pipeline = loader.load_pipeline(base_path)
    train_specs = pair_prompts(toy)
    seeds = range(ps.first_seed, ps.first_seed + ps.num_seeds)
    specs, all_seeds = world.grid_specs(train_specs, seeds)
    t0 = time.perf_counter()
    images, rewards = sample_rewards(
      pipeline,
      pipeline.unet_params,
      specs,
      all_seeds,
      sample_settings(toy),
      desc="toy pairs (base samples)",
    )
    groups = [s.text for s in specs]
    pairs, counts = prefs.label_pairs(rewards, groups, ps.min_gap, ps.tie_tol)
    parquet = prefs.write_parquet(tmp, images, groups, all_seeds, pairs)
    report = {
      "settings": dataclasses.asdict(ps),
      "base": base_path,
      "parquet": os.path.basename(parquet),
      "num_images": len(images),
      "num_prompts": len(train_specs),
      "pairs": counts,
      "rows_written": len(pairs),
      "base_mean_reward_train_prompts": float(rewards.mean()),
      "sample_seconds": time.perf_counter() - t0,
    }
    prefs.write_report(os.path.join(tmp, "pairs_report.json"), report)
    logging.info("Toy pairs: %s", {k: report[k] for k in ("pairs", "rows_written")})

  return _build_once(final, build)


def ensure_style_pairs(pairs_path: str, style_name: str) -> str:
  """Style preference set (`data.style`) over every distinct image of the toy pairs."""
  final = f"{pairs_path}-style-{style_name}"

  def build(tmp):
    report = style_lib.build_style_pairs(pairs_path, tmp, style_name)
    logging.info("Toy style pairs: %s", report["splits"])

  return _build_once(final, build)


def materialize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a toy config with the base pipeline and pair data filled in.

  `pretrained_path` / `data.path` given on the command line are kept (e.g. a
  base built elsewhere); empty ones are built or reused from the cache. With
  `toy.style` set the training data is that style's preference set built from
  the toy pairs' images (`data.style`).
  """
  config = copy.deepcopy(config)
  toy = config.toy

  def resolve() -> tuple[str, str]:
    base_path = config.pretrained_path or ensure_base(toy)
    if config.data.path:
      return base_path, config.data.path
    pairs = ensure_pairs(toy, base_path)
    return base_path, ensure_style_pairs(pairs, toy.style) if toy.style else pairs

  if jax.process_index() == 0:
    resolved = resolve()
  # The others wait minutes while process 0 pretrains: a barrier, not a device collective.
  distributed.barrier("dpo_jax_toy_assets")
  if jax.process_index() != 0:
    resolved = resolve()  # Reads what process 0 built.
  config.pretrained_path, config.data.path = resolved
  return config


def score_models(
  pipeline: loader.Pipeline,
  models: Mapping[str, Params],
  specs: Sequence[world.PromptSpec],
  seeds: Sequence[int],
  settings: sample.SampleSettings,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """name -> (images, rewards) of every model on the same (spec, seed) grid."""
  fn = sample.make_sample_fn(pipeline, settings)
  grid, grid_seeds = world.grid_specs(specs, seeds)
  return {
    name: sample_rewards(pipeline, params, grid, grid_seeds, settings, fn, desc=f"sampling {name}")
    for name, params in models.items()
  }


def eval_seeds(toy: ml_collections.ConfigDict, train_prompts: bool = False) -> list[int]:
  """Evaluation seeds (disjoint from the pair seeds), per held-out or training prompt."""
  return list(range(10_000, 10_000 + (toy.eval_seeds_train if train_prompts else toy.eval_seeds)))


def summarize(rewards: Mapping[str, np.ndarray], prompts: Sequence[str], baseline: str) -> dict:
  """Per model: mean reward (prompt-clustered CI) and win rate vs `baseline`."""
  out = {}
  for name, r in rewards.items():
    row = {"mean_reward": float(np.mean(r))}
    row["mean_reward_ci"] = list(stats.bootstrap_ci(r, prompts))
    if name != baseline:
      row["vs_" + baseline] = stats.compare(r, rewards[baseline], prompts)
    out[name] = row
  return out


def summarize_attributes(
  scored: Mapping[str, tuple[np.ndarray, np.ndarray]],
  specs: Sequence[world.PromptSpec],
  baseline: str,
) -> dict:
  """Per model and judge metric (`judge.METRICS`): rate, its CI, and the change vs `baseline`.

  Args:
    scored: model -> (images [N, H, W, 3], rewards [N]) on the same (prompt, seed) grid.
    specs: the N prompts of that grid.
    baseline: the model the others are compared with.

  Returns:
    model -> metric -> {"rate", "rate_ci", and for other models "vs_<baseline>":
    `stats.compare` of the 0 / 1 scores (mean_diff = change of the rate, with CI)}.
  """
  prompts = [s.text for s in specs]
  acc = {name: judge.accuracy(images, specs) for name, (images, _) in scored.items()}
  out = {}
  for name, metrics in acc.items():
    row = {}
    for metric, values in metrics.items():
      m = {"rate": float(values.mean()), "rate_ci": list(stats.bootstrap_ci(values, prompts))}
      if name != baseline:
        m["vs_" + baseline] = stats.compare(values, acc[baseline][metric], prompts)
      row[metric] = m
    out[name] = row
  return out


def before_after(config: ml_collections.ConfigDict, params: Params) -> dict[str, Any]:
  """Reward and judged attributes of the base vs the fine-tuned params; prints the tables."""
  toy = config.toy
  pipeline = loader.load_pipeline(config.pretrained_path)
  params = lora.full_unet(config, params, pipeline.unet_params)
  settings = sample_settings(toy)
  train_specs, heldout = train_and_heldout(toy)
  name = f"{config.objective}_{toy.style}" if toy.style else config.objective
  models = {"base": pipeline.unet_params, name: params}
  result, attrs, style_result = {}, {}, {}
  for split, specs, seeds in (
    ("train_prompts", train_specs, eval_seeds(toy, train_prompts=True)),
    ("heldout_prompts", heldout, eval_seeds(toy)),
  ):
    scored = score_models(pipeline, models, specs, seeds, settings)
    grid = world.grid_specs(specs, seeds)[0]
    prompts = [p.text for p in grid]
    result[split] = summarize({k: v[1] for k, v in scored.items()}, prompts, "base")
    attrs[split] = summarize_attributes(scored, grid, "base")
    if toy.style:
      style_result[split] = summarize(style_scores(scored, toy.style), prompts, "base")
  print(format_table(result))
  print(format_attribute_table(attrs))
  result["attributes"] = attrs
  if toy.style:
    print(format_table(style_result, metric=f"{toy.style} style score"))
    result["style"] = style_result
  return result


def style_scores(
  scored: Mapping[str, tuple[np.ndarray, np.ndarray]], style_name: str
) -> dict[str, np.ndarray]:
  """model -> style score of each of its images (`data.style`)."""
  style = style_lib.get_style(style_name)
  return {name: style.score(images) for name, (images, _) in scored.items()}


def _fmt_ci(lo_hi: Sequence[float]) -> str:
  return f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"


def format_table(result: Mapping[str, Mapping[str, Any]], metric: str = "reward") -> str:
  """Markdown table: prompts, model, mean `metric`, win rate vs base with 95 % CIs."""
  lines = [
    f"| prompts | model | mean {metric} [95% CI] | win rate vs base [95% CI] | strict win rate |",
    "|---|---|---|---|---|",
  ]
  for split, models in result.items():
    for name, row in models.items():
      vs = row.get("vs_base")
      win = (
        f"{vs['win_rate']:.2f} {_fmt_ci((vs['win_rate_ci_low'], vs['win_rate_ci_high']))}"
        if vs
        else "-"
      )
      strict = f"{vs['strict_win_rate']:.2f}" if vs else "-"
      lines.append(
        f"| {split.replace('_', ' ')} | {name} | {row['mean_reward']:.3f} "
        f"{_fmt_ci(row['mean_reward_ci'])} | {win} | {strict} |"
      )
  return "\n".join(lines)


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def format_attribute_table(result: Mapping[str, Mapping[str, Any]], baseline: str = "base") -> str:
  """Markdown table of `summarize_attributes` per split: rates in %, all-three change with CI."""
  lines = [
    "| prompts | model | colour right | quadrant right | shape right | all three right [95% CI] "
    f"| all three: change vs {baseline} [95% CI] | blank |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for split, models in result.items():
    for name, row in models.items():
      a = row["all_three"]
      vs = a.get("vs_" + baseline)
      change = stats.format_mean_diff(vs) if vs else "-"
      lines.append(
        f"| {split.replace('_', ' ')} | {name} | {_pct(row['colour']['rate'])} % "
        f"| {_pct(row['quadrant']['rate'])} % | {_pct(row['shape']['rate'])} % "
        f"| {_pct(a['rate'])} % [{_pct(a['rate_ci'][0])}, {_pct(a['rate_ci'][1])}] | {change} "
        f"| {_pct(row['blank']['rate'])} % |"
      )
  return "\n".join(lines)
