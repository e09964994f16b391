"""DDIM / Euler / DPM-Solver++ samplers against diffusers' PyTorch schedulers and pipeline.

Three levels: the schedule tables (timesteps, sigmas) against the schedulers'
`set_timesteps`; whole sampling loops with a closed-form stand-in for the UNet
against the schedulers' `scale_model_input` / `step`; and `sample.generate` on
tiny SD1.5 and SD2-style (v-prediction) folders against `StableDiffusionPipeline`
on the same folder and initial noise. Then the sharded path: 1 vs 8 devices,
padding, reproducibility, and bfloat16 compute.
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


# DDIM's own spacings and zero-SNR rescaling (diffusers' DDIMScheduler class defaults: "leading",
# steps_offset 0, linear betas); clip_sample / set_alpha_to_one as `sampler.ddim_schedule` has them.
DDIM_CONFIGS = {
  **SCHEDULE_CONFIGS,
  "sd15_trailing": {**sd15_scheduler_config(), "timestep_spacing": "trailing"},
  "sd15_zero_snr_trailing": {
    **sd15_scheduler_config(),
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
  },
  "cosine_zero_snr_linspace": {
    "beta_schedule": "squaredcos_cap_v2",
    "timestep_spacing": "linspace",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
  },
}


def torch_ddim(config: dict) -> diffusers.DDIMScheduler:
  """DDIMScheduler with `sampler.ddim_schedule`'s defaults (clip_sample, set_alpha_to_one off)."""
  defaults = {"clip_sample": False, "set_alpha_to_one": False}
  return diffusers.DDIMScheduler.from_config({**defaults, **config})


@pytest.mark.parametrize("config_name", sorted(DDIM_CONFIGS))
def test_ddim_tables_match_diffusers(config_name):
  config = DDIM_CONFIGS[config_name]
  ref = torch_ddim(config)
  ac = ref.alphas_cumprod.numpy()
  # torch's float32 CPU sqrt is not correctly rounded (numpy's is): the zero-SNR rescaling,
  # built on sqrt(abar), then differs by ~1 ulp per entry (measured rel. <= 3.6e-5 near abar = 0).
  np.testing.assert_allclose(sampler.train_alphas_cumprod(config), ac, rtol=1e-4, atol=1e-9)
  if config.get("rescale_betas_zero_snr"):
    assert ac[-1] == sampler.train_alphas_cumprod(config)[-1] == 0.0  # Zero terminal SNR.
  final = 1.0 if ref.config.set_alpha_to_one else ac[0]
  for n in (1, 4, 7, 50):
    ref.set_timesteps(n)
    ours = sampler.ddim_schedule(config, n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # The step's target is t - T // n whatever the spacing (diffusers' `step`).
    prev = ref.timesteps.numpy() - ref.config.num_train_timesteps // n
    want_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    np.testing.assert_allclose(ours.sqrt_ac**2, ac[ref.timesteps.numpy()], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ours.sqrt_ac_prev**2, want_prev, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ours.sqrt_1m_ac**2 + ours.sqrt_ac**2, 1.0, rtol=1e-6)


def test_unsupported_options_are_rejected():
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    sampler.make_sampler("euler", {"use_karras_sigmas": True}, 5)
  with pytest.raises(ValueError, match="algorithm_type"):
    sampler.make_sampler("dpmpp", {"algorithm_type": "sde-dpmsolver++"}, 5)
  # Zero-SNR rescaling is DDIM's only.
  with pytest.raises(ValueError, match="rescale_betas_zero_snr=True is not implemented"):
    sampler.make_sampler("dpmpp", {"rescale_betas_zero_snr": True}, 5)
  with pytest.raises(ValueError, match="ddim: scheduler option thresholding=True"):
    sampler.make_sampler("ddim", {"thresholding": True}, 5)
  with pytest.raises(ValueError, match="ddim: timestep_spacing='karras'; expected one of"):
    sampler.make_sampler("ddim", {"timestep_spacing": "karras"}, 5)
  with pytest.raises(ValueError, match="ddim: timestep 1000 >= num_train_timesteps=1000"):
    sampler.make_sampler("ddim", {"steps_offset": 1}, 1000)
  with pytest.raises(ValueError, match="Unknown scheduler 'pndm'"):
    sampler.make_sampler("pndm", {}, 5)


# ----------------------------------------------------------------------------- loops


def fake_unet(x, t, c, lib):
  """A closed-form, nonlinear stand-in for the UNet, written once for torch and jax."""
  return lib.tanh(0.7 * x + c) * (0.5 + t / 2000.0)


def torch_reference_loop(name, config, n, noise, cond, uncond, guidance):
  """diffusers' own loop: init_noise_sigma, scale_model_input, CFG, step."""
  sched = torch_ddim(config) if name == "ddim" else TORCH_SCHEDULERS[name].from_config(config)
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
  ("ddim", {"timestep_spacing": "trailing"}),
  ("ddim", {"timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": True}),
  ("euler", {}),
  ("euler", {"timestep_spacing": "linspace", "steps_offset": 0}),
  ("dpmpp", {}),
  ("dpmpp", {"solver_type": "heun"}),
  ("dpmpp", {"solver_order": 1}),
  ("dpmpp", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
]


def check_loop_against_diffusers(name: str, config: dict, atol: float = 0.0) -> list[np.ndarray]:
  """Our loop vs diffusers' at 1 and 16 steps on the fake UNet; returns our finals.

  The tolerance is float32 round-off on the final values (5e-6 x their scale),
  or `atol` where the loop passed through larger values than it ends with.
  """
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
    assert np.isfinite(want).all()
    # float32 round-off only (measured <= ~2.5e-5 on values up to ~30).
    tol = max(atol, 5e-6 * (1 + np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    finals.append(got)
  # The step count matters far beyond that tolerance.
  assert np.abs(finals[-1] - finals[0]).max() > 1e-2
  return finals


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,extra", LOOP_CASES)
def test_loops_match_diffusers_steps(name, extra, prediction_type):
  config = {**sd15_scheduler_config(), **extra, "prediction_type": prediction_type}
  check_loop_against_diffusers(name, config)


def test_ddim_zero_snr_loop_matches_diffusers():
  # Zero terminal SNR goes with v-prediction (epsilon is undefined at abar = 0) and
  # "trailing" spacing, whose first step is then at abar = 0 exactly.
  config = DDIM_CONFIGS["sd15_zero_snr_trailing"]
  zsnr = check_loop_against_diffusers("ddim", {**config, "prediction_type": "v_prediction"})
  plain = {**config, "rescale_betas_zero_snr": False, "prediction_type": "v_prediction"}
  base = check_loop_against_diffusers("ddim", plain)
  # The rescaling is not a no-op at this tolerance.
  assert np.abs(zsnr[1] - base[1]).max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_clip_sample_matches_diffusers(prediction_type):
  config = {**sd15_scheduler_config(), "prediction_type": prediction_type}
  clip = {**config, "clip_sample": True, "clip_sample_range": 0.5}
  # x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar) reaches ~30 early on and is then clipped to
  # 0.5, so its round-off (measured <= 1.2e-5) is large next to the clipped final values.
  clipped = check_loop_against_diffusers("ddim", clip, atol=5e-5)
  free = check_loop_against_diffusers("ddim", config)
  # The fake UNet's x_0 estimates leave [-0.5, 0.5]: clipping changes the result.
  assert np.abs(clipped[1] - free[1]).max() > 1e-2


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
  # to [-1, 1]; the real SD1.5 config sets it false, as `sampler.ddim_schedule` assumes.
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


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
  """(folder, loaded pipeline, PyTorch pipeline) of a tiny SD2-style (768-v) folder."""
  folder = make_tiny_pipeline.make_tiny_pipeline(
    "sd2", str(tmp_path_factory.mktemp("tiny_sd2")), seed=0, backend="torch"
  )
  ref = diffusers.StableDiffusionPipeline.from_pretrained(
    folder, safety_checker=None, requires_safety_checker=False
  )
  ref.set_progress_bar_config(disable=True)
  return folder, loader.load_pipeline(folder), ref


@pytest.mark.parametrize("name", sorted(TORCH_SCHEDULERS))
def test_sd2_v_prediction_matches_diffusers_pipeline(name, sd2):
  """v-prediction through whole pipelines: the folder's DDIM config, read by each scheduler.

  The UNet has SD2's linear projections, per-block heads, upcast attention and
  16 norm groups; the text encoder and tokenizer are OpenCLIP-style ("!" padding).
  """
  folder, pipe, ref = sd2
  assert pipe.scheduler_config["prediction_type"] == "v_prediction"
  with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
    ref.scheduler = TORCH_SCHEDULERS[name].from_config(json.load(f))
  prompts, seeds = PROMPTS[:2], SEEDS[:2]
  settings = sample.SampleSettings(STEPS, GUIDANCE, 2, scheduler=name, num_devices=1)
  fn = sample.make_sample_fn(pipe, settings, output="float")
  got = sample.generate(pipe, pipe.unet_params, prompts, seeds, settings, sample_fn=fn)
  noise = sample.initial_noise(seeds, sample.latent_shape(pipe))
  want = ref(
    prompts,
    num_inference_steps=STEPS,
    guidance_scale=GUIDANCE,
    latents=torch.from_numpy(noise.copy()),
    output_type="np",
  ).images
  assert got.shape == want.shape == (2, 32, 32, 3)
  diff = float(np.abs(got - want).max())
  print(f"sd2 {name}: max |jax - torch| = {diff:.2e}")
  assert diff < PIXEL_TOL
  assert np.abs(want[1] - want[0]).max() > 100 * PIXEL_TOL


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
