"""The jitted train step compiles once: steps 2 and 3 reuse step 1's program,
and `config.compilation_cache_dir` turns on JAX's persistent cache."""

import functools
import os
import subprocess
import sys

import jax

from dpo_jax import step as step_lib
from tests import test_step

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# The suite runs with a persistent compilation cache (conftest.py): a program
# another test compiled first is loaded from it instead of compiled.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def test_train_step_compiles_only_on_the_first_step():
  # A state whose dtypes, weak types or shapes drift after step 1 (e.g. a
  # Python-int step counter becoming an int32 array) would compile again.
  spec, params, batch = test_step._setup(test_step._one_level_config())
  fn = jax.jit(functools.partial(step_lib.train_step, spec=spec), donate_argnums=0)
  state = step_lib.init_train_state(params, spec.tx)
  ref = jax.tree.map(lambda p: p.copy(), params)
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event == _COMPILE_EVENT else 0
  hit_listener = lambda event, **kw: compiles.append(event) if event == _CACHE_HIT_EVENT else 0
  jax.monitoring.register_event_duration_secs_listener(listener)
  jax.monitoring.register_event_listener(hit_listener)
  try:
    per_step = []
    for i in range(3):
      before = len(compiles)
      state, metrics = fn(state, ref, batch, jax.random.PRNGKey(i))
      jax.block_until_ready(metrics)
      per_step.append(len(compiles) - before)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(hit_listener)
  assert per_step[0] >= 1, per_step  # The listeners do see compiles (or cache loads).
  assert per_step[1:] == [0, 0], f"recompiled after step 1: compiles per step {per_step}"


def test_compilation_cache_dir_config_field(tmp_path):
  # A fresh process: JAX reads the cache directory when it first compiles.
  code = (
    "import jax, jax.numpy as jnp, ml_collections\n"
    "from dpo_jax import trainer\n"
    "trainer.use_compilation_cache(ml_collections.ConfigDict("
    f"{{'compilation_cache_dir': {str(tmp_path / 'cache')!r}}}))\n"
    "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).block_until_ready()\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
  assert os.listdir(tmp_path / "cache"), "nothing was written to compilation_cache_dir"
  from configs import common

  assert common.get_base_config().compilation_cache_dir == ""  # Off by default.
