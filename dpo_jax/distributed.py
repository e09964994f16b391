"""Multi-process start-up for the command-line entry points (train, data.cache).

One process per host on TPU pods, one per GPU under SLURM / Open MPI, or
processes started by hand with an explicit coordinator. `--distributed`:
  auto  initialise when the environment says this is one of several
        processes (`multi_process_env`); otherwise run single-process.
  on    always call `jax.distributed.initialize` (TPU pod slices: JAX reads
        the topology from the TPU VM metadata).
  off   never.
`--coordinator_address`, `--num_processes`, `--process_id` override what
JAX would detect (also read from JAX_COORDINATOR_ADDRESS). Processes on the
CPU backend (tests, `JAX_PLATFORMS=cpu`) get gloo collectives.

`barrier` lines the processes up before a freshly compiled program's first run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from absl import flags, logging

MODES = ("auto", "on", "off")


def define_flags() -> None:
  """The `--distributed` flags of an entry point (call once, at its import)."""
  flags.DEFINE_enum(
    "distributed", "auto", MODES, "Multi-process start-up; see dpo_jax.distributed."
  )
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: detected).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (default: detected).")
  flags.DEFINE_integer("process_id", None, "This process's index (default: detected).")


def _count(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env.get(key, "1") or "1")
  except ValueError:
    return 1


def multi_process_env(env: Mapping[str, str]) -> str | None:
  """Why `env` is one process of several (a short reason), or None if it is not.

  Detected: an explicit JAX_COORDINATOR_ADDRESS, SLURM with more than one
  task, Open MPI with more than one rank, a TPU slice listing several workers.
  """
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:
    return f"SLURM job with {env['SLURM_NTASKS']} tasks"
  if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI job with {env['OMPI_COMM_WORLD_SIZE']} ranks"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "TPU slice with several workers"
  return None


def initialize(
  mode: str,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  env: Mapping[str, str] | None = None,
) -> bool:
  """Calls `jax.distributed.initialize` as `mode` says; True if it did.

  Must run before anything touches a JAX backend (device lists, arrays).
  """
  if mode not in MODES:
    raise ValueError(f"distributed={mode!r}; expected one of {MODES}.")
  env = os.environ if env is None else env
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if mode == "off":
    if explicit:
      raise ValueError(
        "--distributed=off contradicts --coordinator_address/num_processes/process_id."
      )
    return False
  reason = "explicit flags" if explicit else multi_process_env(env)
  if mode == "auto" and reason is None:
    return False
  import jax

  if env.get("JAX_PLATFORMS", "") == "cpu":
    # The CPU backend has no cross-process collectives unless told to use gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info(
    "jax.distributed initialised (%s): process %d of %d, %d local / %d global devices.",
    reason or "--distributed=on",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def initialize_from_flags() -> bool:
  """`initialize` with the values of the flags from `define_flags`."""
  f = flags.FLAGS
  return initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process has reached `name`; a no-op with one process.

  Through the coordination service, not a device collective. Compile times
  differ between hosts, and on the CPU backend a gloo collective whose peers
  arrive more than 30 s apart fails whatever the collective timeout flags say
  (jax-ml/jax#40831), so a run calls this between compiling a program and its
  first run. Reusable: the same `name` may be waited on again later.
  """
  import jax

  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp

  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
