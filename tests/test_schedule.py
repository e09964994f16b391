"""The training noise schedule against diffusers' PyTorch `DDPMScheduler`.

alphas_cumprod, `add_noise` (q_sample) and `get_velocity` (the v target) for
every beta schedule, with and without zero-terminal-SNR rescaling, and with
`trained_betas`; then the fields we refuse.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpo_jax import diffusion

CONFIGS = {
  "linear_default": {},
  # SD1.5 / SDXL.
  "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
  "cosine": {"beta_schedule": "squaredcos_cap_v2"},
  "linear_500": {"num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.03},
  "trained_betas": {
    "num_train_timesteps": 50,
    "trained_betas": np.linspace(1e-3, 0.2, 50).round(6).tolist(),
    "beta_schedule": "scaled_linear",  # Overridden by trained_betas, as in diffusers.
  },
}
ZERO_SNR = ("linear_default", "scaled_linear", "cosine")
CASES = [(name, False) for name in CONFIGS] + [(name, True) for name in ZERO_SNR]
ATOL = 1e-6


def inputs(num_train_timesteps: int):
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
  noise = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
  # Both ends of the schedule (abar = 0 at T - 1 under zero SNR) and random ones.
  t = np.array([0, num_train_timesteps - 1, *rng.integers(0, num_train_timesteps, 4)])
  return x0, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,zero_snr", CASES)
def test_matches_diffusers_ddpm(name, zero_snr, prediction_type):
  config = {**CONFIGS[name], "prediction_type": prediction_type}
  if zero_snr:
    config["rescale_betas_zero_snr"] = True
  ref = diffusers.DDPMScheduler.from_config(config)
  ours = diffusion.make_noise_schedule(config)
  want_ac = ref.alphas_cumprod.numpy()
  assert ours.alphas_cumprod.dtype == jnp.float32 and want_ac.dtype == np.float32
  assert ours.num_train_timesteps == len(want_ac) == config.get("num_train_timesteps", 1000)
  np.testing.assert_allclose(ours.alphas_cumprod, want_ac, atol=ATOL, rtol=0)
  # Relative too, for the tail near abar = 0 (the noisiest steps): ~1 ulp (torch's float32 sqrt
  # in the zero-SNR rescaling is not correctly rounded; measured rel. <= 3.6e-5).
  np.testing.assert_allclose(ours.alphas_cumprod, want_ac, rtol=1e-4, atol=1e-12)
  if zero_snr:
    assert float(ours.alphas_cumprod[-1]) == float(want_ac[-1]) == 0.0

  # q_sample and the v target on the *same* schedule values: torch's float32 sqrt above is
  # 1-2 ulp off on some CPUs (AVX-512), and at t = 0 the noise scale sqrt(1 - abar_0)
  # amplifies one ulp of abar_0 ~ 1 to ~1e-5 (seen on CI); the values are checked above.
  ref.alphas_cumprod = torch.from_numpy(np.array(ours.alphas_cumprod))
  x0, noise, t = inputs(ours.num_train_timesteps)
  tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)

  @jax.jit
  def ours_fn(schedule, x0, noise, t):
    return (
      diffusion.q_sample(schedule, x0, noise, t),
      diffusion.training_target(schedule, prediction_type, x0, noise, t),
    )

  noisy, target = ours_fn(ours, x0, noise, jnp.asarray(t, jnp.int32))
  want_noisy = ref.add_noise(tx0, tnoise, tt).numpy()
  np.testing.assert_allclose(noisy, want_noisy, atol=ATOL, rtol=0)
  if prediction_type == "v_prediction":
    np.testing.assert_allclose(target, ref.get_velocity(tx0, tnoise, tt).numpy(), atol=ATOL, rtol=0)
  else:
    np.testing.assert_array_equal(target, noise)
  # The two ends really are the two ends: x_0 itself (up to sqrt(1 - abar_0) noise), and
  # pure noise under zero SNR.
  assert np.abs(noisy[0] - x0[0]).max() < 0.5
  if zero_snr:
    np.testing.assert_allclose(noisy[1], noise[1], atol=ATOL)


def test_schedules_differ():
  """Each option changes alphas_cumprod far beyond the relative tolerance above."""
  acs = {
    (name, z): np.asarray(
      diffusion.make_noise_schedule({**CONFIGS[name], "rescale_betas_zero_snr": z}).alphas_cumprod
    )
    for name, z in CASES
    if name in ZERO_SNR
  }
  keys = sorted(acs)
  for i, a in enumerate(keys):
    for b in keys[i + 1 :]:
      # The cosine schedule ends near zero SNR already: rescaling moves its tail by ~3 %.
      rel = np.abs(acs[a] - acs[b]) / np.maximum(acs[b], 1e-12)
      assert rel.max() > 1e-2, (a, b)


def test_schedule_is_a_pytree_and_bf16_inputs_give_float32():
  schedule = diffusion.make_noise_schedule({})
  leaves = jax.tree.leaves(schedule)
  assert len(leaves) == 1 and leaves[0].shape == (1000,)
  x0 = jnp.ones((2, 4, 2, 2), jnp.bfloat16)
  noisy = diffusion.q_sample(schedule, x0, x0, jnp.array([3, 900]))
  assert noisy.dtype == jnp.float32


def test_unimplemented_fields_are_refused_by_name():
  with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not implemented"):
    diffusion.make_noise_schedule({"beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
    diffusion.make_noise_schedule({"prediction_type": "sample"})
  with pytest.raises(ValueError, match=r"trained_betas has shape \(3,\)"):
    diffusion.make_noise_schedule({"trained_betas": [0.1, 0.2, 0.3]})
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion.training_target(diffusion.make_noise_schedule({}), "sample", 0, 0, 0)
