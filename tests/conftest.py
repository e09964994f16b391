"""Test-session setup: 8 fake CPU devices, quiet TF, and shared tiny configs."""

import os
import shutil
import tempfile

# Must happen before jax initialises its backend (i.e. before any test imports
# jax and touches devices). Tests that need another device count use a
# subprocess.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session: many tests compile the
# same tiny train / eval / sampling programs, in-process and in the CLI
# subprocesses they start. Set here, in the pytest-xdist controller, before the
# workers start, so that the workers and their subprocesses inherit (and
# share) it; removed at the end of the session (`pytest_unconfigure`). An
# existing JAX_COMPILATION_CACHE_DIR is kept and left in place.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpo_jax_tests_xla_cache_")

import pytest  # noqa: E402

# Modules that take minutes, longest first (measured on 2 idle cores). The CI
# command runs with `--dist loadfile --no-loadscope-reorder`, so xdist hands
# out modules in collection order: starting the long ones first keeps one of
# them from running alone at the end. Only the wall time depends on this list.
LONGEST_MODULES = (
  "test_toy_e2e.py",  # 835 s in the suite
  "test_device_agreement.py",  # 301 s
  "test_export.py",
  "test_plan.py",
  "test_bf16_pipelines.py",
  "test_step.py",
  "test_train.py",
  "test_cloud_paths.py",
  "test_sample_eval.py",
  "test_cache.py",
  "test_diagnostics.py",
  "test_lora.py",  # 87 s
)


def pytest_collection_modifyitems(items):
  """Longest modules first (`LONGEST_MODULES`), the rest in their usual order."""
  rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  """The controller (or a run without xdist) removes the cache it created."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
