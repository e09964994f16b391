"""SDXL sampling against diffusers' PyTorch `StableDiffusionXLPipeline` on a tiny SDXL folder.

Same folder, initial noise, scheduler and classifier-free guidance; float32.
diffusers' SDXL pipelines guide against zeros, not the encoded "" prompt
(`force_zeros_for_empty_prompt`, stored in `model_index.json`), so both the
default folder (True) and one that sets it false (as the SDXL refiner does)
are compared.
"""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch

from dpo_jax import sample
from dpo_jax.models import loader
from dpo_jax.tools import make_tiny_pipeline

# As tests/test_samplers.py's SD1.5 parity (measured there ~1.7e-5 over [0, 1] pixels).
PIXEL_TOL = 2e-4
STEPS, GUIDANCE = 5, 7.5
PROMPTS = ["a photo of an astronaut riding a horse", "a red cat", "a red cat"]
SEEDS = [0, 1, 5]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[bool, str]:
  """force_zeros_for_empty_prompt -> a tiny SDXL folder (the same weights)."""
  default = make_tiny_pipeline.make_tiny_pipeline(
    "sdxl", str(tmp_path_factory.mktemp("tiny_sdxl")), seed=0, backend="torch"
  )
  with open(f"{default}/model_index.json") as f:
    index = json.load(f)
  # save_pretrained records the pipeline's config: diffusers' default is True.
  assert index["force_zeros_for_empty_prompt"] is True
  off = str(tmp_path_factory.mktemp("tiny_sdxl_no_zeros"))
  shutil.copytree(default, off, dirs_exist_ok=True)
  with open(f"{off}/model_index.json", "w") as f:
    json.dump({**index, "force_zeros_for_empty_prompt": False}, f)
  return {True: default, False: off}


def run_both(folder: str) -> tuple[np.ndarray, np.ndarray]:
  """(ours, diffusers') float images [N, 32, 32, 3] in [0, 1] for PROMPTS / SEEDS.

  The folder's own scheduler (Euler, "leading"); the schedulers themselves are
  compared with diffusers' in tests/test_samplers.py.
  """
  pipe = loader.load_pipeline(folder)
  settings = sample.SampleSettings(STEPS, GUIDANCE, 3, scheduler="euler", num_devices=1)
  fn = sample.make_sample_fn(pipe, settings, output="float")
  ours = sample.generate(pipe, pipe.unet_params, PROMPTS, SEEDS, settings, sample_fn=fn)
  ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
  ref = ref.to(torch.float32)
  ref.set_progress_bar_config(disable=True)
  noise = sample.initial_noise(SEEDS, sample.latent_shape(pipe))
  want = ref(
    PROMPTS,
    num_inference_steps=STEPS,
    guidance_scale=GUIDANCE,
    latents=torch.from_numpy(noise.copy()),
    output_type="np",
  ).images
  return ours, want


@pytest.fixture(scope="module")
def runs(folders):
  """force_zeros_for_empty_prompt -> run_both(its folder), computed on first use."""
  cache = {}

  def get(force_zeros: bool):
    if force_zeros not in cache:
      cache[force_zeros] = run_both(folders[force_zeros])
    return cache[force_zeros]

  return get


def test_zero_negative_conditioning_follows_the_folder(folders):
  assert sample.zero_negative_conditioning(loader.load_pipeline(folders[True], unet_weights=False))
  off = loader.load_pipeline(folders[False], unet_weights=False)
  assert not sample.zero_negative_conditioning(off)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_matches_diffusers_pipeline(runs, force_zeros):
  ours, want = runs(force_zeros)
  assert ours.shape == want.shape == (3, 32, 32, 3) and ours.dtype == np.float32
  diff = float(np.abs(ours - want).max())
  print(f"sdxl, force_zeros_for_empty_prompt={force_zeros}: max |jax - torch| = {diff:.2e}")
  assert diff < PIXEL_TOL
  # Meaningful tolerance: the same prompt with another seed differs by far more.
  assert np.abs(want[2] - want[1]).max() > 100 * PIXEL_TOL
  # Zeros vs the encoded "" is a real difference: the other rule is far off.
  other, _ = runs(not force_zeros)
  assert np.abs(other - want).max() > 20 * PIXEL_TOL
