"""The same run on 1 device, 8 devices (FSDP 2 x 4) and 2 processes x 4 devices agrees.

Its own module so that pytest-xdist runs it beside the rest of test_train.py.
"""

import subprocess

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
