"""Imported at start-up by a test subprocess that puts this folder on PYTHONPATH:
its first ahead-of-time compile (`jax.stages.Lowered.compile`) returns
DPO_JAX_TEST_SLOW_COMPILE_S seconds late, as on a host that compiles slower
than its peers."""

import os
import time

import jax.stages

_compile = jax.stages.Lowered.compile
_delayed = []


def _slow_compile(self, *args, **kwargs):
  out = _compile(self, *args, **kwargs)
  if not _delayed:
    _delayed.append(True)
    time.sleep(float(os.environ["DPO_JAX_TEST_SLOW_COMPILE_S"]))
  return out


jax.stages.Lowered.compile = _slow_compile
