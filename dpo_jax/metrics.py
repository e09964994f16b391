"""Metric writers (TensorBoard + JSONL) and the periodic progress line."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per (step, write) to `path`; scalars and texts only.

  JSONL is what scripts and notebooks read back (`evaluate` plots training
  curves from it); TensorBoard gets the same numbers through clu.
  """

  def __init__(self, path: str):
    # etils.epath: a gs:// workdir gets its metrics in the bucket, not in a
    # local folder named "gs:".
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    self._f = path.open("a")  # noqa: SIM115 - closed in close().

  def _write(self, step: int, values: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    for k, v in values.items():
      v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
      # JSON has no NaN/Inf; keep them visible as strings instead of dropping.
      row[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
    self._f.write(json.dumps(row) + "\n")

  def write_scalars(self, step, scalars):
    self._write(step, scalars)

  def write_texts(self, step, texts):
    self._write(step, texts)

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass  # The config is in workdir/config.json and in every checkpoint.

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events in `workdir` plus `workdir/metrics.jsonl` (process 0 only).

  Per-step values are not echoed to the log (ProgressLog prints a summary
  line instead); other processes write nothing.
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter(
    [metric_writers.SummaryWriter(workdir), JsonlWriter(epath.Path(workdir) / "metrics.jsonl")]
  )


class ProgressLog:
  """Logs `step, loss, pairs/s, ETA` every `every_s` seconds (and on demand)."""

  def __init__(self, total_steps: int, pairs_per_step: int, start_step: int, every_s: float = 5.0):
    self.total_steps = total_steps
    self.pairs_per_step = pairs_per_step
    self.every_s = every_s
    self._t0 = time.perf_counter()
    self._s0 = start_step
    self._last = -math.inf

  def rate(self, step: int) -> float:
    """Steps per second since the first call after (re)start."""
    dt = time.perf_counter() - self._t0
    return (step - self._s0) / dt if dt > 0 and step > self._s0 else float("nan")

  def maybe_log(self, step: int, loss: float, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self._last < self.every_s:
      return
    self._last = now
    rate = self.rate(step)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    logging.info(
      "step %d/%d  loss %.5f  %.2f pairs/s  %.2f s/step  ETA %s",
      step,
      self.total_steps,
      loss,
      rate * self.pairs_per_step,
      1.0 / rate if rate > 0 else float("nan"),
      _fmt_eta(eta),
    )

  def restart_clock(self, step: int) -> None:
    """Excludes compilation time from throughput: call after the first step."""
    self._t0 = time.perf_counter()
    self._s0 = step


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"
