"""Stopping cleanly on SIGTERM / preemption notices, and a hang watchdog.

Preemption (TPU maintenance, spot VMs, SLURM's `scancel`, Kubernetes) arrives
as SIGTERM some seconds before the machine goes away. The trainer asks
`Preemption.reached(step)` after every step; once it says yes, every process
saves that step, waits for the save and exits 0, so rerunning the same
command resumes bit-exactly.

Multi-process runs must stop at the *same* step on every process (a save is a
collective). JAX's coordination service does exactly that: with
`jax.distributed.initialize`, the preemption sync manager catches SIGTERM (and
the TPU maintenance notice) on any process, and
`multihost_utils.reached_preemption_sync_point(step)` becomes true on all
processes at one agreed step. A single process without the coordination
service gets the same contract from a plain Python signal handler.

The watchdog is a daemon thread that warns when a step takes much longer than
usual: a stuck collective, a dead host or a storage stall shows up as a log
line naming the step and the process rather than as silence.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections import deque

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Answers "should this step be the last?" identically on every process."""

  def __init__(self):
    self._flag = threading.Event()
    self._old_handler = None
    self._sync = jax.process_count() > 1 and _sync_manager_available()
    if not self._sync and threading.current_thread() is threading.main_thread():
      self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after the current step, then exiting.")
    self._flag.set()

  def reached(self, step: int) -> bool:
    """True at the step where every process should save and stop.

    Must be called after every step by every process (the sync protocol
    counts steps).
    """
    if self._sync:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None


def _sync_manager_available() -> bool:
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.preemption_sync_manager is not None


class Watchdog:
  """Warns when progress stalls for `factor` x the running median interval.

  The loop dispatches steps asynchronously and learns that they finished only
  when it fetches their metrics (every `log_every` steps), so it calls
  `tick(step)` right after each fetch: an interval is the time between two
  fetches. A hang stops the ticks altogether, which the thread notices while
  the main thread is blocked in the fetch; a slow step shows as a long
  interval. Intervals that include compilation, evaluation or a checkpoint
  restart the clock without being measured (`tick(step, measure=False)`).
  """

  def __init__(self, factor: float, min_seconds: float = 60.0, window: int = 50):
    self.factor = factor
    self.min_seconds = min_seconds
    self._times: deque[float] = deque(maxlen=window)
    self._last_tick = time.monotonic()
    self._step = 0
    self._warned_for = -1
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None
    if factor > 0:
      self._thread = threading.Thread(target=self._run, name="dpo_jax-watchdog", daemon=True)
      self._thread.start()

  def limit(self) -> float | None:
    """Seconds after which the current step counts as slow (None: too few samples)."""
    with self._lock:
      if len(self._times) < 3:
        return None
      return max(self.min_seconds, self.factor * statistics.median(self._times))

  def tick(self, step: int, measure: bool = True) -> None:
    """Steps up to `step` finished. `measure=False` restarts the clock without a sample."""
    now = time.monotonic()
    with self._lock:
      if measure:
        self._times.append(now - self._last_tick)
      self._last_tick, self._step = now, step

  def check(self) -> str | None:
    """The warning for a stalled step, once per step (also used by the thread)."""
    limit = self.limit()
    with self._lock:
      waited = time.monotonic() - self._last_tick
      step = self._step + 1
      if limit is None or waited <= limit or self._warned_for == step:
        return None
      self._warned_for = step
      median = statistics.median(self._times)
    msg = (
      f"Watchdog: no progress after step {step - 1} on process {jax.process_index()} for "
      f"{waited:.0f} s, {waited / median:.1f}x the median interval ({median:.2f} s): a stuck "
      "collective, a dead host or a storage stall?"
    )
    logging.warning(msg)
    return msg

  def _run(self) -> None:
    while not self._stop.wait(timeout=1.0):
      self.check()

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
