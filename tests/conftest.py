"""Test-session setup: 8 fake CPU devices, quiet TF, and shared tiny configs."""

import os

# Must happen before jax initialises its backend (i.e. before any test imports
# jax and touches devices). Tests that need another device count use a
# subprocess.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  """The tiny CPU config, unlocked so tests can set fields."""
  from configs import tiny

  c = tiny.get_config()
  c.unlock()
  c.log_every = 1
  return c


@pytest.fixture
def memory_gcs():
  """An in-memory fake bucket behind gs:// paths (`tests.fixtures.fake_gcs`)."""
  from tests.fixtures import fake_gcs

  with fake_gcs() as fs:
    yield fs
