"""Forward-process helpers: noising, regression targets and per-sample errors.

The noise schedule itself comes from diffusers' Flax DDPM scheduler so the
betas (linear / scaled_linear / squaredcos_cap_v2) are exactly those of the
pretrained model's `scheduler/` config.
"""

from __future__ import annotations

import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
from diffusers.schedulers import scheduling_utils_flax

with warnings.catch_warnings():
  warnings.simplefilter("ignore", FutureWarning)
  from diffusers import FlaxDDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_noise_schedule(
  scheduler_config: dict[str, Any],
) -> scheduling_utils_flax.CommonSchedulerState:
  """Builds the training noise schedule (alphas_cumprod etc.) from a config dict.

  Args:
    scheduler_config: keys accepted by `FlaxDDPMScheduler` (num_train_timesteps,
      beta_schedule, beta_start, beta_end, prediction_type, ...). Unknown keys
      from a pretrained `scheduler_config.json` are ignored by diffusers.

  Returns:
    The scheduler's common state, a pytree of arrays usable inside jit.
  """
  prediction_type = scheduler_config.get("prediction_type", "epsilon")
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(
      f"prediction_type={prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}."
    )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    scheduler = FlaxDDPMScheduler.from_config(dict(scheduler_config))
  return scheduler.create_state().common


def q_sample(
  schedule: scheduling_utils_flax.CommonSchedulerState,
  x0: chex.Array,
  noise: chex.Array,
  timesteps: chex.Array,
) -> chex.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.  x0, noise: [B, ...]; timesteps: [B]."""
  return scheduling_utils_flax.add_noise_common(schedule, x0, noise, timesteps)


def training_target(
  schedule: scheduling_utils_flax.CommonSchedulerState,
  prediction_type: str,
  x0: chex.Array,
  noise: chex.Array,
  timesteps: chex.Array,
) -> chex.Array:
  """The UNet's regression target: eps, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return scheduling_utils_flax.get_velocity_common(schedule, x0, noise, timesteps)
  raise ValueError(f"Unknown prediction_type {prediction_type!r}.")


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
