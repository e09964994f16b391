"""gs:// workdirs: metrics, config and reports go to the bucket, never to a local "gs:" folder.

The bucket is faked in memory (the `memory_gcs` fixture), so a test that
writes to it leaves the local disk untouched or fails.
"""

import json
import os

import numpy as np
import pytest

from dpo_jax import evaluate, metrics


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  return tmp_path


def test_metrics_jsonl_on_gs_is_read_back_by_evaluate(in_tmp_cwd, memory_gcs):
  writer = metrics.JsonlWriter("gs://bucket/run/metrics.jsonl")
  writer.write_scalars(1, {"train/loss": np.float32(0.69), "train/lr": 0.0})
  writer.flush()
  writer.write_scalars(2, {"train/loss": 0.5, "eval/loss": float("nan")})
  writer.close()
  curves = evaluate.read_metrics_jsonl("gs://bucket/run")
  (key,) = memory_gcs.store  # The one file, in the bucket.
  assert key.endswith("bucket/run/metrics.jsonl")
  rows = [json.loads(x) for x in memory_gcs.store[key].getvalue().splitlines()]
  assert curves["train/loss"] == {1: pytest.approx(0.69), 2: 0.5}
  assert "eval/loss" not in curves and rows[1]["eval/loss"] == "nan"
  assert os.listdir(in_tmp_cwd) == []


def test_missing_gs_metrics_is_a_clear_error(in_tmp_cwd, memory_gcs):
  with pytest.raises(FileNotFoundError, match="gs://bucket/none/metrics.jsonl"):
    evaluate.read_metrics_jsonl("gs://bucket/none")
  assert os.listdir(in_tmp_cwd) == []
