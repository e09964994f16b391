"""Model-free image scores by name, registered by the modules that define them.

A model-free score is a numpy function `fn(images [N, H, W, 3], prompts) -> [N]`
that needs no weights (the style metrics of `data.style`, the toy world's
reward and judge). The module that defines one registers it here at import;
`scorers.make_scorer` then serves it by name, so `scorers` imports no toy or
data module and the data modules import no scorer. The entry points that take
scorer names (`evaluate`, `sample_eval`, `data.relabel`) import the defining
modules through `builtin_scores.register()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

ScoreFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ModelFreeScore:
  """`fn(images, prompts) -> [N]`; `uses_prompt` False: prompts are ignored."""

  name: str
  fn: ScoreFn
  uses_prompt: bool


_REGISTRY: dict[str, ModelFreeScore] = {}


def register(name: str, fn: ScoreFn, uses_prompt: bool) -> None:
  """Registers `name` (idempotent for the same function; another one under a taken name fails)."""
  old = _REGISTRY.get(name)
  if old is not None and old.fn is not fn:
    raise ValueError(f"A model-free score named {name!r} is already registered.")
  _REGISTRY[name] = ModelFreeScore(name, fn, uses_prompt)


def get(name: str) -> ModelFreeScore | None:
  return _REGISTRY.get(name)


def names() -> list[str]:
  return sorted(_REGISTRY)
