"""Preference data sources. Every source yields per-process numpy batches in the
format documented in `dpo_jax.step` and can save/restore its position."""
