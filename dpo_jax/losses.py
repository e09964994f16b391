"""Preference and denoising losses, as pure functions of per-sample errors.

All functions take per-pair mean squared errors (already averaged over C, H, W)
so they are independent of the model, the scheduler and the sharding; the train
step computes the errors. Shapes: `B` = number of preference pairs.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def pair_metrics(
  inside: chex.Array,
  policy_mse_w: chex.Array,
  policy_mse_l: chex.Array,
  ref_mse_w: chex.Array,
  ref_mse_l: chex.Array,
  logits: chex.Array | None = None,
) -> dict[str, chex.Array]:
  """Per-pair DPO diagnostics: implicit accuracy / margin of the logits and the mean MSEs.

  `max_abs_logit` is the largest |logit| (of `logits`, default `inside`): exactly
  0 while the policy equals the reference, which the trainer checks at step 0
  (`step.check_reference_match`).
  """
  logits = inside if logits is None else logits
  return {
    "implicit_acc": jnp.mean((inside > 0).astype(jnp.float32)),
    "reward_margin": jnp.mean(inside),
    "max_abs_logit": jnp.max(jnp.abs(logits)),
    "model_mse_w": jnp.mean(policy_mse_w),
    "model_mse_l": jnp.mean(policy_mse_l),
    "ref_mse_w": jnp.mean(ref_mse_w),
    "ref_mse_l": jnp.mean(ref_mse_l),
  }


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
    `max_abs_logit` (max |inside|), `model_mse_w/l`, `ref_mse_w/l` (batch means).
  """
  chex.assert_rank([policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l], 1)
  chex.assert_equal_shape([policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l])
  model_diff = policy_mse_w - policy_mse_l
  ref_diff = ref_mse_w - ref_mse_l
  inside = -0.5 * beta * (model_diff - ref_diff)
  # log_sigmoid is stable for |inside| >> 1, where log(sigmoid(.)) underflows
  # to -inf and its gradient to NaN.
  loss = -jnp.mean(jax.nn.log_sigmoid(inside))
  return loss, pair_metrics(inside, policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l)


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


def rpo_weights(similarity: chex.Array, tau: float | chex.Array) -> chex.Array:
  """Diffusion-RPO pair weights `w_ij = softmax_j(-(1 - s_ij) / tau)`.

  Args:
    similarity: [B, B] cosine similarities `s_ij = cos(e_i, e_j)` of the pairs'
      embeddings (row i: pair i's winner, column j: pair j's loser).
    tau: distance temperature (> 0); small tau concentrates each row on its
      most similar pairs, `tau -> 0` gives the identity for distinct prompts.

  Returns:
    [B, B] float32 weights, each row summing to 1 (diagonal included).
  """
  chex.assert_rank(similarity, 2)
  chex.assert_axis_dimension(similarity, 1, similarity.shape[0])
  if isinstance(tau, (int, float)) and tau <= 0:
    raise ValueError(f"rpo tau must be > 0, got {tau}.")
  distance = 1.0 - similarity.astype(jnp.float32)
  # jax.nn.softmax subtracts the row max: exact even for tau = 1e-6, where the
  # exponents reach -2e6.
  return jax.nn.softmax(-distance / tau, axis=-1)


def rpo_loss(
  policy_mse_w: chex.Array,
  policy_mse_l: chex.Array,
  ref_mse_w: chex.Array,
  ref_mse_l: chex.Array,
  similarity: chex.Array,
  beta: float | chex.Array,
  tau: float | chex.Array,
) -> tuple[chex.Array, dict[str, chex.Array]]:
  """Diffusion-RPO loss (Gu et al. 2024, arXiv 2406.06382; BRIEF §2).

  Every winner i is contrasted with every loser j of the batch, weighted by how
  related pairs i and j are:

    h_w_i = -(m_w_i - r_w_i),  h_l_j = -(m_l_j - r_l_j)
    logits_ij = 0.5 * beta * (h_w_i - h_l_j)
    w_ij = softmax_j(-(1 - s_ij) / tau)
    loss = mean_i mean_j -log sigmoid(w_ij * logits_ij)

  The diagonal `logits_ii` is exactly `dpo_loss`'s `inside`, so with `w = I`
  (tau -> 0, distinct prompts) `loss = (dpo_loss + (B - 1) * log 2) / B`: each
  zero-weighted off-diagonal term contributes `-log sigmoid(0) = log 2`.

  Choices the paper leaves open, and what we do (LM code = the authors'
  `RPOTrainer` in yinyueqin/relative-preference-optimization, `trainers.py`
  and `config/loss/rpo-paired.yaml`):
    - Where the weight goes: it multiplies the logit *inside* the sigmoid, as
      in the LM code (`-logsigmoid(beta * logits * distance_weights)`), not the
      per-term loss. Multiplying the logit by `w_ij` is the same as giving
      term (i, j) its own temperature `w_ij * beta`, so off-diagonal terms with
      tiny weights contribute ~log 2 and almost no gradient.
    - beta and 1/2: applied once, outside the weight, exactly as in
      `dpo_loss` (the official Diffusion-DPO trainer's `-0.5 * beta`); the LM
      code's `beta * (w * logits)` is the same product with the LM log-ratio
      in place of the diffusion term.
    - Reduction: mean over j (all B columns, diagonal included) then mean over
      i, as the LM code's `.mean(-1)` per row followed by the batch mean. It is
      *not* renormalised by the weights, hence the `(B - 1) log 2` offset.
    - Softmax: over columns j of row i (`dim=1` in the LM code), diagonal
      included, over the whole (global) batch the caller passes.
    - Distance and temperature: cosine distance `1 - s_ij` divided by tau;
      the LM default `distance_temperature` is 0.5. The LM code embeds prompt
      text with a sentence transformer (all-MiniLM-L6-v2); for diffusion we
      take a frozen CLIP embedding (text, image or both, chosen by the caller).
    - Gradients: the weights are constants (the LM code builds them from
      numpy embeddings of a frozen encoder), so `similarity` is wrapped in
      `stop_gradient`; the reference MSEs are too, as the reference is frozen.
    - Rewards: each pair's implicit reward is evaluated at its own prompt,
      noise and timestep; no cross-pair UNet evaluations (as LM log-probs are
      each under their own prompt).
    - Scope of the batch: the LM code builds the matrix per device and per
      micro-batch (its local slice); we use the global batch (the step
      refuses gradient accumulation for rpo rather than silently shrinking it).

  Args:
    policy_mse_w: [B] policy MSE on pair i's preferred image.
    policy_mse_l: [B] policy MSE on pair i's rejected image (same noise, timestep).
    ref_mse_w: [B] frozen-reference MSE on the preferred image.
    ref_mse_l: [B] frozen-reference MSE on the rejected image.
    similarity: [B, B] cosine similarities of the pairs' embeddings (s_ii = 1).
    beta: scalar DPO temperature.
    tau: scalar distance temperature (> 0).

  Returns:
    (loss, metrics): scalar loss and scalar metrics `implicit_acc` (fraction
    of pairs with diagonal logit > 0, i.e. `dpo_loss`'s definition),
    `reward_margin` (mean diagonal logit), `max_abs_logit` (max |logits_ij|
    over all i, j, unweighted), `model_mse_w/l`, `ref_mse_w/l`,
    `rpo_offdiag_weight` (mean w_ij over i != j; 0 when B == 1) and
    `rpo_neighbours` (mean over rows of 1 / sum_j w_ij^2: the effective number
    of pairs a winner is contrasted with, itself included; 1 = plain DPO).
  """
  chex.assert_rank([policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l], 1)
  chex.assert_equal_shape([policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l])
  b = policy_mse_w.shape[0]
  chex.assert_shape(similarity, (b, b))
  ref_mse_w, ref_mse_l, similarity = jax.tree.map(
    jax.lax.stop_gradient, (ref_mse_w, ref_mse_l, similarity)
  )
  weights = rpo_weights(similarity, tau)
  h_w = -(policy_mse_w - ref_mse_w)
  h_l = -(policy_mse_l - ref_mse_l)
  logits = 0.5 * beta * (h_w[:, None] - h_l[None, :])
  loss = -jnp.mean(jax.nn.log_sigmoid(weights * logits))
  inside = jnp.diagonal(logits)
  off_diag = 1.0 - jnp.eye(b, dtype=weights.dtype)
  metrics = {
    **pair_metrics(inside, policy_mse_w, policy_mse_l, ref_mse_w, ref_mse_l, logits),
    "rpo_offdiag_weight": jnp.sum(weights * off_diag) / max(b * (b - 1), 1),
    "rpo_neighbours": jnp.mean(1.0 / jnp.sum(weights**2, axis=-1)),
  }
  return loss, metrics
