"""orbax checkpoints of the train state, the data-iterator position and the config.

Layout: `workdir/checkpoints/<step>/{state,data,meta}`; `state` is the sharded
TrainState plus the base RNG key, `data` is the input iterator's JSON state,
`meta` the config and a few facts about the run. The frozen reference and the
pretrained components are never written here: they are reloaded from
`config.pretrained_path` (or rebuilt from the seed) on resume.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEMS = ("state", "data", "meta")


class CheckpointMismatchError(ValueError):
  """The checkpoint's state tree differs from the one the config builds."""


class CheckpointSaveError(RuntimeError):
  """An (async) save did not commit its step."""


class CheckpointManager(ocp.CheckpointManager):
  """orbax's manager, but a failed async save raises instead of leaving a gap.

  orbax raises a background save's error only from some paths; others
  (`_finalize_checkpoint`) log it and skip the step, so a run could end with
  a step silently missing. Here every `wait_until_finished` (which orbax's
  `save` calls before it starts the next save, and `close` at exit) also
  checks that the last started step was committed: a failed save raises
  `CheckpointSaveError`, naming the step, within one save interval. The
  trainer's `manager.wait_until_finished(); manager.close()` at exit checks
  the last save.
  """

  # The newest started save whose commit is not yet checked.
  _unverified_step: int | None = None

  def save(self, step: int, *args, **kwargs) -> bool:
    started = super().save(step, *args, **kwargs)
    if started:
      self._unverified_step = step
    return started

  def wait_until_finished(self) -> None:
    step, self._unverified_step = self._unverified_step, None
    try:
      super().wait_until_finished()
      self.check_for_errors()
    except Exception as e:
      if step is None:
        raise
      raise CheckpointSaveError(
        f"Saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
        f"{_short(e)}); check the storage (space, permissions) and rerun to resume from "
        "the last saved step."
      ) from e
    if step is not None and step not in self.all_steps(read=True):
      raise CheckpointSaveError(
        f"Saving checkpoint step {step} to {self.directory} did not commit (see the orbax "
        "error logged above); check the storage (space, permissions) and rerun to resume "
        "from the last saved step."
      )


def make_manager(
  directory: str | epath.Path, keep: int, async_save: bool = True
) -> CheckpointManager:
  """A CheckpointManager that keeps the `keep` newest steps; failed saves raise."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    enable_async_checkpointing=async_save,
    # Leftover `*.orbax-checkpoint-tmp-*` dirs from a killed save are removed
    # on start; they were never committed, so nothing valid is lost.
    cleanup_tmp_directories=True,
  )
  return CheckpointManager(epath.Path(directory), options=options, item_names=ITEMS)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_state: dict[str, Any],
  meta: dict[str, Any],
  force: bool = False,
) -> bool:
  """Starts an (async) save; returns whether a save was started.

  Raises:
    CheckpointSaveError: the previous save failed (checked before this one starts).
  """
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    ),
    force=force,
  )


def _short(e: BaseException, limit: int = 200) -> str:
  """The first line of an error, cut: TensorStore messages carry kilobytes of spec."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
  return text if len(text) <= limit else text[:limit] + "..."


# TensorStore raises ValueError("<absl status code>: ..."). These codes mean the
# storage may answer if asked again; every other read failure of a checkpoint
# whose tree matches means its files are damaged (NOT_FOUND, OUT_OF_RANGE for a
# truncated chunk, DATA_LOSS, a bad JSON file, ...).
_TRANSIENT_STATUS = frozenset(
  {
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
    "CANCELLED",
    "INTERNAL",
    "UNKNOWN",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
  }
)
_MISSING_FILE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _is_transient(e: BaseException) -> bool:
  """Whether a read error may go away on retry (I/O trouble, not damaged files)."""
  if isinstance(e, _MISSING_FILE):
    return False
  if isinstance(e, OSError):  # Timeouts, connection resets, EIO, permissions.
    return True
  code = str(e).split(":", 1)[0].strip()
  return code in _TRANSIENT_STATUS


def _with_retries(fn, what: str, retries: int, backoff_s: float):
  """fn() retried on transient errors with exponential backoff; other errors pass through."""
  for attempt in range(retries + 1):
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - classified below.
      if not _is_transient(e):
        raise
      if attempt == retries:
        raise OSError(
          f"{what}: storage error persisted after {retries + 1} attempts "
          f"({type(e).__name__}: {_short(e)}); the checkpoint was left in place, rerun when "
          "the storage is reachable."
        ) from e
      delay = backoff_s * 2**attempt
      logging.warning(
        "%s: transient storage error (%s: %s); retrying in %.1f s.",
        what,
        type(e).__name__,
        _short(e),
        delay,
      )
      time.sleep(delay)
  raise AssertionError("unreachable")


def _read_tree_metadata(item_dir: epath.Path) -> Any:
  # The handler, not a Checkpointer: a Checkpointer expects its own
  # _CHECKPOINT_METADATA inside the item folder and warns that it is missing
  # (the manager writes it one level up, in the step folder).
  return ocp.StandardCheckpointHandler().metadata(item_dir).tree


def _leaf_path(path: tuple[Any, ...]) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _array_leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{"a/b/0/c": (shape, dtype)} for every array-like leaf (empty nodes have none)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      out[_leaf_path(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def _tree_differences(stored: Any, abstract: Any) -> list[str]:
  """Lines naming the leaves that differ between checkpoint metadata and the target."""
  # The target as orbax writes it (NamedTuples / dataclasses to dicts and lists),
  # so its key paths are comparable with the stored ones.
  want = _array_leaves(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))
  have = _array_leaves(stored)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  changed = [
    f"{k}: checkpoint {have[k][0]} {have[k][1]}, config {want[k][0]} {want[k][1]}"
    for k in sorted(set(want) & set(have))
    if have[k] != want[k]
  ]
  lines = []
  for title, keys in (
    ("expected by the config but not in the checkpoint", missing),
    ("in the checkpoint but not expected by the config", unexpected),
    ("shape/dtype differs", changed),
  ):
    if keys:
      shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
      lines.append(f"{title}: {shown}")
  return lines


def _stored_optim(step_dir: epath.Path) -> str:
  """The `config.optim` the checkpoint was written with, for the error message."""
  try:
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    cfg = meta["config"]
    lora = f" and config.lora = {json.dumps(cfg['lora'])}" if "lora" in cfg else ""
    return f" It was written with config.optim = {json.dumps(cfg['optim'])}{lora}."
  except Exception:  # noqa: BLE001 - only decorates the message.
    return ""


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves a broken step aside (never deletes it) so a new save can reuse the number."""
  src = epath.Path(manager.directory) / str(step)
  dst = src.parent / f"corrupt-{step}-{int(time.time())}"
  if jax.process_index() == 0 and src.exists():
    src.rename(dst)
  ocp.multihost.sync_global_processes(f"dpo_jax_quarantine_{step}")
  manager.reload()
  return dst


def restore_latest_valid(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  *,
  retries: int = 3,
  backoff_s: float = 2.0,
) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest step that reads back completely.

  Failures are told apart, newest step first:
  * the step's files cannot be read (a file truncated by a crash during an
    upload, a half-copied directory): the step is logged, moved aside to
    `corrupt-<step>-<time>` and the previous step is tried;
  * the stored tree differs from `abstract_state` (another optimizer, a
    changed `clip_norm`, another model): `CheckpointMismatchError` naming the
    differing keys; nothing is moved. This is read from the checkpoint's tree
    metadata before any array is read;
  * transient storage errors are retried `retries` times with exponential
    backoff, then raised; nothing is moved.

  Args:
    manager: the workdir's manager.
    abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; arrays are
      restored directly into those shardings.
    retries: retries of a transient read error.
    backoff_s: first retry delay; doubles with every retry.

  Returns:
    (step, state, data_state), or None when the workdir has no checkpoint.

  Raises:
    CheckpointMismatchError: the checkpoint was written by another config.
    OSError: storage errors persisted.
    RuntimeError: checkpoints exist but every one was unreadable (all moved
      aside): a workdir with checkpoints never silently restarts from step 0.
  """
  directory = epath.Path(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  moved = []
  for step in steps:
    step_dir = directory / str(step)
    what = f"Checkpoint step {step} in {directory}"
    try:
      stored = _with_retries(
        functools.partial(_read_tree_metadata, step_dir / "state"),
        what,
        retries,
        backoff_s,
      )
      diff = _tree_differences(stored, abstract_state)
      if diff:
        raise CheckpointMismatchError(
          f"{what} holds another state tree than this config builds (optimizer, clip_norm, "
          "config.lora or model changed): "
          + "; ".join(diff)
          + "."
          + _stored_optim(step_dir)
          + " Resume with the config that wrote it (see checkpoints/<step>/meta/metadata), or "
          "start the changed config in a new --workdir."
        )
      restored = _with_retries(
        functools.partial(
          manager.restore,
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
          ),
        ),
        what,
        retries,
        backoff_s,
      )
    except (CheckpointMismatchError, OSError) as e:
      if isinstance(e, _MISSING_FILE):
        moved.append(_report_unreadable(manager, step, what, e))
        continue
      raise
    except Exception as e:  # noqa: BLE001 - the tree matched, so its files are damaged.
      moved.append(_report_unreadable(manager, step, what, e))
      continue
    return step, restored.state, dict(restored.data)
  if moved:
    raise RuntimeError(
      f"Every checkpoint in {directory} was unreadable and was moved aside "
      f"({', '.join(p.name for p in moved)}). Rerun to start from step 0, or put back "
      "readable copies."
    )
  leftovers = sorted(p.name for p in directory.glob("corrupt-*")) if directory.exists() else []
  if leftovers:
    logging.warning(
      "No readable checkpoint in %s (%d moved aside earlier: %s): starting from step 0.",
      directory,
      len(leftovers),
      ", ".join(leftovers[:3]),
    )
  return None


def _report_unreadable(
  manager: ocp.CheckpointManager, step: int, what: str, e: BaseException
) -> epath.Path:
  dst = _quarantine(manager, step)
  logging.warning(
    "%s is unreadable (%s: %s); moved it to %s and falling back to an older step.",
    what,
    type(e).__name__,
    _short(e),
    dst.name,
  )
  return dst


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
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree = _read_tree_metadata(step_dir / "state")
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  # The item's handler directly: see _read_tree_metadata.
  restored = ocp.StandardCheckpointHandler().restore(
    step_dir / "state", args=ocp.args.StandardRestore(abstract)
  )
  return restored["train_state"]["params"], meta
