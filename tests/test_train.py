"""End-to-end runs of train_and_evaluate: outputs, rerun, kill/resume, bad checkpoints."""

import logging
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from dpo_jax import trainer
from tests.fixtures import REPO, load_params, make_train_config, read_jsonl, train_cli


def assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and len(la) > 10
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = trainer.train_and_evaluate(make_train_config(), workdir)
  return workdir, result


def test_run_writes_checkpoints_tensorboard_and_jsonl(uninterrupted):
  workdir, result = uninterrupted
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  rows = read_jsonl(workdir)
  assert sorted(rows) == list(range(1, 9))
  for key in (
    "loss",
    "implicit_acc",
    "reward_margin",
    "model_mse_w",
    "model_mse_l",
    "ref_mse_w",
    "ref_mse_l",
    "grad_norm",
    "lr",
    "pairs_per_sec",
  ):
    assert f"train/{key}" in rows[8], key
  assert rows[1]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
  assert result["train"]["loss"] == pytest.approx(rows[8]["train/loss"])
  assert np.isfinite(result["eval"]["loss"])
  # Warmup is 25 % of 8 steps: lr ramps for 2 steps then stays constant.
  assert rows[1]["train/lr"] == 0.0 and rows[8]["train/lr"] == pytest.approx(2e-4)


def test_rerunning_a_finished_run_trains_nothing(uninterrupted):
  workdir, _ = uninterrupted
  result = trainer.train_and_evaluate(make_train_config(), workdir)
  assert result["history"] == [] and int(result["state"].step) == 8
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]


def test_killed_run_resumes_to_identical_result(uninterrupted, tmp_path):
  ref_dir, ref_result = uninterrupted
  workdir = str(tmp_path / "killed")
  args, env = train_cli(workdir, devices=8)
  proc = subprocess.Popen(
    args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(ckpt, "4")):
    assert proc.poll() is None, "training exited before it could be killed"
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(ckpt, "8")), "killed too late to test resuming"

  result = trainer.train_and_evaluate(make_train_config(), workdir)
  assert int(result["state"].step) == 8
  resumed_from = min(h["step"] for h in result["history"]) - 1
  assert resumed_from >= 4
  ref_rows, rows = read_jsonl(ref_dir), read_jsonl(workdir)
  for s in range(resumed_from + 1, 9):
    assert rows[s]["train/loss"] == pytest.approx(ref_rows[s]["train/loss"], rel=1e-6, abs=1e-7)
  assert_trees_close(load_params(workdir, 8), load_params(ref_dir, 8), rtol=1e-6, atol=1e-7)


def test_truncated_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path, caplog):
  import shutil

  ref_dir, _ = uninterrupted
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(ref_dir, workdir)
  step8 = os.path.join(workdir, "checkpoints", "8", "state")
  truncated = 0
  for root, _, files in os.walk(step8):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 64:
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        truncated += 1
  assert truncated > 0
  # An uncommitted save from a crash must be ignored (and cleaned up) too.
  os.makedirs(os.path.join(workdir, "checkpoints", "10.orbax-checkpoint-tmp-1234", "state"))

  with caplog.at_level(logging.WARNING):
    result = trainer.train_and_evaluate(make_train_config(), workdir)
  assert any("step 8" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  assert [h["step"] for h in result["history"]] == [7, 8]
  # The broken step was moved aside, not deleted.
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(n.startswith("corrupt-8-") for n in names)
  assert_trees_close(load_params(workdir, 8), load_params(ref_dir, 8), rtol=1e-6, atol=1e-7)


def test_changed_optimizer_is_refused_by_name(uninterrupted, tmp_path):
  """A resume with another optimizer names the differing state keys and moves nothing aside."""
  import shutil

  from dpo_jax import checkpoint

  workdir = str(tmp_path / "changed")
  shutil.copytree(uninterrupted[0], workdir)
  config = make_train_config(**{"optim.name": "adafactor", "max_steps": 12})
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(checkpoint.CheckpointMismatchError) as err:
    trainer.train_and_evaluate(config, workdir)
  # The failed set-up left no SIGTERM handler behind (it would swallow termination).
  assert signal.getsignal(signal.SIGTERM) is handler
  msg = str(err.value)
  assert "Checkpoint step 8" in msg and "train_state/opt_state/" in msg and '"name": "adamw"' in msg
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]
