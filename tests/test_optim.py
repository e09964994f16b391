"""optim.make_optimizer against the PyTorch optimizers of the official trainer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor

from dpo_jax import optim

# Flax layout -> torch layout of each test parameter (Dense kernel [in, out] ->
# weight [out, in]; conv kernel [kh, kw, in, out] -> weight [out, in, kh, kw]).
TO_TORCH = {
  "dense_kernel": (1, 0),
  "conv_kernel": (3, 2, 0, 1),
  "conv1x1_kernel": (3, 2, 0, 1),
  "bias": (0,),
}
SHAPES = {
  "dense_kernel": (6, 5),
  "conv_kernel": (3, 2, 4, 7),  # kh != kw, so factoring (kh, kw) vs (kw, kh) would show.
  "conv1x1_kernel": (1, 1, 3, 4),
  "bias": (5,),
}


def _config(name, lr, weight_decay):
  c = ml_collections.ConfigDict()
  c.name, c.lr, c.warmup_frac, c.weight_decay, c.clip_norm = name, lr, 0.0, weight_decay, 0.0
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  return c


def _grad(rng, shape):
  return (rng.normal(size=shape) * rng.uniform(0.01, 3.0, size=shape)).astype(np.float32)


def _run_both(name, torch_opt_fn, lr, weight_decay, steps=3):
  """`steps` updates with the same random params/grads in JAX and torch -> (jax, torch) params."""
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  # Gradients of very different scale per step and per entry exercise the
  # second-moment decay and the RMS clipping.
  grads = [
    {
      k: (rng.normal(size=s) * rng.uniform(0.01, 3.0, size=s)).astype(np.float32)
      for k, s in SHAPES.items()
    }
    for _ in range(steps)
  ]
  tx, _ = optim.make_optimizer(_config(name, lr, weight_decay), max_steps=100)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)

  to_torch = lambda k, v: torch.tensor(v.transpose(TO_TORCH[k]).copy())
  tp = {k: torch.nn.Parameter(to_torch(k, v)) for k, v in params.items()}
  topt = torch_opt_fn(list(tp.values()), lr, weight_decay)
  for g in grads:
    for k, v in g.items():
      tp[k].grad = to_torch(k, v)
    topt.step()
  back = {k: np.argsort(TO_TORCH[k]) for k in SHAPES}
  torch_params = {k: v.detach().numpy().transpose(back[k]) for k, v in tp.items()}
  return jax.device_get(p), torch_params, params


def _hf_adafactor(params, lr, weight_decay):
  # The official SDXL optimizer (DiffusionDPO train.py).
  return Adafactor(
    params,
    lr=lr,
    weight_decay=weight_decay,
    clip_threshold=1.0,
    scale_parameter=False,
    relative_step=False,
  )


@pytest.mark.parametrize("steps", [1, 3])
def test_adafactor_matches_transformers(steps):
  ours, ref, init = _run_both("adafactor", _hf_adafactor, lr=1e-2, weight_decay=0.5, steps=steps)
  for k in SHAPES:
    # The update must be large against the tolerance for the check to mean anything.
    assert np.abs(ref[k] - init[k]).max() > 1e-3, k
    np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-6, err_msg=k)


def test_adafactor_state_is_factored_over_torch_last_two_dims():
  tx, _ = optim.make_optimizer(_config("adafactor", 1e-3, 0.0), max_steps=10)
  state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
  is_fac = lambda x: isinstance(x, optim.TorchFactoredState)
  (fac,) = [x for x in jax.tree.leaves(state, is_leaf=is_fac) if is_fac(x)]
  assert fac.v_row["conv_kernel"].shape == (3, 4, 7)  # torch exp_avg_sq_row [out, in, kh]
  assert fac.v_col["conv_kernel"].shape == (2, 4, 7)  # torch exp_avg_sq_col [out, in, kw]
  assert fac.v_row["dense_kernel"].shape == (5,) and fac.v_col["dense_kernel"].shape == (6,)
  assert fac.v["bias"].shape == (5,)


def test_adamw_matches_torch():
  torch_adamw = lambda params, lr, wd: torch.optim.AdamW(
    params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd
  )
  ours, ref, init = _run_both("adamw", torch_adamw, lr=1e-2, weight_decay=0.5, steps=3)
  for k in SHAPES:
    assert np.abs(ref[k] - init[k]).max() > 1e-3, k
    np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-6, err_msg=k)


def test_unknown_optimizer_names_the_field():
  with pytest.raises(ValueError, match="config.optim.name='sgd'"):
    optim.make_optimizer(_config("sgd", 1e-3, 0.0), max_steps=10)
