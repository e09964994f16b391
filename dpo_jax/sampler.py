"""Jitted samplers with classifier-free guidance: DDIM, Euler and DPM-Solver++ (2M).

Every sampler is a pure `loop(denoise, noise) -> x_0` that runs the reverse
process as one `lax.scan`, so a whole batch of images is a single compiled
program that can be sharded over the batch like the train step. `denoise(x, t)`
is the (guided) model prediction at one step, built by `make_denoiser` around
the one shared guidance function, `guided_prediction`.

The updates follow diffusers' PyTorch schedulers, so images match its pipelines:
  ddim:  `DDIMScheduler` (eta = 0), with its zero-SNR rescaling and clip_sample.
  euler: `EulerDiscreteScheduler` (sigmas, `scale_model_input`, s_churn = 0).
  dpmpp: `DPMSolverMultistepScheduler` with its defaults: dpmsolver++, second
         order, midpoint, lower_order_final.
Each re-derives diffusers' timesteps and coefficients in numpy on the host
(the "linspace" / "leading" / "trailing" spacings of the config, with
diffusers' class defaults for absent fields); the scan only consumes those
tables. Configuration options a sampler does not implement (Karras sigmas,
thresholding, zero-SNR rescaling outside DDIM, ...) are rejected, never
silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

# The training betas / alphas_cumprod: one implementation for training and sampling.
from dpo_jax.diffusion import PREDICTION_TYPES, train_alphas_cumprod, train_betas  # noqa: F401

UNetApply = Any
# (model input x [B, C, H, W], timestep scalar) -> float32 guided prediction [B, C, H, W].
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
# (denoise, initial noise [B, C, H, W]) -> x_0 [B, C, H, W].
Loop = Callable[[Denoiser, jax.Array], jax.Array]

SCHEDULERS = ("ddim", "euler", "dpmpp")

# Options of diffusers' Euler / DPM-Solver schedulers with the only value implemented here.
_FIXED_OPTIONS = {
  "use_karras_sigmas": False,
  "use_exponential_sigmas": False,
  "use_beta_sigmas": False,
  "rescale_betas_zero_snr": False,
}
_EULER_FIXED = {**_FIXED_OPTIONS, "interpolation_type": "linear", "timestep_type": "discrete"}
# DDIM implements zero-SNR rescaling and every spacing; only these stay fixed.
_DDIM_FIXED = {"thresholding": False}
_SPACINGS = ("linspace", "leading", "trailing")
_DPM_FIXED = {
  **_FIXED_OPTIONS,
  "algorithm_type": "dpmsolver++",
  "thresholding": False,
  "variance_type": None,
  "use_lu_lambdas": False,
  "use_flow_sigmas": False,
  "use_dynamic_shifting": False,
}


# ----------------------------------------------------------------------------- guidance


def guided_prediction(
  apply_fn: UNetApply,
  params: Any,
  x: chex.Array,
  t: chex.Array,
  context: chex.Array,
  uncond_context: chex.Array,
  guidance_scale: float,
  added_cond: dict[str, chex.Array] | None = None,
  uncond_added: dict[str, chex.Array] | None = None,
) -> chex.Array:
  """pred_uncond + w * (pred_cond - pred_uncond) in float32, one UNet call on 2B rows.

  Conditional and unconditional rows are interleaved (c0, u0, c1, u1, ...) so
  each device keeps its own images when the batch is sharded.
  """
  b = x.shape[0]

  def inter(c, u):
    return jnp.stack([c, u], axis=1).reshape((2 * b,) + c.shape[1:])

  added = None
  if added_cond is not None:
    added = jax.tree.map(inter, added_cond, uncond_added)
  tt = jnp.broadcast_to(t, (2 * b,))
  pred = apply_fn(params, inter(x, x), tt, inter(context, uncond_context), added)
  pred = pred.astype(jnp.float32).reshape((b, 2) + pred.shape[1:])
  cond, uncond = pred[:, 0], pred[:, 1]
  return uncond + guidance_scale * (cond - uncond)


def make_denoiser(
  apply_fn: UNetApply,
  params: Any,
  context: chex.Array,
  uncond_context: chex.Array,
  guidance_scale: float,
  added_cond: dict[str, chex.Array] | None = None,
  uncond_added: dict[str, chex.Array] | None = None,
) -> Denoiser:
  """`denoise(x, t)`: the guided prediction, or one plain UNet call when guidance is 1."""

  def denoise(x, t):
    if guidance_scale == 1.0:
      t_b = jnp.broadcast_to(t, (x.shape[0],))
      return apply_fn(params, x, t_b, context, added_cond).astype(jnp.float32)
    return guided_prediction(
      apply_fn, params, x, t, context, uncond_context, guidance_scale, added_cond, uncond_added
    )

  return denoise


# ----------------------------------------------------------------------------- schedules


def _check_options(config: dict[str, Any], fixed: dict[str, Any], name: str) -> None:
  for key, value in fixed.items():
    if config.get(key, value) != value:
      raise ValueError(
        f"{name}: scheduler option {key}={config[key]!r} is not implemented (only {value!r})."
      )
  prediction_type = config.get("prediction_type", "epsilon")
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"{name}: prediction_type={prediction_type!r}; expected {PREDICTION_TYPES}.")


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """float32 [T] sqrt((1 - abar) / abar), the noise level of each training timestep."""
  return ((np.float32(1.0) - alphas_cumprod) / alphas_cumprod) ** np.float32(0.5)


def _final_sigma(config: dict[str, Any], alphas_cumprod: np.ndarray) -> float:
  kind = config.get("final_sigmas_type", "zero")
  if kind == "zero":
    return 0.0
  if kind == "sigma_min":
    return float(_train_sigmas(alphas_cumprod)[0])
  raise ValueError(f"final_sigmas_type={kind!r}; expected 'zero' or 'sigma_min'.")


@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
  """Host-side tables of `DDIMScheduler.set_timesteps` / `step` (eta = 0), one entry per step.

  Step i at timestep t with abar = alphas_cumprod[t] and abar_prev that of
  t - T // N (diffusers' offset whatever the spacing; the final alpha below 0):
    x0, eps = (x - sqrt(1 - abar) e) / sqrt(abar), e                          (epsilon)
            = sqrt(abar) x - sqrt(1 - abar) v, sqrt(abar) v + sqrt(1 - abar) x  (v_prediction)
    x0 <- clip(x0, -clip_sample_range, clip_sample_range)  if clip_sample
    x <- sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps

  Attributes:
    timesteps: int32 [N] UNet timesteps.
    sqrt_ac, sqrt_1m_ac: float32 [N] sqrt(abar), sqrt(1 - abar) at each step.
    sqrt_ac_prev, sqrt_1m_ac_prev: float32 [N] the same at the step's target.
    clip: clip_sample_range when clip_sample is on, else None.
    prediction_type: "epsilon" or "v_prediction".
  """

  timesteps: np.ndarray
  sqrt_ac: np.ndarray
  sqrt_1m_ac: np.ndarray
  sqrt_ac_prev: np.ndarray
  sqrt_1m_ac_prev: np.ndarray
  clip: float | None
  prediction_type: str


def ddim_schedule(scheduler_config: dict[str, Any], num_inference_steps: int) -> DDIMSchedule:
  """`DDIMScheduler.from_config(config).set_timesteps(num_inference_steps)` tables, in numpy.

  `clip_sample` and `set_alpha_to_one` are off unless the config sets them
  (diffusers' class defaults are on): latents of real VAEs are not bounded by
  1, and diffusers' SD pipelines load DDIM from the PNDM / Euler configs of
  the checkpoints, which set both false.
  """
  config = {"clip_sample": False, "set_alpha_to_one": False, **dict(scheduler_config)}
  _check_options(config, _DDIM_FIXED, "ddim")
  n, n_train = num_inference_steps, int(config.get("num_train_timesteps", 1000))
  if n > n_train:
    raise ValueError(f"ddim: num_inference_steps={n} > num_train_timesteps={n_train}.")
  spacing = config.get("timestep_spacing", "leading")
  if spacing == "linspace":
    timesteps = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    timesteps = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.int64)
    timesteps += int(config.get("steps_offset", 0))
  elif spacing == "trailing":
    timesteps = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
  else:
    raise ValueError(f"ddim: timestep_spacing={spacing!r}; expected one of {_SPACINGS}.")
  if timesteps.max() >= n_train:  # "leading" + steps_offset at N = T (torch fails in `step`).
    raise ValueError(f"ddim: timestep {timesteps.max()} >= num_train_timesteps={n_train}.")
  ac = train_alphas_cumprod(config)
  final = np.float32(1.0) if config["set_alpha_to_one"] else ac[0]
  prev = timesteps - n_train // n
  ac_t = ac[timesteps]
  ac_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
  one = np.float32(1.0)
  return DDIMSchedule(
    timesteps=timesteps.astype(np.int32),
    sqrt_ac=np.sqrt(ac_t),
    sqrt_1m_ac=np.sqrt(one - ac_t),
    sqrt_ac_prev=np.sqrt(ac_prev),
    sqrt_1m_ac_prev=np.sqrt(one - ac_prev),
    clip=float(config.get("clip_sample_range", 1.0)) if config["clip_sample"] else None,
    prediction_type=config.get("prediction_type", "epsilon"),
  )


def ddim_loop(schedule: DDIMSchedule, denoise: Denoiser, noise: chex.Array) -> chex.Array:
  """Deterministic DDIM (eta = 0) from `noise` [B, C, H, W] to x_0 (initial scaling is 1)."""
  v_pred = schedule.prediction_type == "v_prediction"

  def body(x, step):
    t, sa, sb, sa_prev, sb_prev = step
    pred = denoise(x, t)
    if v_pred:
      x0, eps = sa * x - sb * pred, sa * pred + sb * x
    else:
      x0, eps = (x - sb * pred) / sa, pred
    if schedule.clip is not None:
      x0 = jnp.clip(x0, -schedule.clip, schedule.clip)
    return sa_prev * x0 + sb_prev * eps, None

  steps = tuple(
    jnp.asarray(getattr(schedule, k))
    for k in ("timesteps", "sqrt_ac", "sqrt_1m_ac", "sqrt_ac_prev", "sqrt_1m_ac_prev")
  )
  x, _ = jax.lax.scan(body, noise.astype(jnp.float32), steps)
  return x


@dataclasses.dataclass(frozen=True)
class EulerSchedule:
  """Host-side tables of `EulerDiscreteScheduler.set_timesteps`.

  Attributes:
    timesteps: float32 [N] UNet timesteps (fractional under "linspace" spacing).
    sigmas: float32 [N + 1] noise levels, the last one 0 (or sigma_min).
    init_noise_sigma: the initial noise is N(0, init_noise_sigma^2).
    prediction_type: "epsilon" or "v_prediction".
  """

  timesteps: np.ndarray
  sigmas: np.ndarray
  init_noise_sigma: float
  prediction_type: str


def euler_schedule(config: dict[str, Any], num_inference_steps: int) -> EulerSchedule:
  """`EulerDiscreteScheduler.from_config(config).set_timesteps(num_inference_steps)`, in numpy."""
  _check_options(config, _EULER_FIXED, "euler")
  n, n_train = num_inference_steps, int(config.get("num_train_timesteps", 1000))
  spacing = config.get("timestep_spacing", "linspace")
  if spacing == "linspace":
    timesteps = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
  elif spacing == "leading":
    ratio = n_train // n
    timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
    timesteps += config.get("steps_offset", 0)
  elif spacing == "trailing":
    timesteps = np.arange(n_train, 0, -n_train / n).round().copy().astype(np.float32) - 1
  else:
    raise ValueError(f"timestep_spacing={spacing!r}; expected linspace, leading or trailing.")
  ac = train_alphas_cumprod(config)
  train_sigmas = _train_sigmas(ac)
  sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
  sigmas = np.concatenate([sigmas, [_final_sigma(config, ac)]]).astype(np.float32)
  max_sigma = sigmas.max()
  # diffusers: the initial noise std is max sigma for "linspace" / "trailing", but
  # sqrt(max sigma^2 + 1) for "leading" (SD1.5 / SDXL configs).
  init = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
  return EulerSchedule(timesteps, sigmas, float(init), config.get("prediction_type", "epsilon"))


def euler_loop(schedule: EulerSchedule, denoise: Denoiser, noise: chex.Array) -> chex.Array:
  """Euler ODE steps (no churn) from `noise` [B, C, H, W] (unit variance) to x_0."""
  v_pred = schedule.prediction_type == "v_prediction"

  def body(x, step):
    t, sigma, sigma_next = step
    pred = denoise(x / (sigma**2 + 1) ** 0.5, t)  # scale_model_input
    if v_pred:
      x0 = pred * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
      x0 = x - sigma * pred
    return x + (x - x0) / sigma * (sigma_next - sigma), None

  sigmas = jnp.asarray(schedule.sigmas)
  steps = (jnp.asarray(schedule.timesteps), sigmas[:-1], sigmas[1:])
  x = noise.astype(jnp.float32) * jnp.float32(schedule.init_noise_sigma)
  x, _ = jax.lax.scan(body, x, steps)
  return x


@dataclasses.dataclass(frozen=True)
class DPMSolverSchedule:
  """Host-side tables of `DPMSolverMultistepScheduler` (dpmsolver++), one entry per step.

  Step i maps x at sigmas[i] to x at sigmas[i + 1]:
    x0_i = (x - sigma_s * eps) / alpha_s            (epsilon)
         = alpha_s * x - sigma_s * v                (v_prediction)
    D1 = inv_r0 * (x0_i - x0_{i-1})
    x <- ratio * x - c0 * x0_i - c1 * D1
  with c1 = inv_r0 = 0 on first-order steps (the first, and the last under
  lower_order_final), so the update is then exactly diffusers' first-order one.

  Attributes:
    timesteps: int32 [N] UNet timesteps.
    sigmas: float32 [N + 1] noise levels (k-diffusion convention), the last 0.
    alpha_s, sigma_s, ratio, c0, inv_r0, c1: float32 [N] per-step coefficients.
    prediction_type: "epsilon" or "v_prediction".
  """

  timesteps: np.ndarray
  sigmas: np.ndarray
  alpha_s: np.ndarray
  sigma_s: np.ndarray
  ratio: np.ndarray
  c0: np.ndarray
  inv_r0: np.ndarray
  c1: np.ndarray
  prediction_type: str


def _dpm_timesteps(config: dict[str, Any], n: int, ac: np.ndarray) -> np.ndarray:
  n_train = int(config.get("num_train_timesteps", 1000))
  lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
  clipped = np.searchsorted(lambda_t[::-1], config.get("lambda_min_clipped", -float("inf")))
  last = n_train - int(clipped)
  spacing = config.get("timestep_spacing", "linspace")
  if spacing == "linspace":
    return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
  if spacing == "leading":
    ratio = last // (n + 1)
    timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
    return timesteps + config.get("steps_offset", 0)
  if spacing == "trailing":
    return np.arange(last, 0, -n_train / n).round().copy().astype(np.int64) - 1
  raise ValueError(f"timestep_spacing={spacing!r}; expected linspace, leading or trailing.")


def dpmpp_schedule(config: dict[str, Any], num_inference_steps: int) -> DPMSolverSchedule:
  """`DPMSolverMultistepScheduler.from_config(config)` tables for `num_inference_steps`.

  Coefficients are computed in float32 with the same operations as diffusers'
  `dpm_solver_first_order_update` / `multistep_dpm_solver_second_order_update`.
  """
  _check_options(config, _DPM_FIXED, "dpmpp")
  order = int(config.get("solver_order", 2))
  solver_type = config.get("solver_type", "midpoint")
  if order not in (1, 2) or solver_type not in ("midpoint", "heun"):
    raise ValueError(f"dpmpp: solver_order={order}, solver_type={solver_type!r} not implemented.")
  ac = train_alphas_cumprod(config)
  timesteps = _dpm_timesteps(config, num_inference_steps, ac)
  train_sigmas = _train_sigmas(ac)
  sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
  sigmas = np.concatenate([sigmas, [_final_sigma(config, ac)]]).astype(np.float32)
  n = len(timesteps)
  one = np.float32(1.0)
  alpha = one / (sigmas**2 + one) ** np.float32(0.5)  # _sigma_to_alpha_sigma_t
  sig = sigmas * alpha
  with np.errstate(divide="ignore"):  # log(0) = -inf at a final sigma of 0, as in torch.
    lam = np.log(alpha) - np.log(sig)
  s, t = np.arange(n), np.arange(1, n + 1)
  h = lam[t] - lam[s]
  c0 = alpha[t] * (np.exp(-h) - one)
  # First-order steps: the first one and, diffusers' lower_order_final, the last.
  final_first = (
    config.get("euler_at_final", False)
    or (config.get("lower_order_final", True) and n < 15)
    or config.get("final_sigmas_type", "zero") == "zero"
  )
  second = (s > 0) & ~((s == n - 1) & final_first) & (order == 2)
  s1 = np.maximum(s - 1, 0)
  h_0 = lam[s] - lam[s1]
  inv_r0 = np.where(second, one / np.where(second, h_0 / h, one), 0).astype(np.float32)
  if solver_type == "midpoint":
    c1 = np.float32(0.5) * c0
  else:  # heun: x + alpha_t ((exp(-h) - 1) / h + 1) D1
    with np.errstate(divide="ignore", invalid="ignore"):
      c1 = -(alpha[t] * ((np.exp(-h) - one) / h + one))
  c1 = np.where(second, c1, 0).astype(np.float32)
  return DPMSolverSchedule(
    timesteps=timesteps.astype(np.int32),
    sigmas=sigmas,
    alpha_s=alpha[s],
    sigma_s=sig[s],
    ratio=(sig[t] / sig[s]).astype(np.float32),
    c0=c0.astype(np.float32),
    inv_r0=inv_r0,
    c1=c1,
    prediction_type=config.get("prediction_type", "epsilon"),
  )


def dpmpp_loop(schedule: DPMSolverSchedule, denoise: Denoiser, noise: chex.Array) -> chex.Array:
  """DPM-Solver++ multistep from `noise` [B, C, H, W] (unit variance) to x_0."""
  v_pred = schedule.prediction_type == "v_prediction"

  def body(carry, step):
    x, x0_prev = carry
    t, alpha_s, sigma_s, ratio, c0, inv_r0, c1 = step
    pred = denoise(x, t)
    x0 = alpha_s * x - sigma_s * pred if v_pred else (x - sigma_s * pred) / alpha_s
    d1 = inv_r0 * (x0 - x0_prev)
    return (ratio * x - c0 * x0 - c1 * d1, x0), None

  steps = tuple(
    jnp.asarray(getattr(schedule, k))
    for k in ("timesteps", "alpha_s", "sigma_s", "ratio", "c0", "inv_r0", "c1")
  )
  x = noise.astype(jnp.float32)
  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), steps)
  return x


# ----------------------------------------------------------------------------- selection


def make_sampler(name: str, scheduler_config: dict[str, Any], num_inference_steps: int) -> Loop:
  """`loop(denoise, noise) -> x_0` for scheduler `name` ("ddim" | "euler" | "dpmpp").

  `noise` is unit-variance N(0, I); each loop applies its own initial scaling.
  The schedule tables are built here, once, on the host.
  """
  if num_inference_steps < 1:
    raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
  config = dict(scheduler_config)
  if name == "ddim":
    return functools.partial(ddim_loop, ddim_schedule(config, num_inference_steps))
  if name == "euler":
    return functools.partial(euler_loop, euler_schedule(config, num_inference_steps))
  if name == "dpmpp":
    return functools.partial(dpmpp_loop, dpmpp_schedule(config, num_inference_steps))
  raise ValueError(f"Unknown scheduler {name!r}; expected one of {SCHEDULERS}.")
