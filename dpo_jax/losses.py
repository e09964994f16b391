"""Preference and denoising losses, as pure functions of per-sample errors.

All functions take per-pair mean squared errors (already averaged over C, H, W)
so they are independent of the model, the scheduler and the sharding; the train
step computes the errors. Shapes: `B` = number of preference pairs.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def dpo_loss(
  policy_mse_w: chex.Array,
  policy_mse_l: chex.Array,
  ref_mse_w: chex.Array,
  ref_mse_l: chex.Array,
  beta: float | chex.Array,
) -> tuple[chex.Array, dict[str, chex.Array]]:
  """Diffusion-DPO loss (Wallace et al. 2023, eq. 14 as in the official trainer).

  inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l));  loss = mean(-log sigmoid(inside)).

  `beta` is applied exactly once (maxtext's DPO applies it twice). The 0.5 is
  the official code's factor: the per-timestep KL weight folded into beta.

  Args:
    policy_mse_w: [B] policy noise-prediction MSE on the preferred image.
    policy_mse_l: [B] policy MSE on the rejected image (same noise, timestep).
    ref_mse_w: [B] frozen-reference MSE on the preferred image.
    ref_mse_l: [B] frozen-reference MSE on the rejected image.
    beta: scalar DPO temperature.

  Returns:
    (loss, metrics): scalar batch-mean loss and scalar metrics
    `implicit_acc` (fraction with inside > 0), `reward_margin` (mean inside),
    `model_mse_w/l`, `ref_mse_w/l` (batch means).
  """
  chex.assert_rank([policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l], 1)
  chex.assert_equal_shape([policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l])
  model_diff = policy_mse_w - policy_mse_l
  ref_diff = ref_mse_w - ref_mse_l
  inside = -0.5 * beta * (model_diff - ref_diff)
  # log_sigmoid is stable for |inside| >> 1, where log(sigmoid(.)) underflows
  # to -inf and its gradient to NaN.
  loss = -jnp.mean(jax.nn.log_sigmoid(inside))
  metrics = {
    "implicit_acc": jnp.mean((inside > 0).astype(jnp.float32)),
    "reward_margin": jnp.mean(inside),
    "model_mse_w": jnp.mean(policy_mse_w),
    "model_mse_l": jnp.mean(policy_mse_l),
    "ref_mse_w": jnp.mean(ref_mse_w),
    "ref_mse_l": jnp.mean(ref_mse_l),
  }
  return loss, metrics


def sft_loss(policy_mse_w: chex.Array) -> tuple[chex.Array, dict[str, chex.Array]]:
  """SFT baseline: the ordinary denoising loss on preferred images only.

  Args:
    policy_mse_w: [B] policy MSE on the preferred image.

  Returns:
    (loss, metrics) with `model_mse_w`.
  """
  chex.assert_rank(policy_mse_w, 1)
  loss = jnp.mean(policy_mse_w)
  return loss, {"model_mse_w": loss}
