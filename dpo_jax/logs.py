"""Logging and flag parsing shared by the command-line entry points."""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter from orbax (dozens of lines per save); keeps warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_libraries() -> None:
  """Filters orbax INFO lines, and diffusers' warnings where something imported it.

  Run time does not need diffusers; it is not imported here (seconds, and torch
  with it) unless it already was, e.g. by the PyTorch parity tool.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):  # Once per process.
    handler.addFilter(_QuietLibraries())
  if "diffusers" in sys.modules:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def parse_own_flags(fv: Any, argv: Sequence[str], doc: str, required: Sequence[str]) -> Any:
  """Parses `argv` into the absl FlagValues `fv` (not the process-wide FLAGS).

  `--help` prints `doc` and the flags and exits; each name in `required` must
  be set, else a ValueError naming it.
  """
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(doc + "\nFlags:\n" + fv.get_help())
    sys.exit(0)
  fv(list(argv))
  for name in required:
    if not fv[name].value:
      raise ValueError(f"--{name} is required.")
  return fv
