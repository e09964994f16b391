"""Forward-process helpers: the noise schedule, noising, regression targets and errors.

The schedule is built here from the pretrained folder's `scheduler_config.json`
(whatever scheduler class wrote it: PNDM, Euler, DDIM, DDPM all share these
fields) exactly as diffusers' PyTorch schedulers build theirs: float32 betas
from `beta_schedule` (linear / scaled_linear / squaredcos_cap_v2) or
`trained_betas`, optionally rescaled to zero terminal SNR, then their
cumulative product. The samplers (`sampler.py`) use the same betas.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models.loader import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# ----------------------------------------------------------------------------- betas (numpy)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar` (squaredcos_cap_v2), computed in Python floats."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_timesteps
  return np.array(
    [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float64
  )


def _cumprod(alphas: np.ndarray) -> np.ndarray:
  # Accumulated in float64 and rounded to float32, as torch's CPU `cumprod` does.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """diffusers' `rescale_zero_terminal_snr`: sqrt(abar) shifted to end at 0, first value kept."""
  one = np.float32(1.0)
  sqrt_ac = np.sqrt(_cumprod(one - betas))
  first, last = sqrt_ac[0], sqrt_ac[-1]
  sqrt_ac = (sqrt_ac - last) * (first / (first - last))
  ac = sqrt_ac**2
  alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
  return (one - alphas).astype(np.float32)


def train_betas(config: dict[str, Any]) -> np.ndarray:
  """float32 [T] betas of the training schedule, as diffusers' PyTorch schedulers build them.

  diffusers builds them with `torch.linspace(..., float32)` (or from the
  config's `trained_betas`, which then override `beta_schedule`); with
  `rescale_betas_zero_snr` they are rescaled to a zero terminal SNR
  (`rescale_zero_terminal_snr`, Lin et al. 2023), in float32 as there.

  Raises:
    ValueError: naming the field, for a `beta_schedule` not implemented here.
  """
  n = int(config.get("num_train_timesteps", 1000))
  start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
  schedule = config.get("beta_schedule", "linear")
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], np.float32)
    if betas.shape != (n,):
      raise ValueError(
        f"scheduler config: trained_betas has shape {betas.shape}; expected "
        f"(num_train_timesteps,) = ({n},)."
      )
  elif schedule == "linear":
    betas = np.linspace(start, end, n).astype(np.float32)
  elif schedule == "scaled_linear":
    betas = np.linspace(start**0.5, end**0.5, n).astype(np.float32) ** 2
  elif schedule == "squaredcos_cap_v2":
    betas = _cosine_betas(n).astype(np.float32)
  else:
    raise ValueError(
      f"scheduler config: beta_schedule={schedule!r} is not implemented; expected one of "
      f"{BETA_SCHEDULES} (or trained_betas)."
    )
  if config.get("rescale_betas_zero_snr", False):
    betas = _rescale_zero_terminal_snr(betas)
  return betas


def train_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
  """float32 [T] cumulative alphas of the training schedule, as diffusers' PyTorch schedulers."""
  return _cumprod(np.float32(1.0) - train_betas(config))


# ----------------------------------------------------------------------------- schedule (jax)


@flax.struct.dataclass
class NoiseSchedule:
  """The training noise schedule as a pytree (a constant of the compiled step).

  Attributes:
    alphas_cumprod: float32 [T], abar_t = prod_{s <= t} (1 - beta_s).
  """

  alphas_cumprod: jax.Array

  @property
  def num_train_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]


def check_prediction_type(prediction_type: str, where: str = "scheduler config") -> str:
  """Returns `prediction_type` if implemented, else a ValueError naming `where`."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(
      f"{where}: prediction_type={prediction_type!r} is not supported; expected one of "
      f"{PREDICTION_TYPES} ('sample' models are not implemented)."
    )
  return prediction_type


def make_noise_schedule(scheduler_config: dict[str, Any]) -> NoiseSchedule:
  """Builds the training noise schedule from a `scheduler_config.json` dict.

  Args:
    scheduler_config: num_train_timesteps, beta_start, beta_end, beta_schedule,
      trained_betas, rescale_betas_zero_snr, prediction_type (diffusers'
      defaults when absent). Inference-only fields (timestep_spacing,
      steps_offset, ...) do not change the training schedule and are ignored.

  Returns:
    A `NoiseSchedule` whose alphas_cumprod equal diffusers' `DDPMScheduler`'s.

  Raises:
    ValueError: naming the field, for a prediction type or beta schedule that
      is not implemented.
  """
  check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
  return NoiseSchedule(alphas_cumprod=jnp.asarray(train_alphas_cumprod(scheduler_config)))


def _coefficients(
  schedule: NoiseSchedule, timesteps: chex.Array, ndim: int
) -> tuple[jax.Array, jax.Array]:
  """sqrt(abar_t), sqrt(1 - abar_t), float32 [B, 1, ...] broadcastable to an ndim-d sample."""
  ac = schedule.alphas_cumprod[timesteps]
  shape = ac.shape + (1,) * (ndim - ac.ndim)
  return (ac**0.5).reshape(shape), ((1.0 - ac) ** 0.5).reshape(shape)


def q_sample(
  schedule: NoiseSchedule,
  x0: chex.Array,
  noise: chex.Array,
  timesteps: chex.Array,
) -> chex.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (diffusers' `add_noise`).

  Args:
    schedule: the training schedule.
    x0, noise: [B, ...] clean samples and Gaussian noise.
    timesteps: int [B], in [0, T).

  Returns:
    [B, ...] noised samples, float32 (the schedule's dtype) or wider.
  """
  a, b = _coefficients(schedule, timesteps, x0.ndim)
  return a * x0 + b * noise


def training_target(
  schedule: NoiseSchedule,
  prediction_type: str,
  x0: chex.Array,
  noise: chex.Array,
  timesteps: chex.Array,
) -> chex.Array:
  """The UNet's regression target [B, ...]: eps, or v = sqrt(abar) eps - sqrt(1-abar) x0.

  v is diffusers' `get_velocity(x0, noise, timesteps)`.
  """
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    a, b = _coefficients(schedule, timesteps, x0.ndim)
    return a * noise - b * x0
  raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected {PREDICTION_TYPES}.")


def per_sample_mse(pred: chex.Array, target: chex.Array) -> chex.Array:
  """Mean squared error over all but the leading axis, in float32.  -> [B]."""
  chex.assert_equal_shape([pred, target])
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def sample_noise_and_timesteps(
  rng: chex.PRNGKey, latent_shape: tuple[int, ...], num_train_timesteps: int
) -> tuple[chex.Array, chex.Array]:
  """One noise tensor and one timestep per pair, shared by winner and loser.

  Args:
    rng: PRNG key for this (micro-)batch.
    latent_shape: [B, C, H, W] shape of one side of the pairs.
    num_train_timesteps: T; timesteps are uniform on {0..T-1}.

  Returns:
    noise [B, C, H, W] float32 and timesteps [B] int32.
  """
  noise_rng, t_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, latent_shape, jnp.float32)
  timesteps = jax.random.randint(t_rng, (latent_shape[0],), 0, num_train_timesteps)
  return noise, timesteps
