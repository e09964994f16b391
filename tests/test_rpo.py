"""Diffusion-RPO: rpo_loss against numpy and its DPO limit; the rpo objective in the step."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax import losses, optim
from dpo_jax import step as step_lib
from dpo_jax.step import build_step_spec
from tests.test_step import _jitted_eval, _setup_cached


def numpy_rpo(mw, ml, rw, rl, sim, beta, tau):
  """Reference written directly from BRIEF §2 in float64. -> (loss, weights, logits)."""
  mw, ml, rw, rl, sim = (np.asarray(a, np.float64) for a in (mw, ml, rw, rl, sim))
  z = -(1.0 - sim) / tau
  w = np.exp(z - z.max(axis=1, keepdims=True))
  w /= w.sum(axis=1, keepdims=True)
  h_w, h_l = -(mw - rw), -(ml - rl)
  logits = 0.5 * beta * (h_w[:, None] - h_l[None, :])
  # -log sigmoid(x) = logaddexp(0, -x), stable for large |x|.
  return np.mean(np.logaddexp(0.0, -w * logits)), w, logits


# One compile per input shape instead of one per eager op; beta and tau are traced.
_rpo_loss = jax.jit(losses.rpo_loss)


def _inputs(seed, b=12, d=6):
  """Random MSEs and the cosine matrix of random (distinct) embeddings."""
  rng = np.random.default_rng(seed)
  mw, ml, rw, rl = (rng.uniform(0.05, 1.5, size=b).astype(np.float32) for _ in range(4))
  e = rng.normal(size=(b, d))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  return mw, ml, rw, rl, (e @ e.T).astype(np.float32)


@pytest.mark.parametrize("beta,tau", [(1.0, 0.5), (500.0, 0.1), (5000.0, 0.5), (5000.0, 2.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rpo_loss_matches_numpy(beta, tau, seed):
  mw, ml, rw, rl, sim = _inputs(seed)
  loss, m = _rpo_loss(mw, ml, rw, rl, sim, beta, tau)
  ref_loss, w, logits = numpy_rpo(mw, ml, rw, rl, sim, beta, tau)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5, atol=1e-6)
  diag = np.diag(logits)
  assert float(m["implicit_acc"]) == pytest.approx(np.mean(diag > 0))
  np.testing.assert_allclose(float(m["reward_margin"]), diag.mean(), rtol=1e-4, atol=1e-4)
  b = len(mw)
  offdiag = (w.sum() - np.trace(w)) / (b * (b - 1))
  np.testing.assert_allclose(float(m["rpo_offdiag_weight"]), offdiag, rtol=1e-4)
  np.testing.assert_allclose(
    float(m["rpo_neighbours"]), np.mean(1.0 / (w**2).sum(axis=1)), rtol=1e-4
  )
  np.testing.assert_allclose(float(m["ref_mse_l"]), rl.mean(), rtol=1e-6)


@pytest.mark.parametrize("tau", [1e-6, 0.1, 0.5, 10.0])
def test_weight_rows_sum_to_one(tau):
  *_, sim = _inputs(3)
  w = np.asarray(losses.rpo_weights(sim, tau))
  assert np.all(np.isfinite(w)) and np.all(w >= 0)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
  # The pair itself (s_ii = 1, the largest similarity) always weighs most.
  np.testing.assert_array_equal(np.argmax(w, axis=1), np.arange(len(w)))


@pytest.mark.parametrize("beta", [1.0, 5000.0])
def test_tiny_tau_with_distinct_prompts_reduces_to_dpo(beta):
  mw, ml, rw, rl, sim = _inputs(4)
  assert np.max(sim - 2 * np.eye(len(sim))) < 0.99  # Distinct prompts.
  b = len(mw)
  loss, m = _rpo_loss(mw, ml, rw, rl, sim, beta, 1e-6)
  dpo, dm = losses.dpo_loss(mw, ml, rw, rl, beta)
  # Off-diagonal weights vanish, so each of the B(B-1) terms is -log sigmoid(0).
  expected = (float(dpo) + (b - 1) * math.log(2.0)) / b
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(m["rpo_offdiag_weight"]) == pytest.approx(0.0, abs=1e-30)
  assert float(m["rpo_neighbours"]) == pytest.approx(1.0)
  assert float(m["implicit_acc"]) == float(dm["implicit_acc"])
  np.testing.assert_allclose(float(m["reward_margin"]), float(dm["reward_margin"]), rtol=1e-5)


def test_gradients_reach_the_policy_mses_only():
  mw, ml, rw, rl, sim = (jnp.asarray(a) for a in _inputs(5, b=6))
  beta, tau = 50.0, 0.5
  grads = jax.jit(jax.grad(lambda *a: _rpo_loss(*a, beta, tau)[0], argnums=(0, 1, 2, 3, 4)))(
    mw, ml, rw, rl, sim
  )
  g_mw, g_ml, g_rw, g_rl, g_sim = (np.asarray(g) for g in grads)
  for g in (g_rw, g_rl, g_sim):
    np.testing.assert_array_equal(g, 0.0)
  # Closed form: d/dlogit of -log sigmoid(w * logit) = -w * sigmoid(-w * logit), and
  # d logit_ij / d m_w_i = -0.5 beta, d logit_ij / d m_l_j = +0.5 beta; mean over B^2 terms.
  _, w, logits = numpy_rpo(mw, ml, rw, rl, sim, beta, tau)
  d = w / (1.0 + np.exp(w * logits)) * 0.5 * beta / w.size
  np.testing.assert_allclose(g_mw, d.sum(axis=1), rtol=1e-4)
  np.testing.assert_allclose(g_ml, -d.sum(axis=0), rtol=1e-4)


def test_extreme_logits_are_finite():
  b = 4
  mw, ml = jnp.full((b,), 4.0), jnp.zeros((b,))
  zeros, sim = jnp.zeros((b,)), jnp.eye(b)
  f = lambda a: losses.rpo_loss(a, ml, zeros, zeros, sim, 5000.0, 1e-6)[0]
  loss, g = jax.jit(jax.value_and_grad(f))(mw)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
  # Diagonal: -log sigmoid(-1e4) = 1e4; off-diagonal: log 2.
  assert float(loss) == pytest.approx((1e4 + (b - 1) * math.log(2.0)) / b, rel=1e-6)


def _sim_and_loss(mw, ml, rw, rl, embeds):
  return losses.rpo_loss(mw, ml, rw, rl, step_lib.rpo_similarity(embeds), 5000.0, 0.5)


def test_loss_is_the_same_on_one_and_eight_devices():
  assert jax.device_count() == 8
  rng = np.random.default_rng(6)
  b = 16
  args = [rng.uniform(0.05, 1.5, size=b).astype(np.float32) for _ in range(4)]
  # Unnormalised embeddings with some repeated prompts: the step normalises.
  args.append((rng.normal(size=(4, 8)) * rng.uniform(0.5, 3.0, size=(4, 1)))[np.arange(b) % 4])
  one = jax.devices()[0]
  single = jax.jit(_sim_and_loss)(*(jax.device_put(a, one) for a in args))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data"))
  sharded_args = [jax.device_put(a, rows) for a in args]
  assert len(sharded_args[-1].sharding.device_set) == 8
  sharded = jax.jit(_sim_and_loss, out_shardings=NamedSharding(mesh, P()))(*sharded_args)
  np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-6)
  for k in single[1]:
    np.testing.assert_allclose(float(sharded[1][k]), float(single[1][k]), rtol=1e-6, err_msg=k)
  # Pairs of the same prompt (4 per row) are each other's neighbours.
  assert float(single[1]["rpo_neighbours"]) > 2.0


def test_similarity_normalises_rows_in_float32():
  e = jnp.asarray([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], jnp.bfloat16)
  s = np.asarray(step_lib.rpo_similarity(e))
  assert s.dtype == np.float32
  np.testing.assert_allclose(np.diag(s)[:2], 1.0, rtol=1e-6)
  assert s[0, 1] == pytest.approx(0.8)
  np.testing.assert_array_equal(s[2], 0.0)  # A zero row stays finite.


@functools.cache
def _jitted_rpo_train_tiny_tau():
  """The rpo train step with tau = 1e-6, where RPO is (DPO + (B - 1) log 2) / B."""
  spec = dataclasses.replace(_setup_cached("rpo")[0], rpo_tau=1e-6)
  return jax.jit(lambda s, r, b, k: step_lib.train_step(s, r, b, k, spec=spec))


def test_train_step_rpo_step0_is_log2_and_tiny_tau_is_shifted_dpo():
  spec, params, batch = _setup_cached("rpo")
  assert spec.objective == "rpo" and spec.rpo_tau == 0.5  # Wired from config.rpo.tau.
  train = _jitted_rpo_train_tiny_tau()
  state = step_lib.init_train_state(params, spec.tx)
  rng = jax.random.PRNGKey(0)
  # Pairs 0, 2 and 1, 3 share a prompt (synthetic data, 2 prompts): identical embeddings.
  twins = dict(batch, rpo_embeds=batch["context"].mean(axis=1))
  new_state, m = train(state, params, twins, rng)
  # Policy == reference: every logit is 0, every term -log sigmoid(0).
  assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
  assert float(m["implicit_acc"]) == 0.0
  assert float(m["grad_norm"]) > 0 and float(m["skipped"]) == 0.0
  assert int(new_state.step) == 1
  # tau -> 0: each row splits its weight evenly between itself and its twin.
  assert float(m["rpo_neighbours"]) == pytest.approx(2.0, rel=1e-6)
  assert float(m["rpo_offdiag_weight"]) == pytest.approx(0.5 * 4 / 12, rel=1e-6)

  # Distinct embeddings and a perturbed reference (non-zero logits): the step's
  # RPO loss is the DPO loss on the same noise (the step folds in step 0), shifted.
  ref = jax.tree.map(lambda x: x * 0.9, params)
  distinct = dict(batch, rpo_embeds=jax.random.normal(jax.random.PRNGKey(2), (4, 32)))
  _, rm = train(state, ref, distinct, rng)
  dm = _jitted_eval("dpo")(params, ref, batch, jax.random.fold_in(rng, 0))
  b = batch["latents_w"].shape[0]
  assert float(dm["loss"]) != pytest.approx(math.log(2.0), abs=1e-3)
  expected = (float(dm["loss"]) + (b - 1) * math.log(2.0)) / b
  np.testing.assert_allclose(float(rm["loss"]), expected, rtol=1e-5)
  for k in ("implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_w"):
    np.testing.assert_allclose(float(rm[k]), float(dm[k]), rtol=1e-5, err_msg=k)


def test_rpo_misuse_raises_clear_errors(tiny_config):
  tiny_config.objective = "rpo"
  tx, lr_fn = optim.make_optimizer(tiny_config.optim, tiny_config.max_steps)
  spec = build_step_spec(tiny_config, None, tx, lr_fn)
  assert spec.rpo_tau == tiny_config.rpo.tau
  # Raised before any model work, so no UNet is needed here.
  batch = {"latents_w": jnp.zeros((2, 4, 8, 8)), "context": jnp.zeros((2, 3, 8))}
  with pytest.raises(KeyError, match="rpo_embeds"):
    step_lib.objective_loss(spec, None, None, batch, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="grad_accum"):
    dataclasses.replace(spec, grad_accum=2)
  with pytest.raises(ValueError, match="tau"):
    dataclasses.replace(spec, rpo_tau=0.0)
  tiny_config.optim.grad_accum = 2
  with pytest.raises(ValueError, match="grad_accum"):
    build_step_spec(tiny_config, None, tx, lr_fn)
  tiny_config.optim.grad_accum = 1
  tiny_config.rpo.embedding = "audio"
  with pytest.raises(ValueError, match="embedding"):
    build_step_spec(tiny_config, None, tx, lr_fn)
