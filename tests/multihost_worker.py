"""One process of a 2-process CPU run: `python tests/multihost_worker.py PID PORT WORKDIR N`.

Each process owns 4 CPU devices; gloo provides the cross-process collectives.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
  pid, port, workdir, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from dpo_jax import trainer
  from tests.test_train import make_config

  config = make_config(max_steps=steps, **{"mesh.data": 2, "mesh.fsdp": 4})
  result = trainer.train_and_evaluate(config, workdir)
  assert jax.process_count() == 2 and jax.device_count() == 8
  print("LOSSES", [h["loss"] for h in result["history"]], flush=True)


if __name__ == "__main__":
  main()
