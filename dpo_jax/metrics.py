"""Metric writers (TensorBoard + JSONL) and the periodic progress line."""

from __future__ import annotations

import io
import json
import math
import os
import socket
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
    if "://" in os.fspath(path):
      # Object stores have no append (gcsfs warns, then truncates): a resumed
      # run rewrites the earlier rows and goes on after them.
      earlier = path.read_text() if path.exists() else ""
      self._f = path.open("w")  # noqa: SIM115 - closed in close().
      self._f.write(earlier)
    else:
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


class EventFileWriter(metric_writers.MetricWriter):
  """TensorBoard event file in `logdir`, written through etils.epath: scalars, images, hparams.

  clu's SummaryWriter writes through TensorFlow's own filesystems, so on gs://
  it always takes TensorFlow's GCS client, which has no endpoint setting and
  ignores epath's backend choice. Writing the records ourselves (TensorBoard's
  record format and summary protos, no TensorFlow op) puts events wherever
  the metrics.jsonl next to them goes: local, or any epath filesystem.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer import record_writer

    self._event_pb2 = event_pb2
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # TensorFlow's name pattern: TensorBoard loads files with "tfevents" in the name.
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"
    self._records = record_writer.RecordWriter((logdir / name).open("wb"))
    self._add(file_version="brain.Event:2")

  def _add(self, step: int | None = None, **fields) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), **fields)
    if step is not None:
      event.step = int(step)
    self._records.write(event.SerializeToString())

  def write_scalars(self, step, scalars):
    from tensorboard.plugins.scalar import summary_v2 as scalar

    for key, value in scalars.items():
      self._add(step, summary=scalar.scalar_pb(key, np.asarray(value, np.float32)))

  def write_images(self, step, images):
    """images: {key: uint8 [N, H, W, C] or [H, W, C]}, as clu's SummaryWriter takes them."""
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.image import metadata
    from tensorboard.util import tensor_util

    for key, value in images.items():
      value = np.asarray(value)
      value = value[None] if value.ndim == 3 else value
      if value.dtype != np.uint8:  # [0, 1] floats, as tf.summary.image takes them.
        value = np.round(np.clip(value, 0.0, 1.0) * 255.0).astype(np.uint8)
      pngs = []
      for img in value:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
      # The image plugin's tensor: [width, height, png_1, ..., png_N] as strings.
      h, w = value.shape[1:3]
      tensor = tensor_util.make_tensor_proto(np.array([str(w), str(h), *pngs], dtype=object))
      summary = summary_pb2.Summary()
      meta = metadata.create_summary_metadata(key, "", converted_to_tensor=True)
      summary.value.add(tag=key, metadata=meta, tensor=tensor)
      self._add(step, summary=summary)

  def write_hparams(self, hparams):
    from tensorboard.plugins.hparams import summary_v2 as hp

    self._add(0, summary=hp.hparams_pb(dict(hparams)))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_texts(self, step, texts):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    self._records.flush()

  def close(self):
    self._records.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events in `workdir` plus `workdir/metrics.jsonl` (process 0 only).

  Both go through etils.epath (local, gs://, ...). Per-step values are not
  echoed to the log (ProgressLog prints a summary line instead); other
  processes write nothing.
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter(
    [EventFileWriter(workdir), JsonlWriter(epath.Path(workdir) / "metrics.jsonl")]
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
