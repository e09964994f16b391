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


# ---------------------------------------------------------------------------
# Objectives after DPO. The references below are written from the papers'
# formulas (as the authors' code computes them), in float64 numpy or in torch
# autograd, independently of dpo_jax.losses.


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def numpy_mapo(mw, ml, beta, s, t):
  mw, ml = np.asarray(mw, np.float64), np.asarray(ml, np.float64)
  f = lambda m: s * m / (np.exp(s * m) - 1.0)
  logits = t * (f(mw) - f(ml))
  log_sig = -np.logaddexp(0.0, -logits)
  return mw.mean() - beta * log_sig.mean(), logits


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,s", [(0.1, 0.5), (1.0, 2.0)])
def test_mapo_loss_matches_numpy(seed, beta, s):
  rng = np.random.default_rng(seed)
  # Include MSEs close enough that T * log_odds is O(1), and far apart ones.
  mw = rng.uniform(0.05, 1.0, size=12).astype(np.float32)
  ml = (mw + rng.normal(0, 1e-3, size=12) * np.r_[np.ones(6), 300 * np.ones(6)]).astype(np.float32)
  ml = np.abs(ml)
  loss, m = losses.mapo_loss(mw, ml, beta, s, 1000)
  ref_loss, logits = numpy_mapo(mw, ml, beta, s, 1000)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
  assert float(m["implicit_acc"]) == pytest.approx(np.mean(logits > 0))
  np.testing.assert_allclose(float(m["reward_margin"]), logits.mean(), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(float(m["max_abs_logit"]), np.abs(logits).max(), rtol=1e-2)
  # Reference-free: the winner term pulls m_w down, the ratio term separates the two.
  gw, gl = jax.grad(lambda a, b: losses.mapo_loss(a, b, beta, s, 1000)[0], (0, 1))(mw, ml)
  assert np.all(np.asarray(gl) <= 0)  # Raising m_l never hurts.
  assert np.all(np.asarray(gw) > 0)


def test_mapo_transform_limit_at_zero_is_finite():
  f, g = jax.value_and_grad(lambda m: losses.mapo_transform(m, 0.5).sum())(jnp.array([0.0, 1e-6]))
  assert float(f) == pytest.approx(2.0, abs=1e-6)  # f(0) = 1, f(1e-6) ~ 1 - s m / 2.
  assert np.all(np.isfinite(np.asarray(g)))


def numpy_kto(pol, ref, desirable, beta, ld, lu):
  pol, ref = np.asarray(pol, np.float64), np.asarray(ref, np.float64)
  g = ref - pol
  kl = max(g.mean(), 0.0)
  sign = np.where(desirable, 1.0, -1.0)
  z = sign * beta * (g - kl)
  w = np.where(desirable, ld, lu)
  loss = np.mean(w * (1 - _sigmoid(z)))
  # Gradient with the KL estimate held constant: dL/dm_i = w_i s_i beta sigma'(z_i) / N.
  grad = w * sign * beta * _sigmoid(z) * (1 - _sigmoid(z)) / len(g)
  return loss, z, kl, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_loss_and_gradient_match_numpy(seed):
  rng = np.random.default_rng(seed)
  pol = rng.uniform(0.1, 1.0, size=10).astype(np.float32)
  # Reference worse on average: a positive KL estimate, so its detaching matters.
  ref = (pol + 1e-3 + rng.normal(0, 2e-3, size=10)).astype(np.float32)
  desirable = rng.uniform(size=10) < 0.5
  desirable[:2] = [True, False]
  loss, m = losses.kto_loss(pol, ref, desirable, 1000.0, 1.0, 2.0)
  ref_loss, z, kl, ref_grad = numpy_kto(pol, ref, desirable, 1000.0, 1.0, 2.0)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-6)
  assert kl > 0
  np.testing.assert_allclose(float(m["kto_kl"]), kl, rtol=1e-3)
  assert float(m["implicit_acc"]) == pytest.approx(np.mean(z > 0))
  # A KL estimate that let gradient through would add -mean(...) to every entry.
  grad = jax.grad(lambda p: losses.kto_loss(p, ref, desirable, 1000.0, 1.0, 2.0)[0])(pol)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-3, atol=1e-6)


def test_kto_loss_is_half_weight_when_policy_equals_reference():
  x = np.array([0.3, 0.5, 0.7, 0.9], np.float32)
  loss, m = losses.kto_loss(x, x, np.array([True, False, True, False]), 1000.0, 1.0, 3.0)
  assert float(loss) == pytest.approx(0.5 * (1 + 3 + 1 + 3) / 4)
  assert float(m["max_abs_logit"]) == 0.0


def _torch_residuals(rng, shape=(4, 2, 3, 3)):
  """Policy (leaf, requires grad) and reference residuals, winner and loser, as torch tensors."""
  import torch

  arrays = [rng.normal(0, 1, size=shape).astype(np.float32) for _ in range(4)]
  tensors = [torch.tensor(a.astype(np.float64), requires_grad=i < 2) for i, a in enumerate(arrays)]
  return arrays, tensors


@pytest.mark.parametrize("beta", [0.001, 0.05, 2.0])
def test_dspo_loss_and_gradients_match_torch(beta):
  import torch

  rng = np.random.default_rng(4)
  (ew, el, rw, rl), (tw, tl, trw, trl) = _torch_residuals(rng)
  # Written from the DSPO formula with predictions: pred = target + e.
  target = torch.tensor(rng.normal(size=ew.shape))
  pred_w, pred_l = target + tw, target + tl
  ref_w, ref_l = target + trw, target + trl
  mse = lambda p: (p - target).pow(2).mean(dim=[1, 2, 3])
  inside = -0.5 * beta * ((mse(pred_w) - mse(pred_l)) - (mse(ref_w) - mse(ref_l)))
  weight = (1 - torch.sigmoid(inside))[:, None, None, None]
  t_loss = ((pred_w - target) - beta * weight * (pred_w - ref_w)).pow(2).mean(dim=[1, 2, 3]).mean()
  t_loss.backward()
  f = lambda a, b: losses.dspo_loss(a, b, rw, rl, beta)[0]
  loss, (gw, gl) = jax.value_and_grad(f, (0, 1))(ew, el)
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy(), rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(np.asarray(gl), tl.grad.numpy(), rtol=1e-4, atol=1e-9)
  m = losses.dspo_loss(ew, el, rw, rl, beta)[1]
  np.testing.assert_allclose(float(m["dspo_weight"]), weight.mean().item(), rtol=1e-5)


def numpy_sdpo_scale(ew, el, mu, eps=1e-9):
  ew, el = np.asarray(ew, np.float64), np.asarray(el, np.float64)
  n = ew.size
  num = np.sum((2 * ew / n) ** 2)
  den = np.sum((2 * ew / n) * (2 * el / n))
  lam = (1 - mu) * num / (den + eps) if den > 0 else 1.0
  return float(np.clip(lam, 0.0, 1.0))


def test_sdpo_loser_scale_matches_numpy_in_each_regime():
  rng = np.random.default_rng(5)
  ew = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
  noise = rng.normal(size=ew.shape).astype(np.float32)
  cases = {
    "aligned, capped below 1": (ew + 0.3 * noise, 0.9),
    "aligned, clipped at 1": (0.2 * ew + noise, 0.0),
    "opposed (den < 0): unconstrained": (-ew + 0.1 * noise, 0.9),
  }
  seen = set()
  for name, (el, mu) in cases.items():
    expected = numpy_sdpo_scale(ew, el, mu)
    got = float(losses.sdpo_loser_scale(ew, el, mu))
    assert got == pytest.approx(expected, rel=1e-5), name
    seen.add("capped" if expected < 1 else "one")
  assert seen == {"capped", "one"}
  with pytest.raises(ValueError, match="mu"):
    losses.sdpo_loser_scale(ew, ew, 1.5)


def test_sdpo_gradient_matches_torch_with_a_hook_on_the_loser_prediction():
  """The safeguard as the paper states it: the loser's gradient on its noise prediction x lam."""
  import torch

  rng = np.random.default_rng(6)
  beta, mu = 50.0, 0.9
  (ew, el, rw, rl), (tw, tl, _, _) = _torch_residuals(rng, (4, 2, 6, 6))
  # A loser error correlated with the winner's, so that lam < 1 (the case that matters).
  el = (0.9 * ew + 0.1 * el).astype(np.float32)
  tl = torch.tensor(el.astype(np.float64), requires_grad=True)
  lam = numpy_sdpo_scale(ew, el, mu)
  assert 0 < lam < 0.99
  tl.register_hook(lambda g: g * lam)
  mse = lambda e: e.pow(2).mean(dim=[1, 2, 3])
  r_w, r_l = (torch.tensor(np.mean(r.astype(np.float64) ** 2, axis=(1, 2, 3))) for r in (rw, rl))
  inside = -0.5 * beta * ((mse(tw) - mse(tl)) - (r_w - r_l))
  t_loss = -torch.nn.functional.logsigmoid(inside).mean()
  t_loss.backward()

  def f(a, b):
    scale = losses.sdpo_loser_scale(a, b, mu)
    sq = lambda e: jnp.mean(e**2, axis=(1, 2, 3))
    return losses.sdpo_loss(sq(a), sq(b), r_w.numpy(), r_l.numpy(), beta, scale)

  (loss, m), (gw, gl) = jax.value_and_grad(f, (0, 1), has_aux=True)(ew, el)
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)  # DPO's value, unchanged.
  np.testing.assert_allclose(float(m["sdpo_scale"]), lam, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy(), rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(np.asarray(gl), tl.grad.numpy(), rtol=1e-4, atol=1e-9)
  # And it is not DPO's gradient: the loser's is smaller by exactly lam.
  g_dpo = jax.grad(
    lambda b: losses.dpo_loss(
      jnp.mean(ew**2, (1, 2, 3)), jnp.mean(b**2, (1, 2, 3)), r_w.numpy(), r_l.numpy(), beta
    )[0]
  )(el)
  np.testing.assert_allclose(np.asarray(gl), lam * np.asarray(g_dpo), rtol=1e-4, atol=1e-9)
