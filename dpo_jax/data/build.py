"""Builds the checked Pick-a-Pic dataset, in parallel over every process.

  python -m dpo_jax.data.build --config=configs/sd15.py --config.data.path=PARQUET_DIR \\
      [--config.data.tfds_dir=DIR]

checks every parquet row once (`pickapic.py`) and writes the kept rows as
array_record, ahead of training; the trainer (`data.source='pickapic'`) and
the cache writer (`python -m dpo_jax.data.cache`) then find the build and
reuse it. Run it with the same processes as a job (`--coordinator_address`,
`--num_processes`, `--process_id`, as the trainer) to split the work, or on
one machine: without this step the first training run does the same build.

Every process builds its share: rows [p N / P, (p + 1) N / P) of each split
(the split's files concatenated, N its rows), as its own TFDS build in
`<root>/part-<p>-of-<P>/<split>/`. Nothing is shared while writing, so nothing races;
the full Pick-a-Pic train split (≈ 959 k rows, ≈ 3 h on one process at
80–100 rows/s) takes 1/P of that. When a process finishes it writes
`part-<p>-of-<P>.done.json` (its data report and row counts); process 0 waits
for every share, merges their reports into `<root>/data_report.json` and
writes `<root>/manifest.json` last. `pickapic.open_split(root, split)` reads
the shares as one source in row order, identical to a one-process build.

Processes coordinate through the files alone: no device collective waits for
a build (a barrier would time out long before a 3-hour build ends). So
`data.tfds_dir` must be one folder every process sees (a shared filesystem or
gs://); a process that sees no sign of another process's share within
`start_timeout_s` says so instead of waiting for ever. A failed share writes
`part-<p>-of-<P>.failed.json`, which stops the others at once.

An interrupted build resumes: TFDS reuses every finished share. A finished
build (manifest present) is reused by any number of processes; its name
covers the build options and the content of the shards
(`pickapic.source_fingerprint`), so other or rewritten shards never reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from etils import epath

from dpo_jax.data import pickapic

PART = "part-{:05d}-of-{:05d}"
# Seconds between looks at the shared folder while waiting for other shares.
_POLL_S = 2.0


def pickapic_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`pickapic.make_config` options from `config.data`."""
  data = config.data
  return dict(
    columns={k: (v or None) for k, v in data.columns.items()},
    extra_columns=dict(pickapic.PICKAPIC_EXTRA_COLUMNS) if data.keep_extra_columns else {},
    max_examples=data.max_examples or None,
    max_skip_rate=data.max_skip_rate,
    keep_empty_captions=data.keep_empty_captions,
  )


def build_root(parquet_dir: str, tfds_dir: str, **options: Any) -> tuple[str, Any]:
  """-> (root folder of the build of these shards and options, its `PickAPicConfig`)."""
  config = pickapic.make_config(**options)
  # Tie the build to the shards' content (see `pickapic.build_pickapic`).
  name = f"{config.name}_src{pickapic.source_fingerprint(parquet_dir)}"
  config = dataclasses.replace(config, name=name)
  return os.fspath(epath.Path(tfds_dir) / "pickapic" / name), config


def row_ranges(parquet_dir: str, max_examples: int | None, count: int) -> list[dict]:
  """Each process's share: [{split: (start, stop)}] for process 0..count-1.

  Rows, not files: shares are equal however few files a split has (a
  validation split is one file), and concatenated in process order they are
  the split's rows in the order of a one-process build.
  """
  shares: list[dict] = [{} for _ in range(count)]
  for split, files in pickapic.split_files(parquet_dir).items():
    n = sum(pickapic.num_rows(f) for f in files)
    if max_examples is not None:
      n = min(n, max_examples)
    for p in range(count):
      start, stop = p * n // count, (p + 1) * n // count
      if stop > start:
        shares[p][split] = (start, stop)
  return shares


def build_parallel(
  parquet_dir: str,
  tfds_dir: str,
  process_index: int = 0,
  process_count: int = 1,
  start_timeout_s: float = 900.0,
  **options: Any,
) -> str:
  """Builds this process's share, waits for the others' (files only); -> the build root.

  Args:
    parquet_dir: folder of parquet shards (local or gs://).
    tfds_dir: data root shared by every process; the build lands in
      `tfds_dir/pickapic/<config name>/`.
    process_index, process_count: this process and how many build together.
    start_timeout_s: give up if another share shows no sign of life (its
      `.started` file) within this many seconds: `tfds_dir` is not shared.
    **options: `pickapic.make_config` options.

  Returns:
    The root for `pickapic.open_split` and `pickapic.load_data_report`.

  Raises:
    pickapic.MissingColumnError: a configured column is absent from some shard.
    pickapic.SkipRateError: a split's defect rate exceeds `max_skip_rate`.
    RuntimeError: another process's share failed, or never started.
  """
  if "://" in os.fspath(tfds_dir):
    # Checked before any row is decoded: TFDS would fail only when it closes
    # the first array_record file, after decoding a whole split.
    raise ValueError(
      f"data.tfds_dir={tfds_dir} (default: <workdir>/tfds, or <output>/tfds for the cache "
      "writer) is not a local path: TFDS writes and grain reads array_record files with "
      "local file I/O only. Set --config.data.tfds_dir to a local or mounted folder (NFS, "
      "gcsfuse) that every process sees."
    )
  since = time.time()
  root_s, config = build_root(parquet_dir, tfds_dir, **options)
  root = epath.Path(root_s)
  if not (root / pickapic.MANIFEST).exists():
    root.mkdir(parents=True, exist_ok=True)
    shares = row_ranges(parquet_dir, config.max_examples, process_count)
    _build_share(parquet_dir, root, config, shares[process_index], process_index, process_count)
    if process_index == 0:
      _merge(parquet_dir, root, config, process_count, start_timeout_s, since)
    else:
      # Process 0 writes the manifest seconds after the last share is done.
      _wait_for([root / pickapic.MANIFEST], root, process_count, start_timeout_s, since)
  # The threshold is not part of the name: an earlier build made under a looser
  # one is reused, so hold it to this call's threshold too.
  pickapic.check_skip_rates(
    pickapic.load_data_report(root_s), config.max_skip_rate, f"the build {root_s}"
  )
  return root_s


def _build_share(
  parquet_dir: str, root: epath.Path, config: Any, ranges: dict, index: int, count: int
) -> None:
  part = PART.format(index, count)
  (root / f"{part}.started").write_text(str(os.getpid()))
  t0 = time.time()
  try:
    splits, data_dirs = {}, {}
    for split, (start, stop) in ranges.items():
      # One TFDS build per split and share, each in its own folder: no two
      # processes ever rename into the same TFDS directory, and a share that
      # keeps no row of a split (TFDS cannot write that) costs no other split.
      built, splits[split] = pickapic.build_rows(
        parquet_dir, os.fspath(root / part / split), config, split, start, stop
      )
      data_dirs[split] = os.fspath(epath.Path(built).relative_to(root)) if built else None
  except Exception as e:
    pickapic.write_json_atomic(
      {"process": index, "time": time.time(), "error": f"{type(e).__name__}: {e}"},
      os.fspath(root / f"{part}.failed.json"),
    )
    raise
  seconds = time.time() - t0
  rows = sum(r["rows"] for r in splits.values())
  done = dict(data_dirs=data_dirs, ranges=ranges, splits=splits, rows=rows, seconds=seconds)
  pickapic.write_json_atomic(done, os.fspath(root / f"{part}.done.json"))
  logging.info(
    "Data build share %d/%d: %d rows in %.0f s (%.1f rows/s).",
    index + 1,
    count,
    rows,
    seconds,
    rows / max(seconds, 1e-9),
  )


def _wait_for(
  paths: Sequence[epath.Path], root: epath.Path, count: int, start_timeout_s: float, since: float
) -> None:
  """Polls until every path exists; fails fast on a failed or never-started share.

  `since`: when this process started building; failures written before it
  belong to an earlier attempt.
  """
  t0, last_log = time.time(), time.time()
  while not all(p.exists() for p in paths):
    for path in sorted(root.glob("*.failed.json")):
      failure = json.loads(path.read_text())
      # A failure of an earlier attempt is not news: that share is being
      # rebuilt now. A minute covers clock skew between hosts.
      if failure["time"] > since - 60:
        raise RuntimeError(f"Data build share failed: {path}: {failure['error']}")
    if time.time() - t0 > start_timeout_s:
      silent = [
        PART.format(p, count)
        for p in range(count)
        if not (root / f"{PART.format(p, count)}.started").exists()
      ]
      if silent:
        raise RuntimeError(
          f"No sign of data build shares {silent} in {root} after {start_timeout_s:.0f} s: "
          "config.data.tfds_dir must be one folder every process sees (a shared or mounted "
          "filesystem), or build first with `python -m dpo_jax.data.build` on each host."
        )
    if time.time() - last_log > 300:
      waiting = [os.fspath(p) for p in paths if not p.exists()]
      logging.info("Waiting for %d data build shares, e.g. %s.", len(waiting), waiting[0])
      last_log = time.time()
    time.sleep(_POLL_S)


def _merge(
  parquet_dir: str, root: epath.Path, config: Any, count: int, timeout_s: float, since: float
) -> None:
  done_paths = [root / f"{PART.format(p, count)}.done.json" for p in range(count)]
  _wait_for(done_paths, root, count, timeout_s, since)
  done = [json.loads(p.read_text()) for p in done_paths]
  files = pickapic.split_files(parquet_dir)
  splits = {}
  for split in files:
    parts = [d["splits"][split] for d in done if split in d["splits"]]
    if parts:
      splits[split] = pickapic.merge_split_reports(parts, files[split])
  options = {k: v for k, v in dataclasses.asdict(config).items() if k != "release_notes"}
  for k in ("row_ranges", "check_skip_rate"):
    options.pop(k, None)
  report = {
    "dataset": "pick_a_pic_v2",
    "config": json.loads(json.dumps(options, default=str)),
    "splits": splits,
    "build": {
      "processes": count,
      "rows_per_s": [d["rows"] / max(d["seconds"], 1e-9) for d in done],
    },
  }
  pickapic.write_data_report(report, os.fspath(root / "data_report.json"))
  parts = [
    {"data_dirs": d["data_dirs"], "num_examples": {s: r["kept"] for s, r in d["splits"].items()}}
    for d in done
  ]
  # Written last: its presence means the build is complete.
  pickapic.write_json_atomic({"parts": parts}, os.fspath(root / pickapic.MANIFEST))


def build_dataset(
  config: ml_collections.ConfigDict,
  tfds_dir: str,
  process_index: int = 0,
  process_count: int = 1,
) -> str:
  """`build_parallel` with the options of `config.data`; -> the build root."""
  if not config.data.path:
    raise ValueError("config.data.path is empty: set it to a folder of Pick-a-Pic parquet shards.")
  return build_parallel(
    config.data.path,
    tfds_dir,
    process_index=process_index,
    process_count=process_count,
    **pickapic_options(config),
  )


def prepare_dataset(config: ml_collections.ConfigDict, tfds_dir: str) -> str:
  """The build every process of this job shares (jax's process index and count)."""
  import jax

  root = build_dataset(config, tfds_dir, jax.process_index(), jax.process_count())
  if jax.process_index() == 0:
    for split, r in pickapic.load_data_report(root)["splits"].items():
      logging.info("Data %s: %s", split, {k: v for k, v in r.items() if k != "skipped_examples"})
  return root


def main(argv: Sequence[str]) -> None:
  del argv
  from dpo_jax import distributed

  distributed.initialize_from_flags()
  config = flags.FLAGS.config
  tfds_dir = config.data.tfds_dir or flags.FLAGS.tfds_dir
  if not tfds_dir:
    raise app.UsageError("Set --config.data.tfds_dir (or --tfds_dir): where the build goes.")
  root = prepare_dataset(config, tfds_dir)
  print(f"Built {root}; train with --config.data.tfds_dir={tfds_dir}")


if __name__ == "__main__":
  from ml_collections import config_flags

  from dpo_jax import distributed

  distributed.define_flags()
  config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
  flags.DEFINE_string("tfds_dir", None, "Build folder when config.data.tfds_dir is empty.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
