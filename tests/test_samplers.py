"""DDIM / Euler / DPM-Solver++ samplers against diffusers' PyTorch schedulers and pipeline.

Three levels: the schedule tables (timesteps, sigmas) against the schedulers'
`set_timesteps`; whole sampling loops with a closed-form stand-in for the UNet
against the schedulers' `scale_model_input` / `step`; and `sample.generate` on
a tiny SD1.5 folder against `StableDiffusionPipeline` on the same folder and
initial noise. Then the sharded path: 1 vs 8 devices, padding, reproducibility,
and bfloat16 compute.
"""

from __future__ import annotations

import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpo_jax import sample, sampler
from dpo_jax.models import loader
from dpo_jax.tools import make_tiny_pipeline

TORCH_SCHEDULERS = {
  "ddim": diffusers.DDIMScheduler,
  "euler": diffusers.EulerDiscreteScheduler,
  "dpmpp": diffusers.DPMSolverMultistepScheduler,
}
# Measured max |JAX - PyTorch| over [0, 1] pixels (float32, 5 steps, CFG 7.5):
# ~1.7e-5 for every scheduler; the tolerance leaves ~10x for other CPUs/BLAS.
PIXEL_TOL = 2e-4
STEPS, GUIDANCE = 5, 7.5
# Prompt 2 repeats prompt 0 with another seed, so the seed's effect is measured in the same run.
PROMPTS = [
  "a photo of an astronaut riding a horse",
  "a red cat",
  "a photo of an astronaut riding a horse",
]
SEEDS = [0, 1, 5]


def sd15_scheduler_config() -> dict:
  """The tiny SD1.5 folder's PNDM config (scaled_linear, "leading", steps_offset 1)."""
  _, kwargs = make_tiny_pipeline.scheduler_config("sd15")
  return {**kwargs, "timestep_spacing": "leading"}


# Euler's class default spacing is "linspace" (fractional timesteps); "trailing" with the
# cosine schedule is the toy pipeline's; plain "linear" betas are diffusers' class default.
SCHEDULE_CONFIGS = {
  "sd15_leading": sd15_scheduler_config(),
  "sd15_linspace": {**sd15_scheduler_config(), "timestep_spacing": "linspace", "steps_offset": 0},
  "cosine_trailing": {
    "beta_schedule": "squaredcos_cap_v2",
    "timestep_spacing": "trailing",
    "final_sigmas_type": "sigma_min",
  },
  "linear_default": {},
}


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config_name", sorted(SCHEDULE_CONFIGS))
def test_schedule_tables_match_diffusers(config_name, prediction_type):
  config = {**SCHEDULE_CONFIGS[config_name], "prediction_type": prediction_type}
  for n in (1, 4, 7, 50):
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(n)
    ours = sampler.euler_schedule(config, n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(n)
    ours = sampler.dpmpp_schedule(config, n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    assert ref.init_noise_sigma == 1.0  # dpmpp_loop does not scale the noise.


def test_unsupported_options_are_rejected():
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    sampler.make_sampler("euler", {"use_karras_sigmas": True}, 5)
  with pytest.raises(ValueError, match="algorithm_type"):
    sampler.make_sampler("dpmpp", {"algorithm_type": "sde-dpmsolver++"}, 5)
  with pytest.raises(ValueError, match="Unknown scheduler 'pndm'"):
    sampler.make_sampler("pndm", {}, 5)


# ----------------------------------------------------------------------------- loops


def fake_unet(x, t, c, lib):
  """A closed-form, nonlinear stand-in for the UNet, written once for torch and jax."""
  return lib.tanh(0.7 * x + c) * (0.5 + t / 2000.0)


def torch_reference_loop(name, config, n, noise, cond, uncond, guidance):
  """diffusers' own loop: init_noise_sigma, scale_model_input, CFG, step."""
  kwargs = {"clip_sample": False} if name == "ddim" else {}
  sched = TORCH_SCHEDULERS[name].from_config(config, **kwargs)
  sched.set_timesteps(n)
  x = torch.from_numpy(noise) * sched.init_noise_sigma
  c, u = torch.from_numpy(cond), torch.from_numpy(uncond)
  for t in sched.timesteps:
    inp = sched.scale_model_input(x, t)
    pc, pu = fake_unet(inp, t.float(), c, torch), fake_unet(inp, t.float(), u, torch)
    x = sched.step(pu + guidance * (pc - pu), t, x).prev_sample
  return x.numpy()


LOOP_CASES = [
  ("ddim", {}),
  ("euler", {}),
  ("euler", {"timestep_spacing": "linspace", "steps_offset": 0}),
  ("dpmpp", {}),
  ("dpmpp", {"solver_type": "heun"}),
  ("dpmpp", {"solver_order": 1}),
  ("dpmpp", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,extra", LOOP_CASES)
def test_loops_match_diffusers_steps(name, extra, prediction_type):
  config = {**sd15_scheduler_config(), **extra, "prediction_type": prediction_type}
  rng = np.random.default_rng(0)
  shape = (2, 4, 8, 8)
  noise = rng.standard_normal(shape).astype(np.float32)
  cond, uncond = (rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(2))

  def apply(params, x, t, context, added=None):
    return fake_unet(x, t.astype(jnp.float32)[:, None, None, None], context.reshape(x.shape), jnp)

  ctx, uctx = jnp.asarray(cond.reshape(2, 1, -1)), jnp.asarray(uncond.reshape(2, 1, -1))
  denoise = sampler.make_denoiser(apply, None, ctx, uctx, 3.0)
  finals = []
  for n in (1, 16):  # 16 steps: second order in the middle, first order at both ends.
    loop = sampler.make_sampler(name, config, n)
    got = np.asarray(jax.jit(lambda z, loop=loop: loop(denoise, z))(noise))
    want = torch_reference_loop(name, config, n, noise, cond, uncond, 3.0)
    # float32 round-off only (measured <= ~2.5e-5 on values up to ~30).
    np.testing.assert_allclose(got, want, atol=5e-6 * (1 + np.abs(want).max()), rtol=0)
    finals.append(got)
  # The step count matters far beyond that tolerance.
  assert np.abs(finals[-1] - finals[0]).max() > 1e-2


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("tiny_sd15"))
  return make_tiny_pipeline.make_tiny_pipeline("sd15", out, seed=0, backend="torch")


@pytest.fixture(scope="module")
def pipe(tiny_sd15):
  return loader.load_pipeline(tiny_sd15)


@pytest.fixture(scope="module")
def torch_pipe(tiny_sd15):
  p = diffusers.StableDiffusionPipeline.from_pretrained(
    tiny_sd15, safety_checker=None, requires_safety_checker=False
  )
  p.set_progress_bar_config(disable=True)
  return p


@pytest.fixture(scope="module")
def runs(pipe):
  """scheduler -> (8-device float sample_fn, images for PROMPTS/SEEDS), computed on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      settings = sample.SampleSettings(STEPS, GUIDANCE, 8, scheduler=name)
      fn = sample.make_sample_fn(pipe, settings, output="float")
      cache[name] = (
        fn,
        sample.generate(pipe, pipe.unet_params, PROMPTS, SEEDS, settings, sample_fn=fn),
      )
    return cache[name]

  return get


@pytest.mark.parametrize("name", sorted(TORCH_SCHEDULERS))
def test_matches_diffusers_pipeline(name, tiny_sd15, pipe, torch_pipe, runs):
  assert jax.device_count() == 8  # The JAX side runs sharded over 8 devices (3 images + 5 pad).
  with open(os.path.join(tiny_sd15, "scheduler", "scheduler_config.json")) as f:
    folder_config = json.load(f)
  # The tiny PNDM config has no clip_sample field and DDIMScheduler's default clips x_0
  # to [-1, 1]; the real SD1.5 config sets it false, as `sampler.make_ddim` assumes.
  kwargs = {"clip_sample": False} if name == "ddim" else {}
  torch_pipe.scheduler = TORCH_SCHEDULERS[name].from_config(folder_config, **kwargs)
  noise = sample.initial_noise(SEEDS, sample.latent_shape(pipe))
  want = torch_pipe(
    PROMPTS,
    num_inference_steps=STEPS,
    guidance_scale=GUIDANCE,
    latents=torch.from_numpy(noise.copy()),
    output_type="np",
  ).images
  _, got = runs(name)
  assert got.shape == want.shape == (3, 32, 32, 3) and got.dtype == np.float32
  diff = float(np.abs(got - want).max())
  print(f"{name}: max |jax - torch| = {diff:.2e}")
  assert diff < PIXEL_TOL
  # Meaningful tolerance: the same prompt with another seed differs by far more.
  assert np.abs(want[2] - want[0]).max() > 100 * PIXEL_TOL


def test_schedulers_differ_beyond_tolerance(runs):
  # DDIM (eta 0) and Euler are the same ODE discretisation up to the last step
  # (~1e-3 apart here); DPM-Solver++'s second-order steps move the image far more.
  assert np.abs(runs("dpmpp")[1] - runs("euler")[1]).max() > 50 * PIXEL_TOL
  assert np.abs(runs("ddim")[1] - runs("euler")[1]).max() > 2 * PIXEL_TOL


def test_one_vs_eight_devices_padding_and_reproducibility(pipe, runs):
  fn8, _ = runs("dpmpp")
  prompts = [PROMPTS[i % 3] for i in range(10)]
  seeds = list(range(100, 110))
  eight = sample.SampleSettings(STEPS, GUIDANCE, 8, scheduler="dpmpp")
  # 10 images in batches of 8: the second batch is 2 images + 6 padding rows.
  a = sample.generate(pipe, pipe.unet_params, prompts, seeds, eight, sample_fn=fn8)
  assert a.shape == (10, 32, 32, 3)
  one = sample.SampleSettings(STEPS, GUIDANCE, 3, scheduler="dpmpp", num_devices=1)
  fn1 = sample.make_sample_fn(pipe, one, output="float")
  # One device, batches of 3 (3 + 3 + 3 + 1 padded to 3).
  b = sample.generate(pipe, pipe.unet_params, prompts, seeds, one, sample_fn=fn1)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # Same seed, same call -> bitwise the same images; image i is a function of
  # (prompt i, seed i) only, wherever it sits in the batch.
  np.testing.assert_array_equal(
    sample.generate(pipe, pipe.unet_params, prompts, seeds, eight, sample_fn=fn8), a
  )
  c = sample.generate(pipe, pipe.unet_params, prompts[::-1], seeds[::-1], eight, sample_fn=fn8)
  np.testing.assert_allclose(c[::-1], a, atol=1e-5, rtol=0)
  assert np.abs(a[3] - a[0]).max() > 0.1  # Same prompt, another seed.


def test_bfloat16_runs_close_to_float32(pipe, runs):
  settings = sample.SampleSettings(STEPS, GUIDANCE, 8, scheduler="euler", dtype="bfloat16")
  bf16_pipe = sample.with_compute_dtype(pipe, "bfloat16")
  assert bf16_pipe.unet.dtype == bf16_pipe.vae.dtype == bf16_pipe.text_encoder.dtype == jnp.bfloat16
  fn = sample.make_sample_fn(pipe, settings, output="float")
  got = sample.generate(pipe, pipe.unet_params, PROMPTS, SEEDS, settings, sample_fn=fn)
  ref = runs("euler")[1]
  diff = np.abs(got - ref)
  print(f"bf16 vs fp32: max {diff.max():.3e}, mean {diff.mean():.3e}")
  # Measured: max 2.0e-2, mean 3.3e-3. Close-ish, and not float32 in disguise.
  assert diff.mean() < 0.01 and diff.max() < 0.1
  assert diff.max() > 10 * PIXEL_TOL


def test_settings_errors(pipe):
  with pytest.raises(ValueError, match="Unknown scheduler"):
    sample.make_sample_fn(pipe, sample.SampleSettings(scheduler="pndm"))
  with pytest.raises(ValueError, match="mesh of 9 devices"):
    sample.make_mesh(9)
  assert sample.padded_batch_size(3, 64, 8) == 8
  assert sample.padded_batch_size(100, 12, 8) == 16
  assert sample.padded_batch_size(5, 64, 1) == 5
