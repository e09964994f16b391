"""Optimizer and learning-rate schedule from `config.optim`.

Both optimizers match the official PyTorch trainer update for update:

* `adamw` is `optax.adamw`, which is `torch.optim.AdamW`: bias-corrected
  moments, `eps` outside the square root, and decoupled weight decay that
  scales with the learning rate (`p -= lr * wd * p`).
* `adafactor` is `transformers.optimization.Adafactor(lr=..., weight_decay=...,
  clip_threshold=1.0, scale_parameter=False, relative_step=False)`, the SDXL
  optimizer of the official Diffusion-DPO trainer. `optax.adafactor` differs
  from it in four ways that change the update: it multiplies by the parameter
  RMS by default (a ~30x smaller SDXL update), factors only tensors whose two
  largest dims are >= 128 and factors those two largest dims, and adds weight
  decay after the learning rate (so `wd=1e-2` would shrink the weights 1 % per
  step). `scale_by_torch_factored_rms` below reproduces the PyTorch statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# apply_if_finite accepts a non-finite update after this many consecutive
# rejections; we never want that (one NaN update destroys the weights), so the
# limit is effectively infinite and the trainer aborts on its own threshold.
_NEVER_ACCEPT_NONFINITE = 2**30

# transformers.Adafactor defaults, as the official trainer leaves them:
# second-moment decay 1 - t**-0.8, eps1 added to the squared gradient, and the
# per-tensor update RMS clipped to 1.
ADAFACTOR_DECAY_RATE = 0.8
ADAFACTOR_EPS = 1e-30
ADAFACTOR_CLIP_THRESHOLD = 1.0


def lr_schedule(optim: ml_collections.ConfigDict, max_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_frac * max_steps` steps, then constant (official DPO)."""
  warmup_steps = int(round(optim.warmup_frac * max_steps))
  if warmup_steps <= 0:
    return optax.constant_schedule(optim.lr)
  return optax.warmup_constant_schedule(0.0, optim.lr, warmup_steps)


def torch_factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
  """The Flax axes that PyTorch's Adafactor factors, as (torch dim -2, torch dim -1).

  PyTorch factors every tensor with >= 2 dims over its last two dims in the
  torch layout. Our parameters are in Flax layout: a Dense kernel is
  `[in, out]` (torch `[out, in]`), a conv kernel `[*spatial, in, out]` (torch
  `[out, in, *spatial]`), so a 2-D conv's state is factored over the kernel's
  `(kh, kw)` axes, exactly as the official trainer does, not over its
  channels. The diffusers UNets have no other parameters of rank >= 2.

  Args:
    shape: a parameter's shape in Flax layout.

  Returns:
    None for rank < 2 (an unfactored second moment), else the Flax axes
    `(a, b)` of torch dims -2 and -1: row statistics average over `b`, column
    statistics over `a`.
  """
  n = len(shape)
  if n < 2:
    return None
  # torch axis i holds Flax axis perm[i].
  perm = (n - 1, n - 2, *range(n - 2))
  return perm[-2], perm[-1]


class TorchFactoredState(NamedTuple):
  """Adafactor second moments; unused slots of a leaf hold a (1,) placeholder."""

  count: jax.Array  # Updates applied so far, int32 [].
  v_row: Any  # Per factored leaf: shape without Flax axis b (torch's exp_avg_sq_row).
  v_col: Any  # Per factored leaf: shape without Flax axis a (torch's exp_avg_sq_col).
  v: Any  # Per rank-0/1 leaf: full shape (torch's exp_avg_sq).


def scale_by_torch_factored_rms(
  decay_rate: float = ADAFACTOR_DECAY_RATE, eps: float = ADAFACTOR_EPS
) -> optax.GradientTransformation:
  """Divides by Adafactor's (factored) second-moment estimate, as `transformers.Adafactor`.

  At update t (from 1) with beta2_t = 1 - t**-decay_rate and g2 = g**2 + eps:
  v_row = beta2_t v_row + (1 - beta2_t) mean_b(g2), v_col likewise over a, and
  the update is g / sqrt(v_row / mean_a(v_row) (x) v_col); rank < 2 leaves
  use the full v = beta2_t v + (1 - beta2_t) g2 and g / sqrt(v).
  """

  def init_fn(params):
    def leaf(p, which):
      dims = torch_factored_dims(p.shape)
      placeholder = jnp.zeros((1,), p.dtype)
      if which == "v":
        return jnp.zeros_like(p) if dims is None else placeholder
      if dims is None:
        return placeholder
      a, b = dims
      return jnp.zeros_like(jnp.mean(p, axis=b if which == "row" else a))

    return TorchFactoredState(
      count=jnp.zeros([], jnp.int32),
      v_row=jax.tree.map(lambda p: leaf(p, "row"), params),
      v_col=jax.tree.map(lambda p: leaf(p, "col"), params),
      v=jax.tree.map(lambda p: leaf(p, "v"), params),
    )

  def update_fn(updates, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    beta2 = 1.0 - t ** (-decay_rate)

    def leaf(g, v_row, v_col, v):
      dims = torch_factored_dims(g.shape)
      g2 = jnp.square(g) + eps
      if dims is None:
        v = beta2 * v + (1.0 - beta2) * g2
        return g * jax.lax.rsqrt(v), v_row, v_col, v
      a, b = dims
      v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(g2, axis=b)
      v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(g2, axis=a)
      # v_row lacks axis b, so axis a sits one lower in it when b < a.
      a_in_row = a - 1 if b < a else a
      r = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=a_in_row, keepdims=True))
      c = jax.lax.rsqrt(v_col)
      return g * jnp.expand_dims(r, b) * jnp.expand_dims(c, a), v_row, v_col, v

    g_leaves, treedef = jax.tree.flatten(updates)
    out = [
      leaf(*args)
      for args in zip(
        g_leaves,
        treedef.flatten_up_to(state.v_row),
        treedef.flatten_up_to(state.v_col),
        treedef.flatten_up_to(state.v),
      )
    ]
    pick = lambda i: treedef.unflatten([o[i] for o in out])
    new_state = TorchFactoredState(
      count=optax.safe_increment(state.count), v_row=pick(1), v_col=pick(2), v=pick(3)
    )
    return pick(0), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def torch_adafactor(
  learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  """`transformers.Adafactor(lr, weight_decay, clip_threshold=1, scale_parameter=False,
  relative_step=False)`: factored RMS scaling, per-tensor RMS clipping, then
  `-lr * (update + weight_decay * p)` (PyTorch's `p -= p * wd * lr`)."""
  chain = [
    scale_by_torch_factored_rms(),
    optax.clip_by_block_rms(ADAFACTOR_CLIP_THRESHOLD),
  ]
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay))
  chain.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*chain)


def make_optimizer(
  optim: ml_collections.ConfigDict, max_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip -> AdamW | Adafactor, wrapped so non-finite gradients skip the update.

  Returns:
    (tx, schedule). The skip counter lives in the outer `ApplyIfFiniteState`
    (`total_notfinite`, `notfinite_count`), so it is checkpointed with the state.
  """
  schedule = lr_schedule(optim, max_steps)
  if optim.name == "adamw":
    # Decoupled decay before the lr scaling: p -= lr * wd * p, as torch.optim.AdamW.
    base = optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
  elif optim.name == "adafactor":
    # Factored second moments, the official SDXL optimizer (see module docstring).
    base = torch_adafactor(schedule, weight_decay=optim.weight_decay)
  else:
    raise ValueError(
      f"config.optim.name={optim.name!r} is not an optimizer; set it to 'adamw' or 'adafactor'."
    )
  chain = [base]
  if optim.clip_norm and optim.clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(optim.clip_norm))
  tx = optax.apply_if_finite(optax.chain(*chain), _NEVER_ACCEPT_NONFINITE)
  return tx, schedule
