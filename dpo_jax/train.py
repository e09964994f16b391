"""Entry point: `python -m dpo_jax.train --config=configs/tiny.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.max_steps=20 --config.beta=5000
--config.mesh.fsdp=4`. Rerunning the same command resumes from the newest
checkpoint in `--workdir`.
"""

from __future__ import annotations

import logging as std_logging
import os

# Entry-point-only environment defaults: TensorFlow (imported by clu for
# TensorBoard) otherwise prints C++ info lines on import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py")

_CONFIG = config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Training config file (a get_config() module).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/tiny", "Where checkpoints, TensorBoard events and metrics.jsonl go."
)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter from orbax (dozens of lines per save); keeps warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from diffusers.utils import logging as diffusers_logging

  # diffusers 0.39 warns "Flax classes are deprecated" on every module init;
  # the Flax classes are exactly what this project pins the version for.
  diffusers_logging.set_verbosity_error()
  import jax  # Imported late so that XLA flags set in the environment take effect.

  from dpo_jax import trainer

  logging.info("JAX %s, %d devices: %s", jax.__version__, jax.device_count(), jax.devices()[:4])
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result["train"]:
    logging.info(
      "Done. Final train loss %.5f, implicit_acc %s; eval %s.",
      result["train"]["loss"],
      result["train"].get("implicit_acc"),
      result["eval"],
    )


if __name__ == "__main__":
  app.run(main)
