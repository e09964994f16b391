"""Tiny CPU default: a small SD-shaped UNet on synthetic latents.

Usage:
  python -m dpo_jax.train --config=configs/tiny.py --workdir=/tmp/dpo \
      --config.max_steps=20 --config.beta=5000
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Tiny config; `arg="sft"` selects the SFT baseline."""
  c = common.get_base_config()
  c.max_steps = 40
  c.checkpoint_every = 20
  c.beta = 500.0
  c.optim.lr = 2e-4
  if arg == "sft":
    c.objective = "sft"
  elif arg:
    raise ValueError(f"Unknown tiny variant {arg!r}; expected '' or 'sft'.")
  c.lock()
  return c
