"""The cache's storage layer and the array iterator, without any encoder.

- dtypes survive a write/read exactly (bfloat16 included), local reads are
  memory maps, a gs:// cache (an in-memory fsspec filesystem here) reads the
  same rows without touching local disk, and a reader's peak RSS stays far
  below the cache size;
- ArrayPairIterator resumes exactly with another batch size and refuses a
  changed dataset or seed.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath

from dpo_jax.data import cache, synthetic
from tests.fixtures import REPO


def _write_cache(root: str, arrays: dict, shard_size: int, uncond: dict, splits=None) -> None:
  """A cache as the writer lays it out, from given arrays (the writer's own shard/meta code)."""
  root = epath.Path(root)
  n = len(next(iter(arrays.values())))
  for k in range(-(-n // shard_size)):
    part = {key: v[k * shard_size : (k + 1) * shard_size] for key, v in arrays.items()}
    cache.write_shard(root / "train" / cache.SHARD.format(k), part)
  (root / cache.UNCOND).mkdir(parents=True, exist_ok=True)
  for key, v in uncond.items():
    cache._write_npy(root / cache.UNCOND / f"{key}.npy", v)
  info = {
    "format": cache.FORMAT,
    "num_examples": n,
    "splits": splits or {"train": n},
    "shard_size": shard_size,
    "arrays": {k: {"dtype": v.dtype.name, "shape": list(v.shape[1:])} for k, v in arrays.items()},
    "uncond": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in uncond.items()},
  }
  (root / cache.META).write_text(json.dumps(info))


def _random_arrays(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "latents_w": rng.normal(size=(n, 4, 3, 3)).astype(ml_dtypes.bfloat16),
    "latents_l": rng.normal(size=(n, 4, 3, 3)).astype(ml_dtypes.bfloat16),
    "context": rng.normal(size=(n, 5, 6)).astype(np.float32),
    "time_ids": rng.integers(0, 1000, size=(n, 6)).astype(np.int32),
    "example_id": np.arange(n, dtype=np.int64) + 100,
  }


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_dtypes_round_trip_exactly_and_local_reads_are_memmaps(tmp_path):
  arrays = _random_arrays(23)
  uncond = {"context": np.ones((5, 6), ml_dtypes.bfloat16)}
  _write_cache(str(tmp_path), arrays, shard_size=8, uncond=uncond)
  # np.save cannot name bfloat16: the raw file says V2, the reader restores it.
  assert np.load(tmp_path / "train" / "shard-00000" / "latents_w.npy").dtype == np.dtype("V2")
  got, got_uncond, info = cache.read_cache(str(tmp_path))
  assert "example_id" not in got and info["num_examples"] == 23
  _same_bits(got_uncond["context"], uncond["context"])
  idx = np.array([22, 0, 7, 8, 15, 16, 3, 3])  # Crosses every shard edge, repeats a row.
  for k, v in got.items():
    assert v.shape == arrays[k].shape and v.dtype == arrays[k].dtype
    _same_bits(v[idx], arrays[k][idx])
    _same_bits(v[np.int64(5)], arrays[k][5])
    for part in range(3):
      assert isinstance(v.part(part), np.memmap)
  assert got["latents_w"].part(2).shape == (7, 4, 3, 3)  # The short last shard.
  view = got["context"].rows(20, 23)
  _same_bits(view[np.array([2, 0])], arrays["context"][[22, 20]])
  with pytest.raises(IndexError):
    view[np.array([3])]


def test_incomplete_and_old_caches_are_refused(tmp_path):
  _write_cache(str(tmp_path / "c"), _random_arrays(20), shard_size=8, uncond={})
  os.remove(tmp_path / "c" / "train" / "shard-00001" / cache.SHARD_DONE)  # Interrupted write.
  with pytest.raises(FileNotFoundError, match=r"incomplete: 1 of 3 train shards.*shard-00001"):
    cache.read_cache(str(tmp_path / "c"))
  with pytest.raises(FileNotFoundError, match=r"no 'validation_unique' split"):
    cache.read_cache(str(tmp_path / "c"), "validation_unique")
  old = tmp_path / "old"
  old.mkdir()
  np.savez(old / "meta.npz", info="{}")
  with pytest.raises(FileNotFoundError, match=r"older format.*python -m dpo_jax.data.cache"):
    cache.read_cache(str(old))


def test_gs_cache_reads_only_gathered_rows(memory_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A writer that ignored the scheme would create ./gs:
  arrays = _random_arrays(21, seed=1)
  uncond = {"context": np.full((5, 6), 0.5, ml_dtypes.bfloat16)}
  _write_cache("gs://bucket/latents", arrays, shard_size=8, uncond=uncond)
  assert os.listdir(tmp_path) == []
  assert memory_gcs.exists("gs://bucket/latents/train/shard-00002/latents_w.npy")

  reads = []
  real_open = gpath._GPath.open

  def counting_open(self, mode="r", *args, **kwargs):
    f = real_open(self, mode, *args, **kwargs)
    if "b" in mode and "r" in mode:
      real_read = f.read
      f.read = lambda n=-1: reads.append((self.name, n)) or real_read(n)
    return f

  got, got_uncond, _ = cache.read_cache("gs://bucket/latents")
  assert not isinstance(got["latents_w"].part(0), np.ndarray)  # A byte-offset reader.
  _same_bits(got_uncond["context"], uncond["context"])
  got["latents_w"][np.array([0, 8, 16])]  # Reads (and keeps) each shard's .npy header.
  idx = np.array([20, 1, 2, 3, 9, 2])
  with mock.patch.object(gpath._GPath, "open", counting_open):
    rows = got["latents_w"][idx]
  _same_bits(rows, arrays["latents_w"][idx])
  row_bytes = 4 * 3 * 3 * 2
  # Rows 1-3 in one read, 9 and 20 alone; never a whole shard (8 rows).
  assert sorted(n for _, n in reads) == [row_bytes, row_bytes, 3 * row_bytes]
  for k, v in got.items():
    _same_bits(v[idx], arrays[k][idx])


_RSS_READER = textwrap.dedent(
  """
  import sys
  import numpy as np
  from dpo_jax.data import cache, synthetic

  def status_mib(field):
    with open("/proc/self/status") as f:
      line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

  cache.MAX_OPEN_SHARDS = 2
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets the peak (VmHWM) to the current RSS: imports are not measured.
  rss0, anon0 = status_mib("VmRSS"), status_mib("RssAnon")
  arrays, _, _ = cache.read_cache(sys.argv[1])
  # Process 0 of 8 reads one epoch of its rows.
  it = synthetic.ArrayPairIterator(arrays, 64, seed=0, process_index=0, process_count=8)
  seen, anon = [], 0.0
  for _ in range(len(arrays["latents_w"]) // 64):
    batch = next(it)
    assert (batch["latents_w"][:, 0, 0, 0] == batch["context"][:, 0, 0]).all()
    seen.append(batch["context"][:, 0, 0])
    anon = max(anon, status_mib("RssAnon") - anon0)
  print(status_mib("VmHWM") - rss0, anon, len(np.unique(np.concatenate(seen))))
  """
)


def test_reader_peak_rss_is_far_below_cache_size(tmp_path):
  n, shard = 6144, 256
  arrays = {
    "latents_w": np.empty((n, 4, 32, 32), np.float32),  # 16 KiB rows: 4 pages each.
    "latents_l": np.empty((n, 4, 32, 32), np.float32),
    "context": np.empty((n, 77, 32), np.float32),
  }
  for v in arrays.values():
    v[:] = np.arange(n, dtype=np.float32).reshape((n,) + (1,) * (v.ndim - 1))
  size_mib = sum(v.nbytes for v in arrays.values()) / 2**20
  _write_cache(str(tmp_path), arrays, shard_size=shard, uncond={})
  del arrays
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _RSS_READER, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout.split()
  peak_mib, anon_mib, rows_seen = float(out[0]), float(out[1]), int(out[2])
  assert size_mib > 240
  assert rows_seen == n // 8  # It did read its eighth of the epoch.
  # Private memory: the batch copies, never the cache.
  assert anon_mib < size_mib / 16, (anon_mib, size_mib)
  # Everything resident, mapped file pages included: at most 2 open shards
  # (~4 MiB each) per array, whatever the kernel maps around a row.
  assert peak_mib < size_mib / 6, (peak_mib, size_mib)


# ArrayPairIterator.


def _epoch_rows(it, batches):
  return np.concatenate([next(it)["x"] for _ in range(batches)])


def test_resume_with_another_batch_size_is_exact():
  n = 1000
  arrays = {"x": np.arange(n)}
  it = synthetic.ArrayPairIterator(arrays, 50, seed=3)
  first = _epoch_rows(it, 8)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  assert state["consumed"] == 400 and state["epoch"] == 0
  resumed = synthetic.ArrayPairIterator(arrays, 100, seed=3)
  resumed.set_state(state)
  rest = _epoch_rows(resumed, 6)
  # The rest of the same epoch permutation, in order: every row exactly once.
  order = np.random.default_rng([3, 0]).permutation(n)
  np.testing.assert_array_equal(np.concatenate([first, rest]), order)
  # Then epoch 1 starts from its own permutation.
  np.testing.assert_array_equal(
    next(resumed)["x"], np.random.default_rng([3, 1]).permutation(n)[:100]
  )


def test_resume_with_more_processes_is_the_same_global_stream():
  n = 90
  arrays = {"x": np.arange(n)}
  one = synthetic.ArrayPairIterator(arrays, 20, seed=0)
  want = _epoch_rows(one, 7)  # Crosses the epoch boundary (4 batches + 10 left over).
  start = synthetic.ArrayPairIterator(arrays, 20, seed=0)
  _epoch_rows(start, 3)
  state = start.get_state()
  procs = [synthetic.ArrayPairIterator(arrays, 20, 0, p, 2) for p in range(2)]
  got = []
  for it in procs:
    it.set_state(state)
  for _ in range(4):
    got.append(np.concatenate([next(it)["x"] for it in procs]))
  np.testing.assert_array_equal(np.concatenate(got), want[60:])


def test_changed_data_or_seed_or_old_state_is_refused():
  it = synthetic.ArrayPairIterator({"x": np.arange(100)}, 10, seed=0)
  next(it)
  state = it.get_state()
  with pytest.raises(ValueError, match=r"num_examples=100 differs from the configured 99"):
    synthetic.ArrayPairIterator({"x": np.arange(99)}, 10, seed=0).set_state(state)
  with pytest.raises(ValueError, match=r"seed=0 differs from the configured 1"):
    synthetic.ArrayPairIterator({"x": np.arange(100)}, 10, seed=1).set_state(state)
  with pytest.raises(ValueError, match=r"no 'consumed' count"):
    it.set_state({"epoch": 0, "index": 3, "seed": 0})


def test_leftover_rows_are_logged_once_per_epoch(caplog):
  it = synthetic.ArrayPairIterator({"x": np.arange(1000)}, 300, seed=0)
  with caplog.at_level(logging.INFO, logger="absl"):
    _epoch_rows(it, 7)  # Epochs 0, 1 (3 batches each) and the start of 2.
  msgs = [r.getMessage() for r in caplog.records if "Data epoch" in r.getMessage()]
  assert len(msgs) == 3
  for e, m in enumerate(msgs):
    assert m.startswith(f"Data epoch {e}: 1000 of 1000") and "the last 100 rows" in m
