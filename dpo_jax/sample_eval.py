"""Periodic in-training evaluation by sampling: fixed prompts and seeds, scored, logged.

Every `config.sample_eval.every` steps (and after the last step) the trainer
samples `images_per_prompt` images for each prompt of `sample_eval.prompts`
(`dpo_jax.prompts.load_prompts`: "builtin", "pickapic:DIR[:SPLIT]" or a file)
with the current UNet params and the same seeds every time, scores them with
`sample_eval.scorers` (`dpo_jax.scorers`, e.g. "pickscore=/m/PickScore_v1" or
the model-free "toy_reward,style_amber_duotone"), and writes
  sample_eval/<scorer>   mean score (TensorBoard + metrics.jsonl via the writer)
  sample_eval/grid       the image grid (TensorBoard image; also
                         workdir/sample_eval/step_<step>.png)
It reuses `sample.generate` and the scorers of `dpo_jax.evaluate`, so these
numbers are the ones `python -m dpo_jax.sample` + `dpo_jax.evaluate` give for
a checkpoint of the same step. Sampling runs on the trainer's mesh with the
UNet params in their training (FSDP) sharding, so it needs no replicated copy
of the model and works with any number of processes; every process gets the
images and scores them, process 0 writes the grid.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from dpo_jax import builtin_scores, sample, sharding
from dpo_jax import prompts as prompts_lib
from dpo_jax.models import conditioning


@dataclasses.dataclass(eq=False)
class SampleEval:
  """Samples a fixed (prompt, seed) grid, scores it and logs it; see the module docstring."""

  pipeline: Any
  prompts: list[str]
  seeds: list[int]
  settings: sample.SampleSettings
  scorers: Mapping[str, Any]
  out_dir: str
  columns: int
  mesh: Mesh
  # Text encoder(s) and VAE replicated over the mesh: `share_encoders` (the
  # trainer's data-encoder copy), else placed on first use.
  frozen: Any = None
  # Compiled on first use (the UNet params' sharding is known only then).
  _sample_fn: Any = None

  def share_encoders(self, placed: Mapping[str, Any]) -> None:
    """Samples with encoder params already replicated over the mesh (no second device copy)."""
    self.frozen = {k: placed[k] for k in conditioning.frozen_params(self.pipeline)}

  def __call__(self, step: int, unet_params: Any, writer: Any) -> dict[str, float]:
    if self._sample_fn is None:
      self._sample_fn = sample.make_sample_fn(
        self.pipeline,
        self.settings,
        mesh=self.mesh,
        unet_sharding=sample.unet_shardings(unet_params, self.mesh),
      )
    if self.frozen is None:
      self.frozen = jax.device_put(
        conditioning.frozen_params(self.pipeline), sharding.replicated(self.mesh)
      )
    images = sample.generate(
      self.pipeline,
      unet_params,
      self.prompts,
      self.seeds,
      self.settings,
      mesh=self.mesh,
      sample_fn=self._sample_fn,
      frozen=self.frozen,
    )
    out = {
      f"sample_eval/{name}": float(np.mean(scorer(images, self.prompts)))
      for name, scorer in self.scorers.items()
    }
    grid = sample.grid_image(images, self.columns)
    if jax.process_index() == 0:
      from PIL import Image

      # etils.epath: a gs:// workdir keeps its grids in the bucket.
      out_dir = epath.Path(self.out_dir)
      out_dir.mkdir(parents=True, exist_ok=True)
      with (out_dir / f"step_{step:07d}.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    if out:
      writer.write_scalars(step, out)
    writer.write_images(step, {"sample_eval/grid": grid[None]})
    logging.info("Sample eval at step %d: %s", step, out or "(no scorers; grid only)")
    return out


def make_sample_eval(
  config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, pipeline: Any = None
) -> SampleEval | None:
  """The evaluator of `config.sample_eval` on the trainer's `mesh`; None when off (every == 0).

  `pipeline`: the run's loaded pipeline, whose encoders, VAE and tokenizers
  are reused (its UNet weights are not kept: sampling uses the trained
  params); without one (a latent-cache run) they are loaded from
  `config.pretrained_path`, the UNet weights skipped.
  """
  from dpo_jax import scorers as scorers_lib
  from dpo_jax.models import loader

  se = config.sample_eval
  if not se.every:
    return None
  if not config.pretrained_path:
    raise ValueError(
      "sample_eval.every > 0 samples images, which needs config.pretrained_path (the text "
      "encoder(s), VAE and scheduler of a diffusers pipeline folder)."
    )
  prompts = prompts_lib.load_prompts(se.prompts)
  if se.max_prompts:
    prompts = prompts[: se.max_prompts]
  grid_prompts, seeds = sample.prompt_seed_grid(prompts, se.images_per_prompt, se.seed)
  builtin_scores.register()  # The model-free scores, by name.
  specs = scorers_lib.parse_scorer_specs(se.scorers) if se.scorers else {}
  if pipeline is None:
    variant = config.get("pretrained_variant", "") or None
    pipeline = loader.load_pipeline(config.pretrained_path, unet_weights=False, variant=variant)
  return SampleEval(
    pipeline=dataclasses.replace(pipeline, unet_params=None),
    prompts=grid_prompts,
    seeds=seeds,
    settings=sample.SampleSettings(
      num_inference_steps=se.num_inference_steps,
      guidance_scale=se.guidance_scale,
      batch_size=se.batch_size,
      scheduler=se.scheduler,
    ),
    scorers={n: scorers_lib.make_scorer(n, p) for n, p in specs.items()},
    out_dir=os.fspath(epath.Path(workdir) / "sample_eval"),
    columns=se.images_per_prompt,
    mesh=mesh,
  )
