"""The parallel dataset build (`dpo_jax.data.build`): shares, merge, reuse, failures.

The 2-process runs are real processes of one `jax.distributed` job started
through the `python -m dpo_jax.data.build` CLI, the step the trainer and the
cache writer (`build.prepare_dataset`) run at start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

from dpo_jax.data import build, decode, pickapic
from tests.fixtures import BLUE, RED, REPO, _run_pair, good_rows, jpeg, pickapic_row, write_parquet

OPTIONS = dict(max_skip_rate=1.0, num_workers=2)


def _bad_rows():
  """-> (rows, {id: reason}): one row per reason the parallel merge must count."""
  cases = [
    ("tie", dict(label_0=0.5, label_1=0.5)),
    ("zero_byte_image", dict(jpg_1=b"")),
    ("non_image", dict(jpg_0=b"not an image")),
    ("truncated_image", dict(jpg_0=jpeg(RED)[:60])),
    ("identical_images", dict(jpg_1=jpeg(RED))),
  ]
  rows, reasons = [], {}
  for k, (reason, change) in enumerate(cases):
    row = pickapic_row(3000 + k, "bad", jpeg(RED), jpeg(BLUE), 1.0, 0.0)
    row.update(change)
    rows.append(row)
    reasons[3000 + k] = reason
  return rows, reasons


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Train: 3 files of unequal length (17 clean + 5 bad rows); validation: 1 file of 2 clean
  rows then 2 ties, so that process 1 of 2 keeps no validation row at all."""
  pq_dir = tmp_path_factory.mktemp("pq")
  good, _ = good_rows(17)
  bad, reasons = _bad_rows()
  rows = good[:4] + bad[:2] + good[4:11] + bad[2:] + good[11:]
  write_parquet(str(pq_dir / "train-00000-of-00003.parquet"), rows[:3])
  write_parquet(str(pq_dir / "train-00001-of-00003.parquet"), rows[3:15])
  write_parquet(str(pq_dir / "train-00002-of-00003.parquet"), rows[15:])
  ties = [pickapic_row(6000 + k, "tie", jpeg(RED), jpeg(BLUE), 0.5, 0.5) for k in range(2)]
  write_parquet(
    str(pq_dir / "validation_unique-00000-of-00001.parquet"), good_rows(2, 5000)[0] + ties
  )
  return dict(dir=str(pq_dir), rows=rows, reasons=reasons)


def _rows(root, split):
  src = pickapic.open_split(root, split)
  return [
    (int(e["example_id"]), e["caption"], e["jpg_0"], e["jpg_1"], float(e["label_0"]))
    for e in (src[i] for i in range(len(src)))
  ]


def _counts(report):
  """A report without what differs between equal builds (timings, decoder messages)."""
  out = {}
  for split, r in report["splits"].items():
    r = dict(r)
    r["skipped_examples"] = [
      (e["id"], e["reason"], e["file"], e["row"]) for e in r.pop("skipped_examples")
    ]
    out[split] = r
  return out


def _cli_two_processes(pq_dir, tfds_dir, timeout=240):
  """`python -m dpo_jax.data.build` as processes 0 and 1 of one jax.distributed job."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

  def command(pid, port):
    args = [sys.executable, "-m", "dpo_jax.data.build", "--config=configs/tiny.py"]
    args += [f"--config.data.path={pq_dir}", f"--config.data.tfds_dir={tfds_dir}"]
    args += ["--config.data.max_skip_rate=1.0", f"--coordinator_address=127.0.0.1:{port}"]
    args += ["--num_processes=2", f"--process_id={pid}"]
    return args, env

  return _run_pair(command, timeout)


def test_two_processes_build_what_one_builds(shards, tmp_path):
  """Both processes finish (no rename race), and the merged build equals a one-process build:
  same rows in the same order, same report counts, every skip reason counted once."""
  outs = _cli_two_processes(shards["dir"], str(tmp_path / "two"))
  roots = [next(ln for ln in o.splitlines() if ln.startswith("Built ")) for o in outs]
  roots = [ln.split()[1].rstrip(";") for ln in roots]
  assert roots[0] == roots[1]
  two = roots[0]
  with open(os.path.join(two, "manifest.json")) as f:
    manifest = json.load(f)
  # Each process built a share of each split: 22 train rows -> 11 + 11; of the validation
  # rows process 1 kept none (2 ties), which TFDS cannot write: counted, no folder.
  assert [p["num_examples"] for p in manifest["parts"]] == [
    {"train": 9, "validation_unique": 2},
    {"train": 8, "validation_unique": 0},
  ]
  assert manifest["parts"][1]["data_dirs"]["validation_unique"] is None
  one = build.build_parallel(shards["dir"], str(tmp_path / "one"), **OPTIONS)
  assert os.path.basename(one) == os.path.basename(two)  # Same options, same shards.
  for split in ("train", "validation_unique"):
    assert _rows(two, split) == _rows(one, split)
  rep_one, rep_two = pickapic.load_data_report(one), pickapic.load_data_report(two)
  assert _counts(rep_two) == _counts(rep_one)
  train = rep_two["splits"]["train"]
  assert (train["rows"], train["kept"]) == (22, 17)
  val = rep_two["splits"]["validation_unique"]
  assert (val["rows"], val["kept"], val["skipped_by_reason"]["tie"]) == (4, 2, 2)
  expected = {r: 0 for r in decode.SKIP_REASONS}
  for reason in shards["reasons"].values():
    expected[reason] += 1
  assert train["skipped_by_reason"] == expected
  assert {e["id"]: e["reason"] for e in train["skipped_examples"]} == shards["reasons"]
  assert train["files"] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
  # The parquet rows in file order, bad rows removed: what one TFDS build writes.
  clean = [r["ranking_id"] for r in shards["rows"] if r["ranking_id"] not in shards["reasons"]]
  assert [r[0] for r in _rows(two, "train")] == clean
  assert rep_two["build"]["processes"] == 2 and len(rep_two["build"]["rows_per_s"]) == 2
  # A finished build is reused (no rebuild: the manifest is older than the call), and
  # held to the caller's threshold: 4 defects in 22 rows is 18 %.
  before = os.path.getmtime(os.path.join(two, "manifest.json"))
  again = build.build_parallel(shards["dir"], str(tmp_path / "two"), process_count=2, **OPTIONS)
  assert again == two and os.path.getmtime(os.path.join(two, "manifest.json")) == before
  with pytest.raises(pickapic.SkipRateError, match=r"18\.2% of 22 rows.*max_skip_rate=10\.0%"):
    build.build_parallel(shards["dir"], str(tmp_path / "two"), max_skip_rate=0.1, num_workers=2)


def test_row_shares_cover_each_split_once_in_order(shards):
  shares = build.row_ranges(shards["dir"], None, 3)
  assert [s["train"] for s in shares] == [(0, 7), (7, 14), (14, 22)]
  # One validation file of 4 rows still splits.
  assert [s.get("validation_unique") for s in shares] == [(0, 1), (1, 2), (2, 4)]
  capped = build.row_ranges(shards["dir"], 5, 2)
  assert [s["train"] for s in capped] == [(0, 2), (2, 5)]
  assert build.row_ranges(shards["dir"], 1, 2)[0] == {}  # More processes than rows.


def test_a_share_reads_its_rows(shards, tmp_path):
  """Rows [start, stop) of a split are the parquet rows start..stop-1 (across files)."""
  config = pickapic.make_config(**OPTIONS)
  data_dir, report = pickapic.build_rows(shards["dir"], str(tmp_path / "a"), config, "train", 2, 9)
  assert report["rows"] == 7 and pickapic.load_data_report(data_dir)["splits"]["train"] == report
  want = [r["ranking_id"] for r in shards["rows"][2:9] if r["ranking_id"] not in shards["reasons"]]
  src = pickapic.open_split(data_dir, "train")
  assert [int(src[i]["example_id"]) for i in range(len(src))] == want
  # Rows 4 and 5 are both bad: nothing to write, but both are counted.
  data_dir, report = pickapic.build_rows(shards["dir"], str(tmp_path / "b"), config, "train", 4, 6)
  assert data_dir is None and (report["rows"], report["kept"]) == (2, 0)
  assert {e["id"] for e in report["skipped_examples"]} == {3000, 3001}


def test_fingerprint_follows_content_not_path_or_mtime(shards, tmp_path):
  ref = pickapic.source_fingerprint(shards["dir"])
  copy = tmp_path / "elsewhere"
  copy.mkdir()
  for f in os.listdir(shards["dir"]):
    shutil.copyfile(os.path.join(shards["dir"], f), copy / f)  # New path, new mtime.
    os.utime(copy / f, (time.time() + 1000, time.time() + 1000))
  assert pickapic.source_fingerprint(str(copy)) == ref
  path = copy / "train-00001-of-00003.parquet"
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 1  # One bit, same size.
  path.write_bytes(bytes(data))
  assert pickapic.source_fingerprint(str(copy)) != ref
  shutil.copyfile(os.path.join(shards["dir"], path.name), path)
  assert pickapic.source_fingerprint(str(copy)) == ref
  path.rename(copy / "train-00009-of-00010.parquet")  # Same bytes, other name.
  assert pickapic.source_fingerprint(str(copy)) != ref


def test_waiting_share_fails_fast(shards, tmp_path):
  """Process 0 of 2 with no process 1: a fresh failure marker stops it at once; with
  none, it says the folder is not shared once `start_timeout_s` has passed."""
  root, _ = build.build_root(shards["dir"], str(tmp_path / "a"), **OPTIONS)
  os.makedirs(root)
  failed = os.path.join(root, "part-00001-of-00002.failed.json")
  pickapic.write_json_atomic(
    {"process": 1, "time": time.time() + 5, "error": "OSError: disk"}, failed
  )
  with pytest.raises(RuntimeError, match="share failed.*OSError: disk"):
    build.build_parallel(shards["dir"], str(tmp_path / "a"), 0, 2, start_timeout_s=30, **OPTIONS)
  # An earlier attempt's failure is not news; nobody ever started share 1 here.
  pickapic.write_json_atomic({"process": 1, "time": 0.0, "error": "old"}, failed)
  with pytest.raises(RuntimeError, match=r"No sign of data build shares \['part-00001-of-00002'\]"):
    build.build_parallel(shards["dir"], str(tmp_path / "a"), 0, 2, start_timeout_s=1, **OPTIONS)


def test_concat_source_indexing():
  src = pickapic.ConcatSource([[0, 1, 2], [], [3], [4, 5]])
  assert len(src) == 6 and [src[i] for i in range(6)] == list(range(6))
  assert src[np.int64(-1)] == 5
  with pytest.raises(IndexError):
    src[6]
