"""This package's model-free scores: importing their modules registers them.

Called by the entry points that take scorer names (`evaluate`, `sample_eval`,
`data.relabel`), so that neither `scorers` nor `score_registry` imports a toy
or data module.
"""


def register() -> None:
  """Registers style_* (`data.style`) and toy_* (`toy.reward`, `toy.judge`) in `score_registry`."""
  from dpo_jax.data import style  # noqa: F401 - registers at import.
  from dpo_jax.toy import judge, reward  # noqa: F401 - register at import.
