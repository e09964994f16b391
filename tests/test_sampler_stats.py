"""The samplers + CFG against analytic oracles; win rates and bootstrap CIs by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import sampler, stats

SHAPE = (3, 2, 4, 4)  # [B, C, H, W]


def oracle(schedule_alphas, prediction_type):
  """A perfect denoiser for data that is a point mass at x0 = context (reshaped).

  eps(x_t) = (x_t - sqrt(abar) x0) / sqrt(1 - abar); v = sqrt(abar) eps - sqrt(1-abar) x0.
  """

  def apply(params, x, t, context, added=None):
    x0 = context.reshape(x.shape)
    # Integer-valued timesteps; Euler passes them as floats, like diffusers.
    a = schedule_alphas[jnp.round(t).astype(jnp.int32)][:, None, None, None]
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    if prediction_type == "epsilon":
      return eps
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  return apply


@pytest.mark.parametrize(
  "prediction_type,beta_schedule",
  [("epsilon", "scaled_linear"), ("v_prediction", "squaredcos_cap_v2")],
)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("scheduler", sampler.SCHEDULERS)
def test_sampler_recovers_data_point_and_cfg_extrapolates(
  scheduler, prediction_type, beta_schedule, guidance
):
  cfg = {
    "num_train_timesteps": 1000,
    "beta_schedule": beta_schedule,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": prediction_type,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",  # Integer timesteps: the oracle indexes the schedule.
  }
  loop = sampler.make_sampler(scheduler, cfg, 20)
  apply = oracle(jnp.asarray(sampler.train_alphas_cumprod(cfg)), prediction_type)
  rng = np.random.default_rng(0)
  x0_c = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  x0_u = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  ctx = jnp.asarray(x0_c.reshape(SHAPE[0], 1, -1))
  uctx = jnp.asarray(x0_u.reshape(SHAPE[0], 1, -1))
  noise = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  denoise = sampler.make_denoiser(apply, None, ctx, uctx, guidance)
  out = jax.jit(lambda n: loop(denoise, n))(noise)
  # eps (and v) are affine in x0 with weights summing to one, so guidance w
  # lands exactly on x0_u + w (x0_c - x0_u).
  expected = x0_u + guidance * (x0_c - x0_u)
  np.testing.assert_allclose(out, expected, atol=2e-3 * max(1.0, guidance))


def test_same_noise_same_image_and_different_noise_differs():
  loop = sampler.make_sampler("ddim", {"prediction_type": "epsilon"}, 10)
  alphas = jnp.asarray(sampler.train_alphas_cumprod({}))

  def apply(params, x, t, context, added=None):  # Not an oracle: depends on x nonlinearly.
    return jnp.tanh(x + context.reshape(x.shape)) * jnp.sqrt(1 - alphas[t])[:, None, None, None]

  ctx = jnp.ones((SHAPE[0], 1, int(np.prod(SHAPE[1:]))))
  f = jax.jit(lambda n: loop(sampler.make_denoiser(apply, None, ctx, 0 * ctx, 2.0), n))
  n1 = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  n2 = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  np.testing.assert_array_equal(f(n1), f(n1))
  assert float(jnp.max(jnp.abs(f(n1) - f(n2)))) > 1e-2


def test_win_rate_by_hand():
  a = np.array([1.0, 2.0, 3.0, 4.0])
  b = np.array([0.0, 2.0, 5.0, 3.95])
  # Differences 1, 0, -2, 0.05 -> win, tie, loss, win; strict (0.1): win, tie, loss, tie.
  assert stats.win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
  assert stats.win_rate(a, b, margin=0.1) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
  assert stats.win_rate(b, a) == pytest.approx(1 - stats.win_rate(a, b))
  res = stats.compare(a, b, prompts=["p", "p", "q", "q"])
  assert res["n"] == 4 and res["mean_diff"] == pytest.approx(np.mean(a - b))
  with pytest.raises(ValueError):
    stats.win_rate(a, b[:3])


def test_bootstrap_ci_clusters():
  # Constant values: zero-width interval.
  assert stats.bootstrap_ci(np.full(10, 0.7)) == pytest.approx((0.7, 0.7))
  # Two prompts, one always won and one always lost: resampling prompts gives
  # means in {0, 0.5, 1} with probabilities 1/4, 1/2, 1/4 -> 95 % CI is [0, 1].
  vals = np.array([1, 1, 1, 0, 0, 0], float)
  lo, hi = stats.bootstrap_ci(vals, clusters=[0, 0, 0, 1, 1, 1], num_resamples=4000)
  assert (lo, hi) == (0.0, 1.0)
  # Treating the six images as independent understates the spread.
  lo_i, hi_i = stats.bootstrap_ci(vals, num_resamples=4000)
  assert 0.0 < lo_i and hi_i < 1.0
  # Coverage sanity: the CI of a large sample brackets the true mean tightly.
  rng = np.random.default_rng(0)
  x = rng.binomial(1, 0.7, size=4000).astype(float)
  lo, hi = stats.bootstrap_ci(x, num_resamples=1000)
  assert lo < 0.7 < hi and hi - lo < 0.06


def test_mean_diff_is_formatted_in_points_with_its_ci():
  c = stats.compare(np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0]), list("aabb"))
  lo, hi = 100 * c["mean_diff_ci_low"], 100 * c["mean_diff_ci_high"]
  assert stats.format_mean_diff(c) == f"+50.0 [{lo:+.1f}, {hi:+.1f}]"
  assert stats.format_mean_diff(c, " points") == f"+50.0 points [{lo:+.1f}, {hi:+.1f}]"
  neg = {"mean_diff": -0.0625, "mean_diff_ci_low": -0.125, "mean_diff_ci_high": 0.0}
  assert stats.format_mean_diff(neg) == "-6.2 [-12.5, +0.0]"
