"""End-to-end runs of train_and_evaluate: device-count invariance, kill/resume, bad checkpoints."""

import json
import logging
import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpo_jax import trainer
from dpo_jax.models import unet as unet_lib
from tests.fixtures import REPO, make_train_config, run_train_cli_two_processes, train_cli


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows if "train/loss" in r}


def load_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  # Restore onto one local device whatever topology saved it (e.g. 2 processes).
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
    ckptr.metadata(path).item_metadata,
  )
  restored = ckptr.restore(path, abstract)
  return jax.tree.map(np.asarray, restored["train_state"]["params"])


def assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and len(la) > 10
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def initial_params(config):
  unet = unet_lib.unet_from_config(config.model)
  return unet_lib.init_unet_params(unet, trainer.split_rngs(config.seed)[0])


def assert_same_updates(a, b, theta0):
  """Parameters trained under different shardings agree up to float reassociation.

  Adam divides each gradient by its own RMS, so leaves whose true gradient is
  ~0 (e.g. biases right before a GroupNorm) turn float noise into O(lr)
  steps; their differences are bounded by lr * steps. Everything else must
  agree tightly, and so must the update as a whole.
  """
  da = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, theta0)
  db = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), b, theta0)
  num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(da), jax.tree.leaves(db))))
  den = np.sqrt(sum(np.sum(y**2) for y in jax.tree.leaves(db)))
  assert den > 0 and num / den < 2e-2, (num, den)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=2e-4 * 5)


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


def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
  sharded = str(tmp_path / "fsdp")
  trainer.train_and_evaluate(
    make_train_config(max_steps=5, **{"mesh.data": 2, "mesh.fsdp": 4}), sharded
  )
  one = str(tmp_path / "one")
  # A relative --workdir, as users type it, resolved against the cwd.
  args, env = train_cli("one", devices=1, max_steps=5, **{"mesh.data": 1, "mesh.fsdp": 1})
  proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  l1, l8 = read_jsonl(one), read_jsonl(sharded)
  assert sorted(l1) == sorted(l8) == [1, 2, 3, 4, 5]
  for s in l1:
    np.testing.assert_allclose(l8[s]["train/loss"], l1[s]["train/loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(l8[s]["train/grad_norm"], l1[s]["train/grad_norm"], rtol=1e-3)
  theta0 = initial_params(make_train_config())
  assert_same_updates(load_params(sharded, 5), load_params(one, 5), theta0)

  # Two processes x 4 devices (gloo collectives), started as users do (the
  # CLI through scripts/multinode.sh), same global mesh and batch: the
  # assembled global batches are identical, so the run agrees up to the
  # reduction order of cross-process collectives.
  multi = str(tmp_path / "multihost")
  outs = run_train_cli_two_processes(multi, 600, max_steps=5, **{"mesh.data": 2, "mesh.fsdp": 4})
  for pid, out in enumerate(outs):
    assert f"process {pid} of 2, 4 local / 8 global devices" in out
  lm = read_jsonl(multi)  # Written by process 0 only.
  assert sorted(lm) == [1, 2, 3, 4, 5]
  for s in lm:
    np.testing.assert_allclose(lm[s]["train/loss"], l8[s]["train/loss"], rtol=1e-4, atol=1e-6)
  assert_same_updates(load_params(multi, 5), load_params(sharded, 5), theta0)


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
