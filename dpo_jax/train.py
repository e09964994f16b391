"""Entry point: `python -m dpo_jax.train --config=configs/sd15.py --workdir=DIR`.

With no flags it runs the toy world (`configs/toy.py`): builds or reuses a
pretrained toy base and its preference pairs, fine-tunes with DPO and prints
the reward before / after. `configs/tiny.py` is the smallest smoke run.

Any config field can be overridden, e.g. `--config.max_steps=20 --config.beta=5000
--config.mesh.fsdp=4`. Rerunning the same command resumes from the newest
checkpoint in `--workdir`.

A misspelt field, a missing config file or a missing / wrong input (pipeline
folder, its weights variant, parquet folder, latent cache) stops the run with
one line, `error: ...` and exit status 2, before the workdir is created
(`dpo_jax.preflight`).

Several processes (TPU pod hosts, SLURM / MPI tasks) run the same command;
`--distributed=auto|on|off` and `--coordinator_address/--num_processes/
--process_id` control `jax.distributed.initialize` (`dpo_jax.distributed`).
"""

from __future__ import annotations

import os
import sys

# Entry-point-only environment defaults: TensorFlow (imported by clu for
# TensorBoard) otherwise prints C++ info lines on import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dpo_jax import distributed, logs, preflight  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "toy.py")


def _define_flags() -> None:
  # Defined only when run as a program: DEFINE_config_file loads the config and
  # applies argv's overrides right away, so preflight.check_config_args runs first.
  config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config file (a get_config() module).", lock_config=True
  )
  flags.DEFINE_string(
    "workdir", "runs/default", "Where checkpoints, TensorBoard events and metrics.jsonl go."
  )
  distributed.define_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  toy = "toy" in config
  # First, before anything is imported, loaded or created (the workdir, its
  # config.json and metric files): the inputs the config names. A toy config
  # gets its pipeline and pairs from toy_run.materialize, so only paths given
  # on the command line are checked here, the rest once they are built.
  preflight.preflight(config, check_missing=not toy)
  logs.quiet_libraries()
  distributed.initialize_from_flags()  # Before anything touches a device.
  import jax  # Imported late so that XLA flags set in the environment take effect.

  from dpo_jax import trainer

  logging.info("JAX %s, %d devices: %s", jax.__version__, jax.device_count(), jax.devices()[:4])
  if toy:
    from dpo_jax.toy import run as toy_run

    config = toy_run.materialize(config)
    preflight.preflight(config)
  result = trainer.train_and_evaluate(config, flags.FLAGS.workdir)
  if result["train"]:
    logging.info(
      "Done. Final train loss %.5f, implicit_acc %s; eval %s.",
      result["train"]["loss"],
      result["train"].get("implicit_acc"),
      result["eval"],
    )
  if result.get("preempted"):
    logging.info("Preempted after saving; rerun the same command to resume.")
    return
  if toy and jax.process_index() == 0:
    toy_run.before_after(config, result["state"].params)


if __name__ == "__main__":
  preflight.check_config_args(sys.argv, default=_DEFAULT_CONFIG)
  _define_flags()
  preflight.run(main)
