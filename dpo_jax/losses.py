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


def scale_gradient(x: chex.Array, scale: float | chex.Array) -> chex.Array:
  """`x` in the forward pass; its gradient multiplied by `scale` in the backward pass.

  `sg(x) + scale * (x - sg(x))`: the value is x (the bracket is exactly 0), the
  derivative is `scale`. `scale` itself gets no gradient.
  """
  scale = jax.lax.stop_gradient(scale)
  return jax.lax.stop_gradient(x) + scale * (x - jax.lax.stop_gradient(x))


def mapo_transform(mse: chex.Array, snr_value: float | chex.Array) -> chex.Array:
  """MaPO's `f(m) = s m / (exp(s m) - 1)`, with its limit f(0) = 1.  [B] -> [B].

  `expm1` keeps it accurate for small `s m` (exp(s m) - 1 cancels to a few
  digits in float32 at m ~ 1e-4); a decreasing function of the MSE, so
  `f(m_w) > f(m_l)` iff the winner is denoised better.
  """
  x = snr_value * mse
  safe = jnp.where(x == 0, 1.0, x)
  return jnp.where(x == 0, 1.0, safe / jnp.expm1(safe))


def mapo_loss(
  policy_mse_w: chex.Array,
  policy_mse_l: chex.Array,
  beta: float | chex.Array,
  snr_value: float | chex.Array,
  num_train_timesteps: int,
) -> tuple[chex.Array, dict[str, chex.Array]]:
  """MaPO, margin-aware preference optimisation (Hong et al. 2024, arXiv 2406.06424).

  Reference-free. Follows `compute_loss` in mapo-t2i/mapo `utils.py` (read
  2026-12-01) and its defaults in `args.py` (`beta_mapo` 0.1, `snr_value` 0.5):

    f(m) = s m / (exp(s m) - 1)
    log_odds = f(m_w) - f(m_l)
    loss = mean(m_w) - beta * mean(log sigmoid(T * log_odds))

  with T = the scheduler's `num_train_timesteps` ("maximise the margin
  throughout the denoising process"). The first term is the ordinary
  denoising loss on the winners; the second is the ORPO-style odds-ratio term.

  Args:
    policy_mse_w: [B] policy MSE on the preferred image.
    policy_mse_l: [B] policy MSE on the rejected image (same noise, timestep).
    beta: `beta_mapo`, the weight of the odds-ratio term.
    snr_value: `s`, a constant.
    num_train_timesteps: T.

  Returns:
    (loss, metrics). There is no reference, so `implicit_acc` and
    `reward_margin` are those of the policy's own MaPO logit
    `T * log_odds` (fraction > 0, i.e. winner denoised better; mean), not of a
    reward relative to a reference; `max_abs_logit` its max |.|;
    `model_mse_w/l`; `mapo_ratio` = mean log sigmoid(logit) (<= 0).
  """
  chex.assert_rank([policy_mse_w, policy_mse_l], 1)
  chex.assert_equal_shape([policy_mse_w, policy_mse_l])
  log_odds = mapo_transform(policy_mse_w, snr_value) - mapo_transform(policy_mse_l, snr_value)
  logits = num_train_timesteps * log_odds
  ratio = jax.nn.log_sigmoid(logits)
  loss = jnp.mean(policy_mse_w) - beta * jnp.mean(ratio)
  metrics = {
    "implicit_acc": jnp.mean((logits > 0).astype(jnp.float32)),
    "reward_margin": jnp.mean(logits),
    "max_abs_logit": jnp.max(jnp.abs(logits)),
    "model_mse_w": jnp.mean(policy_mse_w),
    "model_mse_l": jnp.mean(policy_mse_l),
    "mapo_ratio": jnp.mean(ratio),
  }
  return loss, metrics


def kto_loss(
  policy_mse: chex.Array,
  ref_mse: chex.Array,
  desirable: chex.Array,
  beta: float | chex.Array,
  lambda_d: float | chex.Array = 1.0,
  lambda_u: float | chex.Array = 1.0,
) -> tuple[chex.Array, dict[str, chex.Array]]:
  """Diffusion-KTO (Li et al. 2024, arXiv 2404.04465) on single labelled images.

  Follows the default path of jacklishufan/diffusion-kto `train_kto_sd_v1.5.py`
  (read 2026-12-01: `--halo sigmoid`, `--bce_offset none`, `--beta_dpo` 1000,
  `--lambda_d_kto` = `--lambda_u_kto` = 1):

    g = r - m                 (implicit reward: reference minus policy MSE)
    kl = max(mean(g), 0)      (over the whole batch, both labels; detached)
    z = sign * beta * (g - kl),  sign = +1 desirable, -1 undesirable
    loss = mean(w * (1 - sigmoid(z))),  w = lambda_d or lambda_u

  Unlike DPO's 0.5 * beta there is no 1/2: beta multiplies g directly.

  Args:
    policy_mse: [N] policy MSE of each image.
    ref_mse: [N] frozen-reference MSE of each image (same noise, timestep).
    desirable: [N] bool (or 0/1) label: liked (True) or disliked.
    beta: KTO temperature.
    lambda_d: weight of desirable images.
    lambda_u: weight of undesirable images.

  Returns:
    (loss, metrics): `implicit_acc` (fraction with z > 0), `reward_margin`
    (mean z), `max_abs_logit` (max |z|), `kto_kl` (the detached KL estimate),
    `kto_reward_desirable` / `kto_reward_undesirable` (mean g - kl per label; 0
    for a label absent from the batch), `model_mse`, `ref_mse` (means).
  """
  chex.assert_rank([policy_mse, ref_mse, desirable], 1)
  chex.assert_equal_shape([policy_mse, ref_mse, desirable])
  ref_mse = jax.lax.stop_gradient(ref_mse)
  desirable = desirable.astype(bool)
  g = ref_mse - policy_mse
  # The KL term is a detached batch statistic: a baseline, not a gradient path.
  kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(g), 0.0))
  g = g - kl
  z = jnp.where(desirable, 1.0, -1.0) * beta * g
  weight = jnp.where(desirable, lambda_d, lambda_u)
  loss = jnp.mean(weight * (1.0 - jax.nn.sigmoid(z)))

  def label_mean(mask):
    return jnp.sum(jnp.where(mask, g, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

  metrics = {
    "implicit_acc": jnp.mean((z > 0).astype(jnp.float32)),
    "reward_margin": jnp.mean(z),
    "max_abs_logit": jnp.max(jnp.abs(z)),
    "kto_kl": kl,
    "kto_reward_desirable": label_mean(desirable),
    "kto_reward_undesirable": label_mean(~desirable),
    "model_mse": jnp.mean(policy_mse),
    "ref_mse": jnp.mean(ref_mse),
  }
  return loss, metrics


def _mean_over_sample(x: chex.Array) -> chex.Array:
  """[B, ...] -> [B] mean over all but the leading axis."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def dspo_loss(
  resid_w: chex.Array,
  resid_l: chex.Array,
  ref_resid_w: chex.Array,
  ref_resid_l: chex.Array,
  beta: float | chex.Array,
) -> tuple[chex.Array, dict[str, chex.Array]]:
  """DSPO, direct score preference optimisation (Zhu et al., ICLR 2025; huaishengzhu/DSPO).

  Follows the SD1.5 branch of the loss in huaishengzhu/DSPO `train.py` (read
  2026-12-01; the same in AIDC-AI/Diffusion-SDPO's `--train_method dspo`).
  With residuals `e = pred - target` of policy and (frozen) reference:

    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))     (DPO's logit)
    loss = mean_i mean_chw (e_w - beta * (1 - sigmoid(inside)) * (pred_w - ref_pred_w))^2

  i.e. the winner's denoising target is shifted along the policy-minus-
  reference score by a weight that is large while the pair is still ranked
  wrongly. `pred_w - ref_pred_w = e_w - ref_e_w` (same target). The gradient
  flows through `inside` too, as in the authors' code (nothing is detached but
  the reference). The authors' SD1.5 launcher uses beta = 0.001 (searched over
  {0.001, 0.01, 0.05}); their SDXL branch is a different, thresholded loss
  (beta 5000) that is not implemented here.

  Args:
    resid_w: [B, ...] policy residual pred - target on the preferred image.
    resid_l: [B, ...] policy residual on the rejected image (same noise, t).
    ref_resid_w: [B, ...] reference residual on the preferred image.
    ref_resid_l: [B, ...] reference residual on the rejected image.
    beta: DSPO temperature (both in `inside` and as the shift's scale).

  Returns:
    (loss, metrics): `pair_metrics` of `inside` (as DPO) and `dspo_weight`
    (mean of 1 - sigmoid(inside)).
  """
  chex.assert_equal_shape([resid_w, resid_l, ref_resid_w, ref_resid_l])
  resid_w, resid_l = resid_w.astype(jnp.float32), resid_l.astype(jnp.float32)
  ref_resid_w, ref_resid_l = jax.tree.map(
    lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), (ref_resid_w, ref_resid_l)
  )
  m_w, m_l = _mean_over_sample(resid_w**2), _mean_over_sample(resid_l**2)
  r_w, r_l = _mean_over_sample(ref_resid_w**2), _mean_over_sample(ref_resid_l**2)
  inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
  weight = 1.0 - jax.nn.sigmoid(inside)
  shape = (-1,) + (1,) * (resid_w.ndim - 1)
  shifted = resid_w - beta * weight.reshape(shape) * (resid_w - ref_resid_w)
  loss = jnp.mean(_mean_over_sample(shifted**2))
  metrics = {**pair_metrics(inside, m_w, m_l, r_w, r_l), "dspo_weight": jnp.mean(weight)}
  return loss, metrics


def sdpo_loser_scale(
  resid_w: chex.Array,
  resid_l: chex.Array,
  mu: float | chex.Array,
  eps: float = 1e-9,
  max_scale: float = 1.0,
) -> chex.Array:
  """SDPO's winner-preserving scale of the loser's gradient (arXiv 2511.03317).

  Follows `get_adaptive_lose_l_scale` in AIDC-AI/Diffusion-SDPO `train.py`
  (read 2026-12-01). With A = mean over the batch's winner elements of
  e_w^2, B = the same for the losers, and their gradients with respect to
  the noise predictions gA = 2 e_w / n, gB = 2 e_l / n (n = elements of one
  side), the update -gA + lam * gB must keep at least a share mu of the
  winner's descent: (-gA + lam gB) . gA <= -mu |gA|^2, so

    lam = clip((1 - mu) |gA|^2 / (gB . gA + eps), 0, max_scale)  if gB . gA > 0
    lam = max_scale                                             otherwise

  One scalar for the whole (micro-)batch (the authors': per device), a
  constant of the loss (no gradient). `eps` is the authors' and acts on the
  2/n-scaled products, as theirs.

  Args:
    resid_w: [B, ...] policy residual pred - target on the preferred images.
    resid_l: [B, ...] policy residual on the rejected images (same noise, t).
    mu: winner-preserving margin in [0, 1] (authors' launchers: 0.9 for
      Diffusion-DPO on SD1.5, 0.2 / 0.6 for DSPO on SD1.5 / SDXL).
    eps: added to the denominator.
    max_scale: upper clip of the scale.

  Returns:
    float32 scalar lam in [0, max_scale].
  """
  chex.assert_equal_shape([resid_w, resid_l])
  if isinstance(mu, (int, float)) and not 0.0 <= mu <= 1.0:
    raise ValueError(f"sdpo mu must be within [0, 1], got {mu}.")
  e_w = jax.lax.stop_gradient(resid_w).astype(jnp.float32)
  e_l = jax.lax.stop_gradient(resid_l).astype(jnp.float32)
  n = e_w.size
  g_a, g_b = 2.0 * e_w / n, 2.0 * e_l / n
  num = jnp.sum(g_a * g_a)
  den = jnp.sum(g_b * g_a)
  cap = (1.0 - mu) * num / (den + eps)
  lam = jnp.where(den > 0, cap, max_scale)
  return jnp.clip(lam, 0.0, max_scale)


def sdpo_loss(
  policy_mse_w: chex.Array,
  policy_mse_l: chex.Array,
  ref_mse_w: chex.Array,
  ref_mse_l: chex.Array,
  beta: float | chex.Array,
  loser_scale: chex.Array,
) -> tuple[chex.Array, dict[str, chex.Array]]:
  """Diffusion-DPO with SDPO's safeguard: the loser's gradient scaled by `loser_scale`.

  The value is exactly `dpo_loss`'s; only the gradient through the loser's MSE
  (hence through the loser's noise prediction) is multiplied by
  `loser_scale` (`sdpo_loser_scale`), as `l_scaled = sg(l) + lam (l - sg(l))`
  in AIDC-AI/Diffusion-SDPO `train.py`.

  Returns:
    (loss, metrics): `dpo_loss`'s metrics and `sdpo_scale` (= loser_scale).
  """
  scaled_l = scale_gradient(policy_mse_l, loser_scale)
  loss, metrics = dpo_loss(policy_mse_w, scaled_l, ref_mse_w, ref_mse_l, beta)
  return loss, dict(metrics, sdpo_scale=jax.lax.stop_gradient(loser_scale))
