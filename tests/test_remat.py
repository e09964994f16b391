"""Remat UNet: same parameters, same loss and gradients, less activation memory, more FLOPs."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import optim
from dpo_jax import step as step_lib
from dpo_jax.data import synthetic
from dpo_jax.models import build
from dpo_jax.models import unet as unet_lib
from dpo_jax.tools import plan

POLICIES = [p for p in unet_lib.REMAT_POLICIES if p != "none"]
SIDE = 16
PAIRS = 4


def _config(remat: str = "none"):
  """configs/tiny.py's two-level UNet (a plain and a cross-attention block, and a mid block)."""
  from configs import tiny

  c = tiny.get_config()
  c.unlock()
  c.model.sample_size = SIDE
  c.model.block_out_channels = (32, 32)
  c.model.remat = remat
  c.data.caption_dropout = 0.0
  return c


def _batch(config):
  m = config.model
  data = synthetic.make_synthetic_pairs(PAIRS, 2, (4, SIDE, SIDE), 8, m.cross_attention_dim, 0)
  return jax.tree.map(jnp.asarray, data)


@functools.cache
def _params():
  unet = unet_lib.unet_from_config(_config().model)
  params = unet_lib.init_unet_params(unet, jax.random.PRNGKey(0))
  # A reference that differs from the policy, so that the DPO gradient is not
  # the step-0 special case.
  ref = unet_lib.init_unet_params(unet, jax.random.PRNGKey(1))
  ref = jax.tree.map(lambda p, r: p + 0.05 * r, params, ref)
  return params, ref


def _grad_fn(remat: str):
  """Jitted `loss_and_grads` of the DPO step on the tiny UNet with `remat`."""
  config = _config(remat)
  unet = unet_lib.unet_from_config(config.model)
  tx, lr_fn = optim.make_optimizer(config.optim, config.max_steps)
  spec = step_lib.build_step_spec(config, unet_lib.make_unet_apply(unet), tx, lr_fn)
  return jax.jit(lambda p, r, b, k: step_lib.loss_and_grads(spec, p, r, b, k)), config


@functools.cache
def _compiled(remat: str):
  """The DPO loss-and-gradients step, compiled once per policy, and its arguments.

  Compiled as the planner does, keeping the optimization barriers: XLA:CPU
  would otherwise CSE the recomputed forward into the original one, and the
  remat program would not differ from the plain one at all.
  """
  fn, config = _grad_fn(remat)
  params, ref = _params()
  args = (params, ref, _batch(config), jax.random.PRNGKey(3))
  return fn.lower(*args).compile(compiler_options=plan.CPU_COMPILER_OPTIONS), args


@pytest.mark.parametrize("policy", POLICIES)
def test_parameter_tree_is_the_same_with_remat(policy):
  plain = unet_lib.unet_from_config(_config().model)
  remat = unet_lib.unet_from_config(_config(policy).model)
  assert remat.remat_policy == policy and plain.remat_policy == "none"
  shapes = lambda u: flax.traverse_util.flatten_dict(
    jax.eval_shape(u.init_weights, jax.random.PRNGKey(0))
  )
  a, b = shapes(plain), shapes(remat)
  assert sorted(a) == sorted(b)
  assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
  # Same paths the pretrained loader maps PyTorch names to.
  assert ("down_blocks_1", "attentions_0", "proj_in", "kernel") in a
  assert ("mid_block", "resnets_1", "conv1", "kernel") in a


@pytest.mark.parametrize("policy", POLICIES)
def test_dpo_loss_and_gradients_equal_without_remat(policy):
  compiled, args = _compiled("none")
  loss, metrics, grads = compiled(*args)
  r_compiled, r_args = _compiled(policy)
  r_loss, r_metrics, r_grads = r_compiled(*r_args)
  gnorm = float(optax.tree.norm(grads))
  assert gnorm > 1e-3  # A real gradient, not a saturated or step-0-zero one.
  np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(r_metrics[k], metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  flat, r_flat = (flax.traverse_util.flatten_dict(g) for g in (grads, r_grads))
  for k in flat:
    np.testing.assert_allclose(r_flat[k], flat[k], rtol=1e-4, atol=1e-6 * gnorm, err_msg=str(k))


def test_remat_lowers_activation_memory():
  temp = {p: _compiled(p)[0].memory_analysis().temp_size_in_bytes for p in unet_lib.REMAT_POLICIES}
  # Measured: none 41.5 MB, blocks 18.6 MB, blocks_save_dots 19.6 MB.
  assert temp["blocks"] < 0.8 * temp["none"], temp
  assert temp["blocks"] <= temp["blocks_save_dots"] < temp["none"], temp


def test_remat_recomputes_the_forward_in_the_lowered_flops():
  params, ref = _params()
  args = (params, ref, _batch(_config()), jax.random.PRNGKey(3))
  flops = {p: step_lib.lowered_flops(_grad_fn(p)[0].lower(*args)) for p in ("none", "blocks")}
  # DPO: policy fwd+bwd on 2 images (6) + reference fwd on 2 (2) = 8 forward-
  # equivalents; block remat recomputes the policy forward (+2) except the few
  # layers outside the blocks (conv_in/out, time embedding).
  ratio = flops["blocks"] / flops["none"]
  assert 1.15 < ratio <= 1.25, ratio


def test_with_remat_keeps_the_unet_and_checks_its_arguments():
  plain = unet_lib.unet_from_config(_config().model, "bfloat16")
  assert unet_lib.with_remat(plain, "none") is plain
  remat = unet_lib.with_remat(plain, "blocks")
  assert remat.dtype == jnp.bfloat16 and remat.block_out_channels == plain.block_out_channels
  assert remat.remat_policy == "blocks"
  back = unet_lib.with_remat(remat, "none")
  assert back == plain
  # An explicit argument wins over the config's field.
  assert unet_lib.unet_from_config(_config("blocks").model, remat="none") == plain.clone(
    dtype=jnp.float32
  )
  with pytest.raises(ValueError, match="Unknown remat policy"):
    unet_lib.with_remat(plain, "everything")
  with pytest.raises(ValueError, match="Unknown remat policy"):
    unet_lib.unet_from_config(_config("everything").model)


def test_build_models_applies_config_remat():
  models = build.build_models(_config("blocks"))
  assert models.unet.remat_policy == "blocks"
