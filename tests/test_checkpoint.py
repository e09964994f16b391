"""checkpoint: restore tells damaged files from a changed config and from flaky storage;
failed async saves raise; inference loading is quiet."""

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpo_jax import checkpoint, optim


def _optim(name, clip_norm=1.0):
  c = ml_collections.ConfigDict()
  c.name, c.lr, c.warmup_frac, c.weight_decay, c.clip_norm = name, 1e-3, 0.0, 1e-2, clip_norm
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  return c


def _state(name="adamw", clip_norm=1.0, scale=1.0):
  params = {
    "conv": {"kernel": jnp.full((3, 3, 4, 8), scale), "bias": jnp.zeros(8)},
    "dense": {"kernel": jnp.arange(32.0).reshape(8, 4) * scale},
  }
  tx, _ = optim.make_optimizer(_optim(name, clip_norm), max_steps=10)
  return {
    "train_state": {"step": jnp.asarray(0), "params": params, "opt_state": tx.init(params)},
    "rng": jnp.zeros(2, jnp.uint32),
  }


def _abstract(state):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)


def _write(directory, steps=(2, 4), async_save=True, **kw):
  m = checkpoint.make_manager(directory, keep=5, async_save=async_save)
  for s in steps:
    checkpoint.save(m, s, _state(scale=float(s), **kw), {"pos": s}, {"config": {}})
  m.close()


def _truncate(step_dir):
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if "/d" in root and os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        n += 1
  assert n > 0


def _listing(directory):
  return sorted(os.listdir(directory))


def test_changed_optimizer_raises_naming_keys_and_moves_nothing(tmp_path):
  d = str(tmp_path / "ckpt")
  _write(d)
  m = checkpoint.make_manager(d, keep=5)
  with pytest.raises(checkpoint.CheckpointMismatchError) as err:
    checkpoint.restore_latest_valid(m, _abstract(_state("adafactor")))
  msg = str(err.value)
  # The Adam moments the checkpoint has and the Adafactor statistics it lacks.
  assert "not in the checkpoint: train_state/opt_state/" in msg and "v_col" in msg
  assert "in the checkpoint but not expected by the config: train_state/opt_state/" in msg
  assert "mu/conv/kernel" in msg
  assert '"name": "adamw"' not in msg  # meta here has no optim; never invented.
  assert "new --workdir" in msg
  assert _listing(d) == ["2", "4"]


def test_changed_clip_norm_is_a_mismatch_not_corruption(tmp_path):
  d = str(tmp_path / "ckpt")
  _write(d)
  m = checkpoint.make_manager(d, keep=5)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="opt_state"):
    checkpoint.restore_latest_valid(m, _abstract(_state(clip_norm=0.0)))
  assert _listing(d) == ["2", "4"]


def test_shape_change_is_named(tmp_path):
  d = str(tmp_path / "ckpt")
  _write(d)
  target = _abstract(_state())
  target["rng"] = jax.ShapeDtypeStruct((4,), jnp.uint32, sharding=target["rng"].sharding)
  m = checkpoint.make_manager(d, keep=5)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"rng: checkpoint \(2,\) uint32"):
    checkpoint.restore_latest_valid(m, target)
  assert _listing(d) == ["2", "4"]


def test_truncated_latest_is_moved_aside_and_previous_restored(tmp_path, caplog):
  d = str(tmp_path / "ckpt")
  _write(d)
  _truncate(os.path.join(d, "4"))
  m = checkpoint.make_manager(d, keep=5)
  with caplog.at_level(logging.WARNING):
    step, state, data = checkpoint.restore_latest_valid(m, _abstract(_state()))
  assert step == 2 and data == {"pos": 2}
  np.testing.assert_array_equal(state["train_state"]["params"]["conv"]["kernel"], 2.0)
  listing = _listing(d)
  assert listing[0] == "2" and listing[1].startswith("corrupt-4-") and len(listing) == 2
  (warning,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  # The cause, short: no kilobytes of TensorStore spec.
  assert warning.startswith("Checkpoint step 4 in") and "is unreadable (ValueError: " in warning
  assert "moved it to corrupt-4-" in warning
  assert "tensorstore_spec" not in warning and len(warning) < 600


def test_missing_state_folder_is_moved_aside(tmp_path):
  d = str(tmp_path / "ckpt")
  _write(d)
  import shutil

  shutil.rmtree(os.path.join(d, "4", "state"))
  m = checkpoint.make_manager(d, keep=5)
  step, _, _ = checkpoint.restore_latest_valid(m, _abstract(_state()))
  assert step == 2 and any(n.startswith("corrupt-4-") for n in _listing(d))


def test_every_checkpoint_unreadable_raises_instead_of_restarting(tmp_path):
  d = str(tmp_path / "ckpt")
  _write(d)
  _truncate(os.path.join(d, "2"))
  _truncate(os.path.join(d, "4"))
  m = checkpoint.make_manager(d, keep=5)
  with pytest.raises(RuntimeError, match="Every checkpoint .* was unreadable"):
    checkpoint.restore_latest_valid(m, _abstract(_state()))
  assert all(n.startswith("corrupt-") for n in _listing(d))
  # Knowingly rerun: starts afresh.
  assert (
    checkpoint.restore_latest_valid(checkpoint.make_manager(d, keep=5), _abstract(_state())) is None
  )


def test_empty_workdir_returns_none(tmp_path):
  m = checkpoint.make_manager(str(tmp_path / "ckpt"), keep=5)
  assert checkpoint.restore_latest_valid(m, _abstract(_state())) is None


def test_transient_errors_are_retried(tmp_path, monkeypatch):
  d = str(tmp_path / "ckpt")
  _write(d)
  calls = []
  real = checkpoint._read_tree_metadata

  def flaky(item_dir):
    calls.append(item_dir)
    if len(calls) <= 2:
      raise TimeoutError("connection timed out")
    return real(item_dir)

  monkeypatch.setattr(checkpoint, "_read_tree_metadata", flaky)
  m = checkpoint.make_manager(d, keep=5)
  step, _, _ = checkpoint.restore_latest_valid(m, _abstract(_state()), retries=3, backoff_s=0.0)
  assert step == 4 and len(calls) == 3
  assert _listing(d) == ["2", "4"]


@pytest.mark.parametrize(
  "error", [ConnectionResetError("reset by peer"), ValueError("UNAVAILABLE: GCS 503")]
)
def test_persistent_transient_error_raises_and_moves_nothing(tmp_path, monkeypatch, error):
  d = str(tmp_path / "ckpt")
  _write(d)
  calls = []

  def restore(self, *a, **k):
    calls.append(1)
    raise error

  monkeypatch.setattr(checkpoint.CheckpointManager, "restore", restore)
  m = checkpoint.make_manager(d, keep=5)
  with pytest.raises(OSError, match="persisted after 3 attempts"):
    checkpoint.restore_latest_valid(m, _abstract(_state()), retries=2, backoff_s=0.0)
  assert len(calls) == 3 and _listing(d) == ["2", "4"]


class _FailingCommit:
  """A commit future of a save whose background write fails (e.g. a full disk)."""

  def result(self, timeout=None):
    raise OSError("No space left on device")


def _failing_async_save(monkeypatch):
  real = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, *args, **kwargs):
    return list(await real(self, *args, **kwargs) or []) + [_FailingCommit()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_failed_async_save_raises_at_next_save(tmp_path, monkeypatch):
  d = str(tmp_path / "ckpt")
  m = checkpoint.make_manager(d, keep=5)
  state = _state()
  assert checkpoint.save(m, 2, state, {}, {})
  with monkeypatch.context() as mp:
    _failing_async_save(mp)
    assert checkpoint.save(m, 4, state, {}, {})
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 4 .* No space left on device"):
    checkpoint.save(m, 6, state, {}, {})
  m.close()
  assert "4" not in _listing(d) and "2" in _listing(d)


def test_failed_last_async_save_raises_at_exit(tmp_path, monkeypatch):
  m = checkpoint.make_manager(str(tmp_path / "ckpt"), keep=5)
  with monkeypatch.context() as mp:
    _failing_async_save(mp)
    checkpoint.save(m, 2, _state(), {}, {}, force=True)
  # The trainer's exit path: wait, then close.
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 2"):
    m.wait_until_finished()
  m.close()


def test_save_that_never_commits_raises(tmp_path, monkeypatch):
  """orbax logs some background failures and skips the step; the step must not vanish."""
  m = checkpoint.make_manager(str(tmp_path / "ckpt"), keep=5)
  checkpoint.save(m, 2, _state(), {}, {})
  m.wait_until_finished()
  checkpoint.save(m, 4, _state(), {}, {})
  real_all_steps = ocp.CheckpointManager.all_steps
  # As if step 4's finalisation had been skipped without an exception.
  monkeypatch.setattr(
    ocp.CheckpointManager,
    "all_steps",
    lambda self, read=False: [s for s in real_all_steps(self, read) if s != 4],
  )
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 4 .* did not commit"):
    m.wait_until_finished()


def test_load_params_for_inference_without_metadata_warning(tmp_path, caplog):
  d = str(tmp_path / "ckpt")
  _write(d)
  with caplog.at_level(logging.INFO, logger="absl"):  # orbax logs through absl.
    params, meta = checkpoint.load_params_for_inference(d)
  assert meta == {"config": {}}
  np.testing.assert_array_equal(params["dense"]["kernel"], np.arange(32.0).reshape(8, 4) * 4)
  assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
