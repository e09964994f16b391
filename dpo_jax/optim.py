"""Optimizer and learning-rate schedule from `config.optim`."""

from __future__ import annotations

import ml_collections
import optax

# apply_if_finite accepts a non-finite update after this many consecutive
# rejections; we never want that (one NaN update destroys the weights), so the
# limit is effectively infinite and the trainer aborts on its own threshold.
_NEVER_ACCEPT_NONFINITE = 2**30


def lr_schedule(optim: ml_collections.ConfigDict, max_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_frac * max_steps` steps, then constant (official DPO)."""
  warmup_steps = int(round(optim.warmup_frac * max_steps))
  if warmup_steps <= 0:
    return optax.constant_schedule(optim.lr)
  return optax.warmup_constant_schedule(0.0, optim.lr, warmup_steps)


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
    base = optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
  elif optim.name == "adafactor":
    # Factored second moments: O(rows + cols) state instead of O(rows * cols),
    # the SDXL choice of the official trainer.
    base = optax.adafactor(schedule, weight_decay_rate=optim.weight_decay or None)
  else:
    raise ValueError(f"Unknown optimizer {optim.name!r}; expected 'adamw' or 'adafactor'.")
  chain = [base]
  if optim.clip_norm and optim.clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(optim.clip_norm))
  tx = optax.apply_if_finite(optax.chain(*chain), _NEVER_ACCEPT_NONFINITE)
  return tx, schedule
