"""The same run on 1 device, 8 devices (FSDP 2 x 4) and 2 processes x 4 devices agrees.

Its own module so that pytest-xdist runs it beside the rest of test_train.py.
"""

import json
import os
import random
import signal
import subprocess
import time

import jax
import numpy as np

from dpo_jax import trainer
from dpo_jax.models import unet as unet_lib
from tests.fixtures import (
  load_params,
  make_train_config,
  read_jsonl,
  run_train_cli_two_processes,
  train_cli,
)


def read_jsonl_if_exists(workdir):
  """{step: row} so far, {} before the file exists or while a line is half written."""
  try:
    return read_jsonl(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


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
  # CLI through launch/multinode.sh), same global mesh and batch: the
  # assembled global batches are identical, so the run agrees up to the
  # reduction order of cross-process collectives. Process 1 compiles 40 s
  # slower than process 0 (gloo gives a late peer 30 s; the trainer's barrier
  # waits). The run is preempted: both processes get SIGTERM once a random step
  # has finished, agree on a step, save it and exit 0; a single process then
  # resumes and finishes.
  multi = str(tmp_path / "multihost")
  mesh = {"mesh.data": 2, "mesh.fsdp": 4}
  signal_after = random.Random().randint(1, 2)

  def preempt(procs):
    deadline = time.time() + 500
    while not (read_jsonl_if_exists(multi) and max(read_jsonl(multi)) >= signal_after):
      exited = [p.returncode for p in procs if p.poll() is not None]
      assert not exited, f"a process exited before step {signal_after}: {exited}"
      assert time.time() < deadline, f"no step {signal_after} within 500 s"
      time.sleep(0.01)
    for p in procs:
      p.send_signal(signal.SIGTERM)

  outs = run_train_cli_two_processes(multi, 600, preempt, slow_compile_s=40, max_steps=5, **mesh)
  saved = sorted(int(d) for d in os.listdir(os.path.join(multi, "checkpoints")) if d.isdigit())
  assert saved and signal_after <= saved[-1] < 5, (signal_after, saved)
  for pid, out in enumerate(outs):
    assert f"process {pid} of 2, 4 local / 8 global devices" in out
    assert f"Preemption: saved step {saved[-1]}" in out, out[-2000:]
  # Resumed by one process with all 8 devices: a different host count, same
  # global mesh and batch order.
  args, env = train_cli(multi, devices=8, max_steps=5, **mesh)
  proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from step {saved[-1]}" in proc.stderr
  lm = read_jsonl(multi)  # Written by process 0 only.
  assert sorted(lm) == [1, 2, 3, 4, 5]
  for s in lm:
    np.testing.assert_allclose(lm[s]["train/loss"], l8[s]["train/loss"], rtol=1e-4, atol=1e-6)
  assert_same_updates(load_params(multi, 5), load_params(sharded, 5), theta0)
