"""`train_and_evaluate` on tiny SD1.5 / SDXL diffusers folders and Pick-a-Pic parquet."""

import json
import math
import os

import numpy as np
import pytest

from dpo_jax import trainer
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline
from tests.fixtures import good_rows, tiny_pipeline_train_config, write_parquet


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_dpo_steps_on_tiny_pipeline(kind, tmp_path):
  pipe = make_tiny_pipeline(kind, str(tmp_path / "pipe"), seed=0)
  parquet = tmp_path / "parquet"
  parquet.mkdir()
  rows, _ = good_rows(20)
  write_parquet(str(parquet / "train-00000-of-00001.parquet"), rows)
  workdir = str(tmp_path / "run")

  result = trainer.train_and_evaluate(tiny_pipeline_train_config(kind, pipe, str(parquet)), workdir)

  losses = [h["loss"] for h in result["history"]]
  assert len(losses) == 3 and all(np.isfinite(losses))
  # Step 1: policy == reference -> exactly log 2 (warmup lr is 0 at step 1, so
  # step 2 too); then the policy moves.
  assert losses[0] == pytest.approx(math.log(2.0), abs=1e-6)
  assert result["history"][-1]["grad_norm"] > 0
  assert np.isfinite(result["eval"]["loss"])
  report = json.load(open(os.path.join(workdir, "data_report.json")))
  assert report["splits"]["train"]["kept"] == 20
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
