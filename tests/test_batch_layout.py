"""Micro-batches must split evenly over the mesh; the error proposes values that work."""

import os

import pytest

from dpo_jax import sharding, trainer
from tests.fixtures import make_train_config


def test_valid_layouts_give_pairs_per_micro_batch():
  assert sharding.check_batch_layout(2048, 128, 16, "b") == 16
  assert sharding.check_batch_layout(16, 2, 8, "b") == 8


def test_official_batch_on_64_chips_is_refused_with_valid_values():
  # The case: 2048 pairs, accumulation 128 -> 16 pairs for 64 devices.
  with pytest.raises(ValueError) as e:
    sharding.check_batch_layout(2048, 128, 64, "data.global_batch_size")
  msg = str(e.value)
  assert "2048 / 128 = 16 pairs per micro-batch" in msg and "64 devices" in msg
  assert "optim.grad_accum in [1, 2, 4, 8, 16, 32]" in msg
  assert "data.global_batch_size in [8192]" in msg
  # Every proposal is itself valid.
  for accum in (1, 2, 4, 8, 16, 32):
    sharding.check_batch_layout(2048, accum, 64, "b")
  sharding.check_batch_layout(8192, 128, 64, "b")


def test_eval_batch_and_rounding_proposals():
  with pytest.raises(ValueError, match=r"12 pairs do not split .* in \[8, 16\]"):
    sharding.check_batch_layout(12, 1, 8, "data.eval_batch_size")
  with pytest.raises(ValueError, match=r"in \[16, 32\]"):
    sharding.check_batch_layout(20, 2, 8, "data.global_batch_size")


def test_trainer_refuses_before_writing_anything(tmp_path):
  workdir = tmp_path / "run"
  config = make_train_config(**{"data.global_batch_size": 12, "optim.grad_accum": 2})
  with pytest.raises(ValueError, match="6 pairs per micro-batch"):
    trainer.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(workdir)
