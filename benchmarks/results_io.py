"""Shared by the benchmark scripts: environment facts and the JSON results file."""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def environment() -> dict[str, Any]:
  """Where a number was measured (backend, devices, machine, load)."""
  import jax

  return {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "machine": platform.machine(),
    "cpu_count": os.cpu_count(),
    "load_average_1m": os.getloadavg()[0],
  }


def write_results(out: dict[str, Any], path: str) -> None:
  """Writes `out` (plus the environment) as indented JSON and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({**environment(), **out}, f, indent=2)
  print(f"wrote {path}")
