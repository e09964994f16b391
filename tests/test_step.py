"""The pure train/eval step on a tiny UNet: noise sharing, reference, accumulation, NaN skip."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import diffusion, optim
from dpo_jax import step as step_lib
from dpo_jax.data import synthetic
from dpo_jax.models import unet as unet_lib
from dpo_jax.step import build_step_spec


def _one_level_config():
  """The tiny config with a one-level UNet (fast to compile)."""
  from configs import tiny

  config = tiny.get_config()
  config.unlock()
  config.model.sample_size = 8
  config.model.block_out_channels = (32,)
  config.model.down_block_types = ("CrossAttnDownBlock2D",)
  config.model.up_block_types = ("CrossAttnUpBlock2D",)
  return config


@functools.cache
def _setup_cached(objective="dpo", grad_accum=1):
  """Spec, params and batch per variant; cached so each variant compiles once."""
  return _setup(_one_level_config(), objective=objective, grad_accum=grad_accum)


@functools.cache
def _jitted_train(objective="dpo"):
  spec = _setup_cached(objective)[0]
  return jax.jit(lambda s, r, b, k: step_lib.train_step(s, r, b, k, spec=spec))


@functools.cache
def _jitted_eval(objective="dpo"):
  spec = _setup_cached(objective)[0]
  return jax.jit(lambda p, r, b, k: step_lib.eval_step(p, r, b, k, spec=spec))


def _setup(config, objective="dpo", lr=3e-4, grad_accum=1, batch_size=4):
  config.objective = objective
  config.optim.lr = lr
  config.optim.warmup_frac = 0.0
  config.optim.grad_accum = grad_accum
  unet = unet_lib.unet_from_config(config.model)
  tx, lr_fn = optim.make_optimizer(config.optim, config.max_steps)
  spec = build_step_spec(config, unet_lib.make_unet_apply(unet), tx, lr_fn)
  params = unet_lib.init_unet_params(unet, jax.random.PRNGKey(0))
  data = synthetic.make_synthetic_pairs(batch_size, 2, (4, 8, 8), 8, 32, seed=0)
  batch = jax.tree.map(jnp.asarray, data)
  return spec, params, batch


def test_same_noise_and_timestep_for_winner_and_loser():
  spec, params, batch = _setup_cached()
  batch = dict(batch, latents_l=batch["latents_w"])
  noise, t = diffusion.sample_noise_and_timesteps(jax.random.PRNGKey(1), (4, 4, 8, 8), 1000)

  @functools.partial(jax.jit, static_argnames="with_loser")
  def mses(batch, with_loser):
    return step_lib.pair_mses(spec, params, batch, noise, t, with_loser=with_loser)

  mse_w, mse_l = mses(batch, True)
  # Identical images give identical errors only if noise and t are shared.
  np.testing.assert_array_equal(np.asarray(mse_w), np.asarray(mse_l))
  # And the interleaved pass equals separate passes per side.
  alone, _ = mses(batch, False)
  np.testing.assert_allclose(alone, mse_w, rtol=1e-5)


def test_step0_loss_is_log2_and_reference_gets_no_gradient():
  spec, params, batch = _setup_cached()
  state = step_lib.init_train_state(params, spec.tx)
  new_state, m = _jitted_train()(state, params, batch, jax.random.PRNGKey(0))
  assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
  assert float(m["implicit_acc"]) == 0.0
  assert float(m["grad_norm"]) > 0
  assert int(new_state.step) == 1
  # The reference's gradient is identically zero, even with ref == policy.
  g_ref = jax.jit(
    jax.grad(lambda r: step_lib.objective_loss(spec, params, r, batch, jax.random.PRNGKey(0))[0])
  )(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_ref))
  # The optimizer state holds moments for the policy params only (mu, nu).
  n_param_leaves = len(jax.tree.leaves(params))
  n_opt_arrays = sum(1 for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  assert n_opt_arrays == 2 * n_param_leaves


@pytest.mark.parametrize("objective", ["dpo", "sft", "mapo", "kto", "dspo", "sdpo"])
def test_one_step_lowers_loss_on_fixed_batch(objective):
  spec, params, batch = _setup_cached(objective)
  ref = params
  state = step_lib.init_train_state(params, spec.tx)
  rng = jax.random.PRNGKey(7)
  # Evaluate with the key step 0 uses, i.e. the very objective the step descends.
  step0_key = jax.random.fold_in(rng, 0)
  if objective in ("dpo", "sft"):
    before = _jitted_eval(objective)(state.params, ref, batch, step0_key)
    state, _ = _jitted_train(objective)(state, ref, batch, rng)
    after = _jitted_eval(objective)(state.params, ref, batch, step0_key)
  else:
    # One compile: the train step's metrics are the loss before its update, and
    # a second step with the counter reset to 0 draws the same noise again.
    state, before = _jitted_train(objective)(state, ref, batch, rng)
    _, after = _jitted_train(objective)(
      state.replace(step=jnp.zeros_like(state.step)), ref, batch, rng
    )
  assert float(after["loss"]) < float(before["loss"])
  if objective in ("dpo", "sdpo"):
    assert float(before["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
  if objective == "kto":  # Every z = 0 at policy == reference: mean(w * (1 - 1/2)).
    # Up to the float32 gap of separately traced forwards (~1e-7 x beta 1000; the
    # signed labels keep it from cancelling as DPO's differences do).
    assert float(before["max_abs_logit"]) < step_lib.REFERENCE_MATCH_TOL
    assert float(before["loss"]) == pytest.approx(0.5, abs=1e-3)
  if objective == "dspo":  # No shift at policy == reference: the winners' MSE.
    np.testing.assert_allclose(float(before["loss"]), float(before["model_mse_w"]), rtol=1e-6)
  if objective == "mapo":  # No reference: its terms from the policy's own MSEs.
    assert "ref_mse_w" not in before
    assert float(before["loss"]) > float(before["model_mse_w"])
  if objective == "sdpo":
    assert 0.0 <= float(before["sdpo_scale"]) <= 1.0


def test_gradient_accumulation_averages_micro_batches():
  spec2, params, batch = _setup_cached(grad_accum=2)
  spec1 = _setup_cached()[0]
  rng = jax.random.PRNGKey(3)
  # Perturb the reference so the DPO gradient is not degenerate.
  ref = jax.tree.map(lambda x: x * 0.9, params)
  loss, _, grads = jax.jit(functools.partial(step_lib.loss_and_grads, spec2))(
    params, ref, batch, rng
  )
  # Independent computation: the two micro-batches (rows {2i+j}) with their keys.
  lg1 = jax.jit(functools.partial(step_lib.loss_and_grads, spec1))
  manual = [
    lg1(params, ref, jax.tree.map(lambda x, j=j: x[j::2], batch), jax.random.fold_in(rng, j))
    for j in range(2)
  ]
  np.testing.assert_allclose(loss, (manual[0][0] + manual[1][0]) / 2, rtol=1e-5)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, manual[0][2], manual[1][2])
  scale = max(float(np.abs(e).max()) for e in jax.tree.leaves(expected))
  # Some leaves (e.g. biases feeding a GroupNorm) have float-noise gradients,
  # so the absolute tolerance is relative to the largest gradient anywhere.
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * scale)


def test_nonfinite_step_is_skipped_and_counted():
  spec, params, batch = _setup_cached()
  state = step_lib.init_train_state(params, spec.tx)
  train = _jitted_train()
  bad = dict(batch, latents_w=batch["latents_w"].at[0, 0, 0, 0].set(jnp.nan))
  state1, m = train(state, params, bad, jax.random.PRNGKey(0))
  assert not np.isfinite(float(m["loss"]))
  assert float(m["skipped"]) == 1.0 and int(m["total_skipped"]) == 1
  assert int(state1.step) == 1
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state1.params)):
    np.testing.assert_array_equal(a, b)
  # A later finite step is applied normally and the consecutive counter resets.
  state2, m2 = train(state1, params, batch, jax.random.PRNGKey(0))
  assert float(m2["skipped"]) == 0.0 and int(m2["consecutive_skipped"]) == 0
  assert int(m2["total_skipped"]) == 1
  changed = any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state2.params))
  )
  assert changed


def test_v_prediction_target(tiny_config):
  sched = diffusion.make_noise_schedule(
    dict(tiny_config.scheduler.to_dict(), prediction_type="v_prediction")
  )
  x0 = jnp.ones((2, 4, 2, 2))
  eps = jnp.full((2, 4, 2, 2), 2.0)
  t = jnp.array([0, 999])
  v = diffusion.training_target(sched, "v_prediction", x0, eps, t)
  a = np.asarray(sched.alphas_cumprod)[[0, 999]]
  expected = np.sqrt(a)[:, None, None, None] * 2.0 - np.sqrt(1 - a)[:, None, None, None] * 1.0
  np.testing.assert_allclose(v, np.broadcast_to(expected, v.shape), rtol=1e-5)
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion.make_noise_schedule({"prediction_type": "sample"})


def test_caption_dropout_replaces_whole_pairs_with_the_empty_prompt():
  _, _, batch = _setup_cached()
  uncond = {"context": jnp.full(batch["context"].shape[1:], 7.0)}
  rng = jax.random.PRNGKey(0)
  none = step_lib.drop_captions(batch, uncond, 0.0, rng)
  np.testing.assert_array_equal(none["context"], batch["context"])
  every = step_lib.drop_captions(batch, uncond, 1.0, rng)
  np.testing.assert_array_equal(every["context"], np.full(batch["context"].shape, 7.0))
  big = {"context": jnp.zeros((4000, 2, 3))}
  dropped = step_lib.drop_captions(big, {"context": jnp.ones((2, 3))}, 0.2, rng)["context"]
  per_pair = np.asarray(dropped).reshape(4000, -1)
  # Whole rows are replaced (never a partial prompt), at the requested rate.
  assert set(np.unique(per_pair.mean(axis=1))) <= {0.0, 1.0}
  assert abs(per_pair[:, 0].mean() - 0.2) < 0.03
  # SDXL pooled embeddings follow the same per-pair decision; time_ids stay.
  sdxl = {
    "context": jnp.zeros((64, 2, 3)),
    "added_cond": {"text_embeds": jnp.zeros((64, 5)), "time_ids": jnp.ones((64, 6))},
  }
  un = {"context": jnp.ones((2, 3)), "text_embeds": jnp.ones((5,))}
  out = step_lib.drop_captions(sdxl, un, 0.5, rng)
  np.testing.assert_array_equal(
    np.asarray(out["context"])[:, 0, 0], np.asarray(out["added_cond"]["text_embeds"])[:, 0]
  )
  np.testing.assert_array_equal(out["added_cond"]["time_ids"], sdxl["added_cond"]["time_ids"])


def test_bf16_compute_and_reference_keep_fp32_master_weights():
  config = _one_level_config()
  config.optim.warmup_frac = 0.0
  config.precision.compute_dtype = "bfloat16"
  unet = unet_lib.unet_from_config(config.model, "bfloat16")
  tx, lr_fn = optim.make_optimizer(config.optim, config.max_steps)
  spec = build_step_spec(config, unet_lib.make_unet_apply(unet), tx, lr_fn)
  _, params, batch = _setup_cached()
  ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  state = step_lib.init_train_state(params, tx)
  train = jax.jit(lambda s, r, b, k: step_lib.train_step(s, r, b, k, spec=spec))
  state, m = train(state, ref, batch, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  # Policy and reference MSEs come from one compiled loop body
  # (reference_forward "matched", the bf16 default): equal weights, equal bits,
  # so every beta-5000 logit is exactly 0 and the loss exactly log 2.
  assert spec.reference_forward == "matched"
  assert np.isfinite(float(m["loss"])) and float(m["skipped"]) == 0.0
  assert float(m["grad_norm"]) > 0
  assert float(m["max_abs_logit"]) == 0.0
  assert np.float32(m["loss"]) == -np.float32(jax.nn.log_sigmoid(np.float32(0.0)))
  for side in ("w", "l"):
    assert float(m[f"model_mse_{side}"]) == float(m[f"ref_mse_{side}"])
  step_lib.check_reference_match(m, spec)
  with pytest.raises(step_lib.ReferenceMismatchError, match="not bit-identical|different MSEs"):
    step_lib.check_reference_match(dict(m, max_abs_logit=np.float32(3.0)), spec)


def test_reference_stored_below_compute_precision_is_rejected():
  config = _one_level_config()
  config.precision.compute_dtype = "float32"
  config.precision.ref_dtype = "bfloat16"
  with pytest.raises(ValueError, match="precision.ref_dtype"):
    build_step_spec(config, None, None, None)
  config.precision.ref_dtype = "float32"
  assert build_step_spec(config, None, None, None).reference_forward == "separate"


def test_eval_step_applies_no_caption_dropout():
  import dataclasses

  spec, params, batch = _setup_cached()
  uncond = {"context": np.zeros(batch["context"].shape[1:], np.float32)}
  dropping = dataclasses.replace(spec, caption_dropout=1.0, uncond=uncond)
  rng = jax.random.PRNGKey(3)
  ev = lambda s: jax.jit(lambda p, b, k: step_lib.eval_step(p, p, b, k, spec=s))(params, batch, rng)
  np.testing.assert_array_equal(ev(dropping)["model_mse_w"], ev(spec)["model_mse_w"])
  # Training with the same spec drops every caption, which changes the MSEs.
  _, train_metrics = jax.jit(
    lambda p, b, k: step_lib.objective_loss(dropping, p, p, b, k, train=True)
  )(params, batch, rng)
  assert float(train_metrics["model_mse_w"]) != float(ev(spec)["model_mse_w"])


def test_sdpo_step_scales_exactly_the_losers_gradient():
  """SDPO through the step = winner's + lam x loser's MSE gradient; lam from the residuals."""
  spec, params, batch = _setup_cached("sdpo")
  # Move the policy off the reference so the DPO weights are not all 1/2.
  policy = jax.tree.map(lambda p: p * 1.05, params)
  rng = jax.random.PRNGKey(3)
  noise, t = diffusion.sample_noise_and_timesteps(rng, batch["latents_w"].shape, 1000)

  @jax.jit
  def sdpo_grad_and_residuals(p):
    g = jax.grad(lambda q: step_lib.objective_loss(spec, q, params, batch, rng, train=False)[0])(p)
    ref_mses = step_lib.pair_mses(spec, params, batch, noise, t)
    return g, step_lib.pair_residuals(spec, p, batch, noise, t), ref_mses

  @jax.jit
  def mse_vjp(p, cotangents):
    _, vjp = jax.vjp(lambda q: step_lib.pair_mses(spec, q, batch, noise, t), p)
    return vjp(cotangents)[0]

  g_sdpo, residuals, ref_mses = sdpo_grad_and_residuals(policy)
  ew, el = (np.asarray(r, np.float64) for r in residuals)
  n = ew.size
  num, den = np.sum((2 * ew / n) ** 2), np.sum((2 * ew / n) * (2 * el / n))
  lam = float(np.clip((1 - spec.sdpo_mu) * num / (den + 1e-9), 0, 1)) if den > 0 else 1.0
  m_w, m_l = (np.mean(e**2, axis=(1, 2, 3)) for e in (ew, el))
  r_w, r_l = (np.asarray(x, np.float64) for x in ref_mses)
  inside = -0.5 * spec.beta * ((m_w - m_l) - (r_w - r_l))
  # d mean(-log sigmoid(inside)) / d m_w = sigmoid(-inside) beta / 2 / B; the loser's is -that.
  d_w = 0.5 * spec.beta / (1 + np.exp(inside)) / len(inside)
  g_ref = mse_vjp(policy, (jnp.asarray(d_w, jnp.float32), jnp.asarray(-lam * d_w, jnp.float32)))
  g_dpo = mse_vjp(policy, (jnp.asarray(d_w, jnp.float32), jnp.asarray(-d_w, jnp.float32)))
  assert lam < 1.0  # The safeguard is active on this batch (otherwise it is plain DPO).
  # float32 UNet gradients (some leaves nearly cancel to ~1e-7): compare on the global scale.
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_ref))
  max_dpo_gap = 0.0
  for a, b, c in zip(*(jax.tree.leaves(g) for g in (g_sdpo, g_ref, g_dpo))):
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)
    max_dpo_gap = max(max_dpo_gap, np.max(np.abs(a - c)) / scale)
  assert max_dpo_gap > 1e-2  # Plain DPO's gradient would not pass the comparison above.
