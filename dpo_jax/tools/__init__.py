"""Command-line tools (`python -m dpo_jax.tools.<name>`)."""
