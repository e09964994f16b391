"""orbax checkpoints of the train state, the data-iterator position and the config.

Layout: `workdir/checkpoints/<step>/{state,data,meta}`; `state` is the sharded
TrainState plus the base RNG key, `data` is the input iterator's JSON state,
`meta` the config and a few facts about the run. The frozen reference and the
pretrained components are never written here: they are reloaded from
`config.pretrained_path` (or rebuilt from the seed) on resume.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEMS = ("state", "data", "meta")


def make_manager(
  directory: str | epath.Path, keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
  """A CheckpointManager that keeps the `keep` newest steps."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    enable_async_checkpointing=async_save,
    # Leftover `*.orbax-checkpoint-tmp-*` dirs from a killed save are removed
    # on start; they were never committed, so nothing valid is lost.
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=ITEMS)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_state: dict[str, Any],
  meta: dict[str, Any],
  force: bool = False,
) -> bool:
  """Starts an (async) save; returns whether a save was started."""
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    ),
    force=force,
  )


def _quarantine(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves a broken step aside (never deletes it) so a new save can reuse the number."""
  src = epath.Path(manager.directory) / str(step)
  if jax.process_index() == 0 and src.exists():
    dst = src.parent / f"corrupt-{step}-{int(time.time())}"
    src.rename(dst)
    logging.warning("Moved unreadable checkpoint %s to %s.", src, dst)
  ocp.multihost.sync_global_processes(f"dpo_jax_quarantine_{step}")
  manager.reload()


def restore_latest_valid(
  manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest step that reads back completely.

  A step that fails to restore (e.g. a file truncated by a crash during an
  upload, or a half-copied directory) is logged, moved aside and the previous
  step is tried, so an interrupted run always resumes from the newest intact
  state.

  Args:
    manager: the workdir's manager.
    abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; arrays are
      restored directly into those shardings.

  Returns:
    (step, state, data_state), or None when there is no readable checkpoint.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable".
      logging.warning(
        "Checkpoint step %d in %s is unreadable (%s: %s); falling back to an older step.",
        step,
        manager.directory,
        type(e).__name__,
        str(e)[:500],
      )
      _quarantine(manager, step)
      continue
    return step, restored.state, dict(restored.data)
  return None


def resolve_step_dir(path: str) -> str:
  """A step folder (`.../checkpoints/<step>`) from a workdir, its `checkpoints/` or a step dir.

  A workdir or `checkpoints/` folder resolves to its newest numbered step.
  Local paths and cloud paths (`gs://...`, via etils.epath) both work.

  Raises:
    FileNotFoundError: naming the path and what was expected there.
  """
  p = epath.Path(path if "://" in path else os.path.abspath(path))
  if (p / "state").is_dir():
    return os.fspath(p)
  root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
  steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit()) if root.is_dir() else []
  if not steps:
    raise FileNotFoundError(
      f"No checkpoint at {p}: expected a training workdir (with checkpoints/<step>/), "
      "a checkpoints/ folder, or a step folder containing state/ and meta/."
    )
  return os.fspath(root / str(steps[-1]))


def load_params_for_inference(path: str) -> tuple[Any, dict[str, Any]]:
  """(UNet params on one device, run meta incl. the config) from a checkpoint.

  The `state` item is restored onto the first local device whatever mesh saved
  it, and only its parameters are returned (the optimizer state is dropped).
  """
  step_dir = epath.Path(resolve_step_dir(path))
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree = ckptr.metadata(step_dir / "state").item_metadata
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  restored = ckptr.restore(step_dir / "state", abstract)
  return restored["train_state"]["params"], meta
