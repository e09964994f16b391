"""SIGTERM handling of a single process, and the hang watchdog (dpo_jax.preemption).

The multi-process path (JAX's preemption sync point) runs end to end in
test_device_agreement.py: both processes of a 2-process run get SIGTERM, save
one agreed step and exit 0, and the resumed run matches an uninterrupted one.
"""

import os
import signal
import time

import pytest
from absl import logging

from dpo_jax import preemption


def test_sigterm_is_caught_and_reported_at_the_next_step():
  before = signal.getsignal(signal.SIGTERM)
  stop = preemption.Preemption()
  try:
    assert not stop.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # Would end the test process without the handler.
    assert stop.reached(2) and stop.reached(3)
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGTERM) is before


def test_watchdog_warns_once_when_progress_stalls(monkeypatch):
  dog = preemption.Watchdog(factor=3.0, min_seconds=0.0)
  dog.close()  # Drive check() by hand, without the thread.
  clock = [100.0]
  monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
  dog.tick(0, measure=False)
  for step in range(1, 6):
    clock[0] += 1.0
    dog.tick(step)
  assert dog.limit() == pytest.approx(3.0)
  clock[0] += 2.5
  assert dog.check() is None  # Slower than usual, within the limit.
  clock[0] += 1.0
  msg = dog.check()
  assert "step 5" in msg and "process 0" in msg and "3.5" in msg
  assert dog.check() is None  # Once per stall.
  clock[0] += 1.0
  dog.tick(6, measure=False)  # E.g. a checkpoint: no sample, clock restarted.
  assert dog.limit() == pytest.approx(3.0) and dog.check() is None


def test_watchdog_thread_logs_a_real_stall(caplog):
  dog = preemption.Watchdog(factor=2.0, min_seconds=0.0)
  try:
    for step in range(1, 5):
      time.sleep(0.05)
      dog.tick(step)
    with caplog.at_level(logging.WARNING):
      time.sleep(1.6)  # The thread checks once a second.
  finally:
    dog.close()
  assert any("Watchdog" in r.getMessage() for r in caplog.records)


def test_watchdog_off():
  dog = preemption.Watchdog(factor=0.0)
  assert dog._thread is None
  dog.close()
