"""dpo_loss / sft_loss against an independent numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses


def numpy_dpo(mw, ml, rw, rl, beta):
  """Reference written directly from BRIEF §1 in float64."""
  mw, ml, rw, rl = (np.asarray(a, np.float64) for a in (mw, ml, rw, rl))
  inside = -0.5 * beta * ((mw - ml) - (rw - rl))
  # -log sigmoid(x) = log(1 + exp(-x)) computed stably as logaddexp(0, -x).
  loss = np.mean(np.logaddexp(0.0, -inside))
  return loss, np.mean(inside > 0), np.mean(inside)


@pytest.mark.parametrize("beta", [1.0, 500.0, 5000.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_loss_matches_numpy(beta, seed):
  rng = np.random.default_rng(seed)
  mw, ml, rw, rl = (rng.uniform(0.05, 1.5, size=16).astype(np.float32) for _ in range(4))
  loss, m = losses.dpo_loss(mw, ml, rw, rl, beta)
  ref_loss, ref_acc, ref_margin = numpy_dpo(mw, ml, rw, rl, beta)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5, atol=1e-6)
  assert float(m["implicit_acc"]) == pytest.approx(ref_acc)
  np.testing.assert_allclose(float(m["reward_margin"]), ref_margin, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(m["model_mse_w"]), mw.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["ref_mse_l"]), rl.mean(), rtol=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
  rng = np.random.default_rng(0)
  mw, ml = rng.uniform(0, 1, size=(2, 8)).astype(np.float32)
  loss, m = losses.dpo_loss(mw, ml, mw, ml, 5000.0)
  assert float(loss) == pytest.approx(math.log(2.0), abs=1e-7)
  assert float(m["implicit_acc"]) == 0.0
  assert float(m["reward_margin"]) == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dpo_loss_extreme_inside_is_finite_with_finite_grads(sign):
  # |inside| = 0.5 * beta * |diff| = 0.5 * 5000 * 8 = 2e4 (>= 1e4).
  mw = jnp.full((4,), 4.0 if sign > 0 else 0.0)
  ml = jnp.full((4,), 0.0 if sign > 0 else 4.0)
  rw = rl = jnp.zeros((4,))

  def f(mw, ml):
    return losses.dpo_loss(mw, ml, rw, rl, 5000.0)[0]

  loss = f(mw, ml)
  gw, gl = jax.grad(f, argnums=(0, 1))(mw, ml)
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(gw)) and np.all(np.isfinite(gl))
  ref_loss, _, _ = numpy_dpo(mw, ml, rw, rl, 5000.0)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
  if sign > 0:  # Winner much worse: loss ~ |inside|, gradient pushes m_w down.
    assert float(loss) == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(gw, 0.5 * 5000.0 / 4, rtol=1e-5)
  else:  # Already saturated the right way: zero loss, vanishing gradient.
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(gw, 0.0, atol=1e-6)


def test_dpo_loss_gradient_matches_closed_form():
  rng = np.random.default_rng(3)
  mw, ml, rw, rl = (jnp.asarray(rng.uniform(0, 1, size=6), jnp.float32) for _ in range(4))
  beta = 50.0
  g = jax.grad(lambda a: losses.dpo_loss(a, ml, rw, rl, beta)[0])(mw)
  inside = -0.5 * beta * ((mw - ml) - (rw - rl))
  # d/dm_w of -log sigmoid(inside) = sigmoid(-inside) * 0.5 * beta, averaged over B.
  expected = jax.nn.sigmoid(-inside) * 0.5 * beta / 6
  np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_sft_loss_is_mean_winner_mse():
  x = np.array([0.5, 1.0, 2.0], np.float32)
  loss, m = losses.sft_loss(x)
  assert float(loss) == pytest.approx(x.mean())
  assert float(m["model_mse_w"]) == pytest.approx(x.mean())


def test_dpo_loss_rejects_mismatched_shapes():
  with pytest.raises(AssertionError):
    losses.dpo_loss(np.zeros(3), np.zeros(4), np.zeros(3), np.zeros(3), 1.0)
