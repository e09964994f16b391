"""The train state and the pure, module-level train/eval steps.

Batch format (the contract every data source produces; shapes are global, B =
preference pairs):
  latents_w: [B, C, H, W] preferred-image latents (already scaled by the VAE factor)
  latents_l: [B, C, H, W] rejected-image latents
  context:   [B, L, D]    text-encoder hidden states for the prompt
  added_cond (optional, SDXL): {"text_embeds": [B, E], "time_ids": [B, 6]}
  rpo_embeds (objective "rpo" only): [B, D] one frozen-CLIP embedding per pair
             (text, image or both, see `config.rpo.embedding`); any scale,
             the step L2-normalises the rows
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dpo_jax import diagnostics, diffusion, lora, losses
from dpo_jax.models import unet as unet_lib

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
# Sources and formulas: dpo_jax/losses.py (one function per objective) and README "Objectives".
OBJECTIVES = ("dpo", "sft", "rpo", "mapo", "kto", "dspo", "sdpo")
# Objectives with a frozen reference whose logits are exactly 0 while policy == reference
# (`check_reference_match`, and the precision check in `build_step_spec`).
REFERENCE_OBJECTIVES = ("dpo", "rpo", "kto", "dspo", "sdpo")
# What the data side embeds with frozen CLIP for `batch["rpo_embeds"]` (config.rpo.embedding).
RPO_EMBEDDINGS = ("text", "image", "text+image")
# config.precision.reference_forward: "auto" = "matched" unless compute is float32.
REFERENCE_FORWARDS = ("matched", "separate")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (the reference is not here).

  Attributes:
    step: int32 scalar, number of completed optimizer steps (skipped ones too).
    params: float32 master weights of the trained UNet.
    opt_state: optax state; its outer `ApplyIfFiniteState` counts skipped steps.
  """

  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Compile-time description of the objective and model, bound into the jitted step.

  `schedule` holds the (small) noise-schedule arrays; they become constants of
  the compiled step.
  """

  apply_fn: Callable[..., jax.Array]
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  schedule: diffusion.NoiseSchedule
  objective: str
  beta: float
  prediction_type: str
  num_train_timesteps: int
  grad_accum: int = 1
  # Probability of replacing a pair's prompt by the empty prompt (the official
  # trainers' caption dropout, which keeps classifier-free guidance working).
  caption_dropout: float = 0.0
  # Empty-prompt conditioning: {"context": [L, D]} (+ "text_embeds": [E] for SDXL).
  uncond: dict[str, Any] | None = None
  # dtype both UNets' weights are cast to for the forward pass (None: as
  # stored). Casting the fp32 policy exactly as the stored bf16 reference
  # makes both forwards bit-identical at step 0; otherwise layers that compute
  # in their params' dtype (norms) differ by rounding, which beta amplifies.
  compute_param_dtype: Any = None
  # Diffusion-RPO distance temperature (objective "rpo" only).
  rpo_tau: float = 0.5
  # How the policy and reference forwards are computed (`REFERENCE_FORWARDS`):
  # "matched" runs both through one compiled loop body (`matched_mses`), so
  # equal weights give bit-identical MSEs; "separate" traces them separately.
  reference_forward: str = "matched"
  # Stored dtype of the reference params (config.precision.ref_dtype); only
  # named in `check_reference_match`'s error.
  ref_dtype: Any = None
  # Hyperparameters of the objectives after DPO (config.mapo / kto / dspo / sdpo).
  mapo_beta: float = 0.1
  mapo_snr_value: float = 0.5
  kto_beta: float = 1000.0
  kto_lambda_d: float = 1.0
  kto_lambda_u: float = 1.0
  dspo_beta: float = 0.001
  sdpo_mu: float = 0.9
  # LoRA (config.lora): 0 = off, the train state's params are the policy.
  # Otherwise they are adapters and the policy is
  # `lora.merge(ref_params, params, lora_scale)`: the frozen base *is* the
  # reference, so the step holds one copy of the UNet.
  lora_scale: float = 0.0

  def __post_init__(self):
    if self.objective == "rpo":
      if self.grad_accum != 1:
        # RPO couples every pair of the global batch through the [B, B] weight
        # matrix; a micro-batch would only see its own B/grad_accum pairs and
        # silently optimise a different (block-diagonal) objective (what the
        # authors' LM code does per device and micro-batch). An exact version
        # needs two passes: forward-only MSEs of all micro-batches, then the
        # [B] loss gradients w.r.t. the policy MSEs as weights of a per-micro-
        # batch surrogate sum(g * mse) to backpropagate (~25 % more FLOPs).
        raise ValueError(
          f"objective 'rpo' needs grad_accum == 1 (got {self.grad_accum}): its loss couples "
          "all pairs of the global batch, which micro-batches would split."
        )
      if not self.rpo_tau > 0:
        raise ValueError(f"rpo_tau must be > 0, got {self.rpo_tau}.")
    if self.objective == "sdpo" and not 0.0 <= self.sdpo_mu <= 1.0:
      raise ValueError(f"config.sdpo.mu={self.sdpo_mu}; expected a value in [0, 1].")
    if self.reference_forward not in REFERENCE_FORWARDS:
      raise ValueError(
        f"reference_forward={self.reference_forward!r}; expected one of {REFERENCE_FORWARDS}."
      )


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _interleave(x: jax.Array) -> jax.Array:
  """[B, ...] -> [2B, ...] with each row twice: keeps pair i's rows on one device."""
  return jnp.repeat(x, 2, axis=0)


def _pair_inputs(
  spec: StepSpec, batch: Batch, noise: jax.Array, timesteps: jax.Array, with_loser: bool = True
) -> tuple[jax.Array, ...]:
  """UNet inputs and regression target of the pairs: (noisy, t, context, added, target).

  Winner and loser are interleaved (w0, l0, w1, l1, ...) rather than
  concatenated so that one forward pass covers both while every device keeps
  the rows of its own pairs: concatenating along the sharded batch axis would
  move half the batch across devices. Rows: 2B with the loser, B without.
  """
  if with_loser:
    x0 = jnp.stack([batch["latents_w"], batch["latents_l"]], axis=1)
    x0 = x0.reshape((-1,) + x0.shape[2:])
    rep = _interleave
  else:
    x0 = batch["latents_w"]
    rep = lambda x: x
  eps, t = rep(noise), rep(timesteps)
  noisy = diffusion.q_sample(spec.schedule, x0, eps, t)
  target = diffusion.training_target(spec.schedule, spec.prediction_type, x0, eps, t)
  added = batch.get("added_cond")
  added = None if added is None else jax.tree.map(rep, added)
  return noisy, t, rep(batch["context"]), added, target


def _cast_params(spec: StepSpec, params: Any) -> Any:
  """Weights as the forward uses them (`spec.compute_param_dtype`); a differentiable cast."""
  if spec.compute_param_dtype is None:
    return params
  return jax.tree.map(lambda p: p.astype(spec.compute_param_dtype), params)


def policy_params(spec: StepSpec, params: Any, ref_params: Any) -> Any:
  """The policy's full UNet weights: `params` itself, or base (= reference) + LoRA adapters."""
  if not spec.lora_scale:
    return params
  return lora.merge(jax.tree.map(jax.lax.stop_gradient, ref_params), params, spec.lora_scale)


def _row_mses(spec: StepSpec, params: Any, inputs: tuple[jax.Array, ...]) -> jax.Array:
  """[rows] per-sample MSEs of the UNet with (already cast) `params` on `_pair_inputs`."""
  noisy, t, context, added, target = inputs
  return diffusion.per_sample_mse(spec.apply_fn(params, noisy, t, context, added), target)


def _split_pairs(mse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[2B] interleaved rows -> (winner [B], loser [B])."""
  mse = mse.reshape(-1, 2)
  return mse[:, 0], mse[:, 1]


def pair_mses(
  spec: StepSpec,
  params: Any,
  batch: Batch,
  noise: jax.Array,
  timesteps: jax.Array,
  with_loser: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
  """Per-pair UNet MSEs on winner and loser under the *same* noise and timestep.

  One forward pass over the interleaved rows (see `_pair_inputs`).

  Returns:
    (mse_w [B], mse_l [B]) or (mse_w, None) when `with_loser` is False.
  """
  inputs = _pair_inputs(spec, batch, noise, timesteps, with_loser)
  mse = _row_mses(spec, _cast_params(spec, params), inputs)
  if not with_loser:
    return mse, None
  return _split_pairs(mse)


def pair_residuals(
  spec: StepSpec, params: Any, batch: Batch, noise: jax.Array, timesteps: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Per-element residuals `pred - target` (float32) of winner and loser, [B, C, H, W] each.

  For the objectives that need more than the per-sample MSE (DSPO's score
  shift, SDPO's gradient dot products); one forward over the interleaved rows.
  """
  noisy, t, context, added, target = _pair_inputs(spec, batch, noise, timesteps)
  pred = spec.apply_fn(_cast_params(spec, params), noisy, t, context, added)
  resid = pred.astype(jnp.float32) - target.astype(jnp.float32)
  resid = resid.reshape((-1, 2) + resid.shape[1:])
  return resid[:, 0], resid[:, 1]


def matched_mses(
  spec: StepSpec, params: Any, ref_params: Any, batch: Batch, noise: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Policy and reference MSEs from *one* compiled forward: equal weights, equal bits.

  Why: at beta = 5000 the DPO logit is 2500 x ((m_w - m_l) - (r_w - r_l)), so
  the two forwards must round identically. Traced separately they do not in
  bf16: the policy forward sits inside the differentiated function, where XLA
  fuses it differently (it must also emit the backward's residuals) and keeps
  excess f32 precision in other places than in the reference forward, so equal
  weights gave MSE gaps of ~3e-3 and step-0 logits of std ~3. Neither
  `xla_allow_excess_precision=false` nor remat alone fixed it on CPU, and both
  together still left one-ulp gaps.

  How: the loss *values* of both come from the two iterations of one
  `lax.scan` whose body picks the weights (iteration 0: policy, 1: reference),
  so one compiled loop body evaluates both, on any backend and whatever the
  fusion or precision flags. The gradient flows through a separate,
  differentiated policy forward added as `d - stop_gradient(d)` (exactly 0).
  Cost: one extra forward-only policy pass (2 of ~8 forward-equivalents per
  DPO pair, ~+25 % FLOPs; ~+20 % with remat "blocks"), no extra activation
  memory (measured on CPU: same XLA temp size). XLA's cost analysis counts a
  loop body once, so `lowered_flops` under-reports this step by one forward.
  A variant that also took the backward residuals from the loop body (no extra
  FLOPs) kept ~4.5x the temp memory and ran ~7x slower on CPU.

  Args:
    spec: the step spec (apply_fn, schedule, compute dtype).
    params: policy params (differentiated).
    ref_params: reference params (a constant: no gradient reaches them).
    batch, noise, t: as `pair_mses`.

  Returns:
    (policy_w, policy_l, ref_w, ref_l), each [B].
  """
  inputs = _pair_inputs(spec, batch, noise, t)
  pol = _cast_params(spec, params)
  ref = _cast_params(spec, jax.tree.map(jax.lax.stop_gradient, ref_params))
  ref = jax.tree.map(lambda r, p: r.astype(p.dtype), ref, pol)

  # Forward-only values of both from one loop body (iteration 0: policy, 1:
  # reference); the gradient comes from a separate differentiated policy
  # forward, attached without changing the value (x + (d - sg(d)) == x).
  def body(carry, i):
    q = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), jax.lax.stop_gradient(pol), ref)
    return carry, _row_mses(spec, q, inputs)

  _, mses = jax.lax.scan(body, None, jnp.arange(2))
  diff = _row_mses(spec, pol, inputs)
  mses = mses.at[0].set(jax.lax.stop_gradient(mses[0]) + (diff - jax.lax.stop_gradient(diff)))
  pol_w, pol_l = _split_pairs(mses[0])
  ref_w, ref_l = _split_pairs(jax.lax.stop_gradient(mses[1]))
  return pol_w, pol_l, ref_w, ref_l


def rpo_similarity(embeds: jax.Array) -> jax.Array:
  """[B, D] pair embeddings -> [B, B] cosine similarities over the whole (global) batch.

  Inside jit `embeds` is the global array whatever its sharding, so the matrix
  (and the loss) does not depend on the device count; XLA gathers the rows.
  """
  chex.assert_rank(embeds, 2)
  e = embeds.astype(jnp.float32)
  # torch.nn.functional.normalize's guard: a zero row stays zero instead of NaN.
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  # HIGHEST: TPUs would otherwise multiply float32 in bfloat16, so s_ii drifts
  # from 1 by bfloat16 rounding, which 1/tau magnifies in the weights.
  return jnp.matmul(e, e.T, precision=jax.lax.Precision.HIGHEST)


def drop_captions(batch: Batch, uncond: dict[str, Any], prob: float, rng: chex.PRNGKey) -> Batch:
  """Replaces each pair's conditioning by the empty prompt's with probability `prob`.

  Winner and loser of a pair share the prompt, so they are dropped together.
  SDXL's pooled `text_embeds` are replaced along with the context; `time_ids`
  (sizes and crops) describe the image, not the prompt, and are kept.
  """
  b = batch["context"].shape[0]
  drop = jax.random.bernoulli(rng, prob, (b,))
  out = dict(batch)
  ctx = batch["context"]
  out["context"] = jnp.where(drop[:, None, None], uncond["context"][None].astype(ctx.dtype), ctx)
  if "added_cond" in batch and "text_embeds" in uncond:
    te = batch["added_cond"]["text_embeds"]
    new_te = jnp.where(drop[:, None], uncond["text_embeds"][None].astype(te.dtype), te)
    out["added_cond"] = dict(batch["added_cond"], text_embeds=new_te)
  return out


def _policy_and_ref_mses(
  spec: StepSpec, params: Any, ref_params: Any, batch: Batch, noise: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(policy_w, policy_l, ref_w, ref_l) [B] MSEs, all under the same noise and timesteps."""
  if spec.reference_forward == "matched":
    return matched_mses(spec, params, ref_params, batch, noise, t)
  # The reference sees identical inputs; stop_gradient makes it a constant of
  # the loss even if someone passes the policy params as the reference.
  ref_w, ref_l = jax.tree.map(jax.lax.stop_gradient, pair_mses(spec, ref_params, batch, noise, t))
  pol_w, pol_l = pair_mses(spec, params, batch, noise, t)
  return pol_w, pol_l, ref_w, ref_l


def objective_loss(
  spec: StepSpec,
  params: Any,
  ref_params: Any,
  batch: Batch,
  rng: chex.PRNGKey,
  train: bool = True,
) -> tuple[jax.Array, Metrics]:
  """The configured objective on one (micro-)batch.  -> (scalar loss, metrics).

  `train=False` (evaluation) never applies caption dropout: eval batches are
  scored on their own captions.
  """
  if spec.objective == "rpo" and "rpo_embeds" not in batch:
    raise KeyError(
      "objective 'rpo' needs batch['rpo_embeds'] ([B, D] frozen-CLIP pair embeddings); "
      f"the batch has only {sorted(batch)}."
    )
  if train and spec.caption_dropout > 0:
    if spec.uncond is None:
      raise ValueError("caption_dropout > 0 needs the empty-prompt conditioning (spec.uncond).")
    # A key derived from, not split off, `rng`: the noise stream stays the same
    # whether or not dropout is enabled.
    batch = drop_captions(batch, spec.uncond, spec.caption_dropout, jax.random.fold_in(rng, 1))
  b = batch["latents_w"].shape[0]
  noise, t = diffusion.sample_noise_and_timesteps(
    rng, (b,) + batch["latents_w"].shape[1:], spec.num_train_timesteps
  )
  if spec.objective == "sft":
    mse_w, _ = pair_mses(spec, params, batch, noise, t, with_loser=False)
    return losses.sft_loss(mse_w)
  if spec.objective == "dpo":
    mses = _policy_and_ref_mses(spec, params, ref_params, batch, noise, t)
    return with_pair_diagnostics(spec, losses.dpo_loss(*mses, spec.beta), mses, t)
  if spec.objective == "rpo":
    # Caption dropout changes the conditioning, not which prompts the pairs
    # are about, so the similarity uses the original embeddings.
    sim = rpo_similarity(batch["rpo_embeds"])
    mses = _policy_and_ref_mses(spec, params, ref_params, batch, noise, t)
    out = losses.rpo_loss(*mses, sim, spec.beta, spec.rpo_tau)
    return with_pair_diagnostics(spec, out, mses, t)
  if spec.objective == "mapo":
    # Reference-free: one policy forward on winner and loser, no reference forward.
    mse_w, mse_l = pair_mses(spec, params, batch, noise, t)
    return losses.mapo_loss(
      mse_w, mse_l, spec.mapo_beta, spec.mapo_snr_value, spec.num_train_timesteps
    )
  if spec.objective == "kto":
    # The Pick-a-Pic split: every winner is a liked image, every loser a
    # disliked one (2B single labelled images; each pair's two images share
    # noise and timestep, a detail KTO does not need but which does no harm).
    pol_w, pol_l, ref_w, ref_l = _policy_and_ref_mses(spec, params, ref_params, batch, noise, t)
    desirable = jnp.concatenate([jnp.ones_like(pol_w, bool), jnp.zeros_like(pol_l, bool)])
    return losses.kto_loss(
      jnp.concatenate([pol_w, pol_l]),
      jnp.concatenate([ref_w, ref_l]),
      desirable,
      spec.kto_beta,
      spec.kto_lambda_d,
      spec.kto_lambda_u,
    )
  if spec.objective == "dspo":
    # DSPO needs the residuals themselves, so policy and reference are always
    # traced separately (`reference_forward` does not apply).
    pol = pair_residuals(spec, params, batch, noise, t)
    ref = pair_residuals(spec, jax.tree.map(jax.lax.stop_gradient, ref_params), batch, noise, t)
    return losses.dspo_loss(*pol, *jax.lax.stop_gradient(ref), spec.dspo_beta)
  if spec.objective == "sdpo":
    if spec.reference_forward == "separate":
      # The differentiated forward's residuals give both the MSEs and the scale.
      res_w, res_l = pair_residuals(spec, params, batch, noise, t)
      # The same reduction as `diffusion.per_sample_mse` (the reference's MSE).
      sq_mean = lambda r: jnp.mean(jnp.square(r).reshape(r.shape[0], -1), axis=1)
      pol_w, pol_l = sq_mean(res_w), sq_mean(res_l)
      ref_w, ref_l = jax.tree.map(
        jax.lax.stop_gradient, pair_mses(spec, ref_params, batch, noise, t)
      )
    else:
      # Matched MSE values; the scale needs the residuals: one extra
      # forward-only policy pass (~+25 % FLOPs over matched DPO).
      pol_w, pol_l, ref_w, ref_l = _policy_and_ref_mses(spec, params, ref_params, batch, noise, t)
      res_w, res_l = pair_residuals(
        spec, jax.tree.map(jax.lax.stop_gradient, params), batch, noise, t
      )
    scale = losses.sdpo_loser_scale(res_w, res_l, spec.sdpo_mu)
    return losses.sdpo_loss(pol_w, pol_l, ref_w, ref_l, spec.beta, scale)
  raise ValueError(f"Unknown objective {spec.objective!r}; expected one of {OBJECTIVES}.")


def with_pair_diagnostics(
  spec: StepSpec,
  loss_and_metrics: tuple[jax.Array, Metrics],
  mses: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
  t: jax.Array,
) -> tuple[jax.Array, Metrics]:
  """Adds `diagnostics.pair_diagnostics` of (policy_w, policy_l, ref_w, ref_l) [B] MSEs at [B] t.

  For any objective with winner/loser policy and reference MSEs; the step
  `finalize`s them after the micro-batch average.
  """
  loss, metrics = loss_and_metrics
  diag = diagnostics.pair_diagnostics(*mses, t, spec.beta, spec.num_train_timesteps)
  return loss, {**metrics, **jax.lax.stop_gradient(diag)}


def _split_micro(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [n, B/n, ...], micro-batch j = rows {i*n + j}.

  Reshaping to [B/n, n] keeps the sharded leading axis contiguous per device
  (no communication); the swap is a local transpose.
  """
  return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def loss_and_grads(
  spec: StepSpec, params: Any, ref_params: Any, batch: Batch, rng: chex.PRNGKey
) -> tuple[jax.Array, Metrics, Any]:
  """Loss, metrics and gradients, accumulated over `spec.grad_accum` micro-batches."""
  # With LoRA, `params` are the adapters: the gradient flows through the merge.
  grad_fn = jax.value_and_grad(
    lambda p, b, r: objective_loss(spec, policy_params(spec, p, ref_params), ref_params, b, r),
    has_aux=True,
  )
  if spec.grad_accum == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return loss, metrics, grads

  micro = jax.tree.map(lambda x: _split_micro(x, spec.grad_accum), batch)

  def body(carry, xs):
    idx, mb = xs
    (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, idx))
    acc_loss, acc_metrics, acc_grads = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
    # Maxima (`max_*`) combine by max, not as a mean over micro-batches.
    acc_metrics = {
      k: jnp.maximum(carry[1][k], metrics[k]) if k.startswith("max_") else v
      for k, v in acc_metrics.items()
    }
    return (acc_loss, acc_metrics, acc_grads), None

  zeros = jax.tree.map(
    jnp.zeros_like,
    jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)),
  )
  zeros = (zeros[0][0], zeros[0][1], zeros[1])
  (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(spec.grad_accum), micro))
  inv = 1.0 / spec.grad_accum
  metrics = {k: v if k.startswith("max_") else v * inv for k, v in metrics.items()}
  return loss * inv, metrics, jax.tree.map(lambda x: x * inv, grads)


def schedule_count(state: TrainState) -> jax.Array:
  """The count optax evaluates the learning-rate schedule at in this step's update.

  That is the inner optimizer's `ScaleByScheduleState.count`: the number of
  updates applied so far (`apply_if_finite` leaves the inner state untouched on
  a skipped step, so skipped steps do not advance it). Without a schedule
  state (a constant rate), the same number from the step and skip counters.
  """
  counts = [
    s.count
    for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
    )
    if isinstance(s, optax.ScaleByScheduleState)
  ]
  if counts:
    return counts[0]
  return state.step - state.opt_state.total_notfinite


def train_step(
  state: TrainState, ref_params: Any, batch: Batch, rng: chex.PRNGKey, *, spec: StepSpec
) -> tuple[TrainState, Metrics]:
  """One optimizer step.  Pure; jit it with `spec` bound (see `jit_train_step`).

  Args:
    state: current train state (donated by the jitted version).
    ref_params: frozen reference UNet params (never updated, never donated);
      with LoRA also the base the adapters (`state.params`) are merged into.
    batch: global batch (see module docstring).
    rng: base PRNG key; the step folds in `state.step`, so a resumed run draws
      exactly the noise an uninterrupted run would.

  Returns:
    (new_state, metrics) with scalar metrics.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  lr = spec.lr_fn(schedule_count(state))
  loss, metrics, grads = loss_and_grads(spec, state.params, ref_params, batch, step_rng)
  metrics = diagnostics.finalize(metrics)  # After the micro-batch mean (bucket ratios).
  # A non-finite loss with finite gradients must not slip through either.
  grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  skipped = jnp.logical_not(opt_state.last_finite)
  metrics = dict(
    metrics,
    loss=loss,
    grad_norm=grad_norm,
    # The rate optax scaled this step's update by (discarded if `skipped`).
    lr=lr,
    skipped=skipped.astype(jnp.float32),
    total_skipped=opt_state.total_notfinite,
    consecutive_skipped=opt_state.notfinite_count,
  )
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(
  params: Any, ref_params: Any, batch: Batch, rng: chex.PRNGKey, *, spec: StepSpec
) -> Metrics:
  """Objective metrics on a fixed batch with fixed noise (no gradients, no caption dropout)."""
  policy = policy_params(spec, params, ref_params)
  loss, metrics = objective_loss(spec, policy, ref_params, batch, rng, train=False)
  return dict(diagnostics.finalize(metrics), loss=loss)


def jit_train_step(spec: StepSpec, state_shardings, ref_shardings, batch_shardings, replicated):
  """jit with explicit shardings; the state is donated so XLA updates it in place."""
  return jax.jit(
    functools.partial(train_step, spec=spec),
    in_shardings=(state_shardings, ref_shardings, batch_shardings, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def jit_eval_step(spec: StepSpec, param_shardings, ref_shardings, batch_shardings, replicated):
  return jax.jit(
    functools.partial(eval_step, spec=spec),
    in_shardings=(param_shardings, ref_shardings, batch_shardings, replicated),
    out_shardings=replicated,
  )


def _precision_settings(config: ml_collections.ConfigDict) -> tuple[Any, Any, str]:
  """(compute dtype, reference dtype, reference_forward) of `config.precision`, checked."""
  prec = config.precision
  dtypes = []
  for field in ("compute_dtype", "ref_dtype"):
    if prec[field] not in unet_lib.DTYPES:
      raise ValueError(
        f"config.precision.{field}={prec[field]!r}; expected one of {sorted(unet_lib.DTYPES)}."
      )
    dtypes.append(prec[field])
  compute, ref = dtypes
  if config.objective in REFERENCE_OBJECTIVES and ref not in ("float32", compute):
    # The reference would run on weights rounded to `ref` while the policy runs
    # on other ones: at step 0 (policy = reference) the logit is then beta x
    # their MSE gap (spread ~1 at beta 5000 for fp32 compute, bf16 reference).
    raise ValueError(
      f"config.precision.ref_dtype={ref!r} with compute_dtype={compute!r}: the reference would "
      f"run on {ref}-rounded weights and the policy on {compute} ones, so their MSEs differ "
      "even at step 0 and beta turns the gap into noise. Set precision.ref_dtype to "
      f"{compute!r} (or 'float32'), or compute_dtype to {ref!r}."
    )
  mode = prec.get("reference_forward", "auto")
  if mode == "auto":
    mode = "separate" if compute == "float32" else "matched"
  if mode not in REFERENCE_FORWARDS:
    raise ValueError(
      f"config.precision.reference_forward={mode!r}; expected 'auto' or one of "
      f"{REFERENCE_FORWARDS}."
    )
  return unet_lib.DTYPES[compute], unet_lib.DTYPES[ref], mode


def build_step_spec(
  config: ml_collections.ConfigDict,
  apply_fn,
  tx,
  lr_fn,
  uncond: dict[str, Any] | None = None,
  scheduler_config: dict[str, Any] | None = None,
) -> StepSpec:
  """The step's static description; `scheduler_config` defaults to `config.scheduler`.

  Raises:
    ValueError: for an unknown objective or RPO embedding, a batch that does
      not split into `grad_accum` micro-batches, or precision settings under
      which policy and reference cannot agree at step 0 (a reference stored in
      a lower precision than the policy computes in).
  """
  sched = dict(scheduler_config or config.scheduler.to_dict())
  if config.objective not in OBJECTIVES:
    raise ValueError(f"config.objective={config.objective!r}; expected one of {OBJECTIVES}.")
  if config.objective == "rpo" and config.rpo.embedding not in RPO_EMBEDDINGS:
    raise ValueError(
      f"config.rpo.embedding={config.rpo.embedding!r}; expected one of {RPO_EMBEDDINGS}."
    )
  if config.data.global_batch_size % config.optim.grad_accum:
    raise ValueError(
      f"global_batch_size={config.data.global_batch_size} is not divisible by "
      f"grad_accum={config.optim.grad_accum}."
    )
  compute, ref, reference_forward = _precision_settings(config)
  return StepSpec(
    apply_fn=apply_fn,
    tx=tx,
    lr_fn=lr_fn,
    schedule=diffusion.make_noise_schedule(sched),
    objective=config.objective,
    beta=float(config.beta),
    prediction_type=sched.get("prediction_type", "epsilon"),
    num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
    grad_accum=config.optim.grad_accum,
    caption_dropout=float(config.data.caption_dropout),
    uncond=uncond,
    rpo_tau=float(config.rpo.tau),
    compute_param_dtype=None if compute == jnp.float32 else compute,
    reference_forward=reference_forward,
    ref_dtype=ref,
    mapo_beta=float(config.mapo.beta),
    mapo_snr_value=float(config.mapo.snr_value),
    kto_beta=float(config.kto.beta),
    kto_lambda_d=float(config.kto.lambda_d),
    kto_lambda_u=float(config.kto.lambda_u),
    dspo_beta=float(config.dspo.beta),
    sdpo_mu=float(config.sdpo.mu),
    lora_scale=lora.scale(config),
  )


# Largest |logit| `check_reference_match` accepts at step 0. Matched forwards
# give exactly 0; float32 forwards traced separately differ by ~1e-7 relative
# (logits ~1e-4 at beta 5000); the failures it catches are O(1) (bf16 forwards
# traced separately: std ~3; fp32 policy vs bf16 reference: ~1).
REFERENCE_MATCH_TOL = 1e-2


class ReferenceMismatchError(RuntimeError):
  """Policy and reference forwards disagree although their weights are equal."""


def check_reference_match(
  metrics: dict[str, Any], spec: StepSpec, tol: float = REFERENCE_MATCH_TOL
) -> None:
  """Stops a run whose DPO/RPO logits are not ~0 on the first step of a fresh run.

  On that step the policy *is* the reference, so every logit
  -0.5 beta ((m_w - m_l) - (r_w - r_l)) must be 0; anything else is rounding
  noise of two forwards that compute the same function differently, which
  beta turns into the training signal for the whole run.

  Args:
    metrics: the step's metrics (arrays or host floats) with `max_abs_logit`;
      without it (objective "sft") nothing is checked.
    spec: the step spec the metrics came from (beta and precision settings for
      the message).
    tol: largest |logit| accepted.

  Raises:
    ReferenceMismatchError: naming the cause, the precision settings and the fix.
  """
  if spec.objective not in REFERENCE_OBJECTIVES or "max_abs_logit" not in metrics:
    return
  value = float(metrics["max_abs_logit"])
  if not value > tol:  # NaN: a non-finite step, reported by the skip logic instead.
    return
  name = lambda d: "float32" if d is None else jnp.dtype(d).name
  # The factor between an MSE gap and the logit: 0.5 beta (DPO family), beta (KTO).
  beta = {"kto": spec.kto_beta, "dspo": spec.dspo_beta}.get(spec.objective, spec.beta)
  factor = beta if spec.objective == "kto" else 0.5 * beta
  raise ReferenceMismatchError(
    f"First step of a fresh run (policy = reference): max |logit| = {value:.3g} > {tol:g} at "
    f"beta={beta:g}, so the policy and reference forwards give different MSEs for equal "
    f"weights (gap up to {value / factor:.2g}) and beta would train on that rounding "
    f"noise. Precision: compute_dtype={name(spec.compute_param_dtype)}, "
    f"ref_dtype={name(spec.ref_dtype)}, reference_forward={spec.reference_forward!r}. Fix: "
    "precision.reference_forward='matched' (the default for bf16 compute), with "
    "precision.ref_dtype equal to compute_dtype or float32."
  )


def _cost_flops(cost: Any) -> float:
  """The "flops" entry of an XLA cost analysis (a dict, or a one-element list of one)."""
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  if not cost:
    return float("nan")
  return float(cost.get("flops", float("nan")))


def lowered_flops(lowered) -> float:
  """FLOPs of one call of a lowered (not yet compiled) function: the ones MFU should use.

  XLA's cost analysis of the unoptimised HLO, computed on the host in seconds
  without compiling. It counts every convolution and dot, where the cost
  analysis of a GPU-compiled program misses the work it hands to cuDNN and
  cuBLAS custom calls (~3 of ~50 TFLOP for a full-size SD1.5 DPO step).

  Args:
    lowered: a `jax.stages.Lowered` (`jax.jit(f).lower(...)`).

  Returns:
    FLOPs of the whole program, summed over devices (the HLO is not yet
    partitioned: divide by the device count for one device's share); with
    remat they include the recomputed forward. NaN where XLA gives none.
  """
  try:
    return _cost_flops(lowered.cost_analysis())
  except Exception:  # noqa: BLE001 - cost analysis is best-effort on some backends.
    return float("nan")


def compiled_flops(compiled) -> float:
  """FLOPs of one call of an ahead-of-time compiled function, from XLA's cost analysis.

  Prefer `lowered_flops`: on GPU this misses the cuDNN/cuBLAS custom calls.

  Args:
    compiled: a `jax.stages.Compiled` (`jax.jit(f).lower(...).compile()`).

  Returns:
    The per-device FLOPs XLA reports (for an SPMD program, one device's share),
    or NaN where the backend gives no cost analysis.
  """
  try:
    return _cost_flops(compiled.cost_analysis())
  except Exception:  # noqa: BLE001 - cost analysis is best-effort on some backends.
    return float("nan")
