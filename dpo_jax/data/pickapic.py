"""Pick-a-Pic v2 (and same-layout preference sets) from local parquet shards.

Building is a one-off TFDS `GeneratorBasedBuilder` whose manual dir is a
directory of parquet shards (nothing is ever downloaded). It checks every row,
keeps only strict preferences with two decodable, distinct images, and writes
the kept rows, original fields unchanged, as array_record for random access.
Every skipped row is counted by reason and listed with its example id in
`data_report.json` (next to the TFDS files, also in `metadata.json`).

`build_pickapic` builds every row in one process; `dpo_jax.data.build` gives
each process a share of the rows (`build_rows`) and `open_split` reads the
shares back as one source, in the same order.

Filtering at build time is what lets the training iterator give every process
the same number of batches: the index it shuffles is already clean, so nothing
is dropped on the fly (see `pipeline.py`).

Splits come from Hugging Face shard names (`train-00000-of-00645-*.parquet`,
`validation_unique-...`, `test_unique-...`); a file without that pattern is
part of `train`.

  builder = build_pickapic("/data/pickapic_v2/data", "/data/tfds", max_examples=1000)
  source = open_split(builder.data_dir, "train")   # random-access Sequence[dict]
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath

from dpo_jax.data import decode

# Logical field -> parquet column. `example_id` may map to None: the row's index
# in the split (file order, then row order) is used instead.
PICKAPIC_COLUMNS: Mapping[str, str | None] = {
  "caption": "caption",
  "jpg_0": "jpg_0",
  "jpg_1": "jpg_1",
  "label_0": "label_0",
  "label_1": "label_1",
  "example_id": "ranking_id",
}
# Further original columns carried through unchanged: name -> "str"|"int"|"bool"|"float".
# Nulls become "", -1, False or NaN (TFDS features cannot hold None).
PICKAPIC_EXTRA_COLUMNS: Mapping[str, str] = {
  "model_0": "str",
  "model_1": "str",
  "image_0_uid": "str",
  "image_1_uid": "str",
  "best_image_uid": "str",
  "ranking_id": "int",
  "user_id": "int",
  "has_label": "bool",
  "are_different": "bool",
  "created_at": "str",
}
_SPLIT_FROM_NAME = re.compile(r"^(?P<split>[A-Za-z_]+)-\d+-of-\d+")


class MissingColumnError(ValueError):
  """A configured column is absent from a parquet file."""


class SkipRateError(RuntimeError):
  """Too many rows of a split were unusable; the build is aborted."""


# ---------------------------------------------------------------------------
# Parquet reading.


def split_files(parquet_dir: str) -> dict[str, list[str]]:
  """Parquet shards of a directory (local or gs://) grouped by split name, each list sorted."""
  root = epath.Path(parquet_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"{parquet_dir} is not a directory of *.parquet files.")
  files = sorted(f.name for f in root.iterdir() if f.name.endswith(".parquet"))
  if not files:
    raise FileNotFoundError(f"No *.parquet files in {parquet_dir}.")
  splits: dict[str, list[str]] = collections.defaultdict(list)
  for f in files:
    m = _SPLIT_FROM_NAME.match(f)
    splits[m.group("split") if m else "train"].append(os.fspath(root / f))
  return dict(splits)


def _parquet(path: str) -> pq.ParquetFile:
  # pyarrow reads local paths itself; other filesystems (gs://) go through
  # epath's file object so no pyarrow filesystem needs configuring.
  if "://" not in path:
    return pq.ParquetFile(path)
  return pq.ParquetFile(epath.Path(path).open("rb"))


def num_rows(path: str) -> int:
  """Rows of a parquet file, from its footer (no data read)."""
  return _parquet(path).metadata.num_rows


def check_columns(
  path: str, columns: Mapping[str, str | None], extra_columns: Mapping[str, str]
) -> None:
  """Raises MissingColumnError naming the first configured column `path` lacks."""
  present = _parquet(path).schema_arrow.names
  wanted = [(k, v) for k, v in columns.items() if v is not None]
  wanted += [(k, k) for k in extra_columns]
  for logical, column in wanted:
    if column not in present:
      raise MissingColumnError(
        f"Column {column!r} (field {logical!r}) is missing from {path}; it has {sorted(present)}. "
        "Map the field to another column with `columns=` or drop it from `extra_columns=`."
      )


def iter_rows(
  paths: Sequence[str],
  columns: Mapping[str, str | None],
  extra_columns: Mapping[str, str],
  max_rows: int | None = None,
  batch_rows: int = 64,
  start: int = 0,
) -> Iterator[tuple[int, str, int, dict[str, Any]]]:
  """Streams rows as (split index, file name, row in file, {field: value}).

  Reads `batch_rows` rows at a time so memory stays bounded by a few batches
  of JPEG bytes, whatever the shard size. Rows [start, max_rows) of the split
  (its files concatenated) are streamed; files wholly before `start` are
  skipped by their footer's row count, unread.
  """
  physical = {k: v for k, v in columns.items() if v is not None}
  physical.update({k: k for k in extra_columns})
  wanted = sorted(set(physical.values()))
  index = 0
  for path in paths:
    if max_rows is not None and index >= max_rows:
      return
    f = _parquet(path)
    if index + f.metadata.num_rows <= start:
      index += f.metadata.num_rows
      continue
    row_in_file = 0
    for batch in f.iter_batches(batch_size=batch_rows, columns=wanted):
      if index + batch.num_rows <= start:
        index += batch.num_rows
        row_in_file += batch.num_rows
        continue
      data = batch.to_pydict()
      for r in range(batch.num_rows):
        if max_rows is not None and index >= max_rows:
          return
        if index >= start:
          row = {field: data[col][r] for field, col in physical.items()}
          yield index, os.path.basename(path), row_in_file, row
        index += 1
        row_in_file += 1


# ---------------------------------------------------------------------------
# Row checks and the report.


class SplitReport:
  """Counts of one split's build: rows read, kept, skipped by reason, conversions."""

  def __init__(self, split: str, files: Sequence[str]):
    self.split = split
    self.files = [os.path.basename(f) for f in files]
    self.rows = 0
    self.kept = 0
    self.skipped_by_reason: collections.Counter[str] = collections.Counter()
    self.skipped: list[dict[str, Any]] = []
    self.converted_to_rgb: collections.Counter[str] = collections.Counter()
    self.empty_captions_kept = 0
    self.size_mismatch_pairs = 0

  def add(self, example_id: int, file: str, row_in_file: int, check: decode.RowCheck) -> None:
    self.rows += 1
    if check.reason is not None:
      self.skipped_by_reason[check.reason] += 1
      self.skipped.append(
        dict(id=example_id, reason=check.reason, detail=check.detail, file=file, row=row_in_file)
      )
      return
    self.kept += 1
    self.converted_to_rgb.update(m for m in check.modes if m != "RGB")
    self.empty_captions_kept += not check.caption.strip()
    self.size_mismatch_pairs += check.sizes[0] != check.sizes[1]

  @property
  def defect_rate(self) -> float:
    """Skipped fraction, ties excluded: ties are a property of the data, not a defect."""
    defects = sum(self.skipped_by_reason.values()) - self.skipped_by_reason["tie"]
    return defects / max(self.rows, 1)

  def to_dict(self) -> dict[str, Any]:
    skipped = sum(self.skipped_by_reason.values())
    return {
      "split": self.split,
      "files": self.files,
      "rows": self.rows,
      "kept": self.kept,
      "skipped": skipped,
      "skip_rate": skipped / max(self.rows, 1),
      "defect_rate": self.defect_rate,
      "skipped_by_reason": {r: self.skipped_by_reason[r] for r in decode.SKIP_REASONS},
      "converted_to_rgb": dict(sorted(self.converted_to_rgb.items())),
      "empty_captions_kept": self.empty_captions_kept,
      "size_mismatch_pairs": self.size_mismatch_pairs,
      "skipped_examples": self.skipped,
    }


def merge_split_reports(parts: Sequence[Mapping[str, Any]], files: Sequence[str]) -> dict[str, Any]:
  """One split's report from the reports of consecutive row ranges (`SplitReport.to_dict`s).

  Args:
    parts: the ranges' reports, in row order.
    files: every parquet file of the split (the merged report lists them all).

  Returns:
    The report a single build over all the ranges would have written.
  """
  merged = SplitReport(parts[0]["split"], files)
  for r in parts:
    merged.rows += r["rows"]
    merged.kept += r["kept"]
    merged.skipped_by_reason.update(r["skipped_by_reason"])
    merged.skipped += r["skipped_examples"]
    merged.converted_to_rgb.update(r["converted_to_rgb"])
    merged.empty_captions_kept += r["empty_captions_kept"]
    merged.size_mismatch_pairs += r["size_mismatch_pairs"]
  return merged.to_dict()


def write_data_report(report: Mapping[str, Any], path: str) -> None:
  """Writes a data report as indented JSON (atomically: tmp file + rename; local or gs://)."""
  write_json_atomic(report, path)


def write_json_atomic(obj: Any, path: str) -> None:
  """JSON to `path` through a temporary file and a rename, so readers never see half of it."""
  dest = epath.Path(path)
  tmp = dest.parent / f"{dest.name}.tmp{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
  tmp.replace(dest)


def load_data_report(data_dir: str) -> dict[str, Any]:
  """The report written next to a built dataset (`builder.data_dir` or `build.build_dataset`'s)."""
  return json.loads((epath.Path(data_dir) / "data_report.json").read_text())


def check_skip_rates(report: Mapping[str, Any], max_skip_rate: float, where: str) -> None:
  """Raises SkipRateError if a split of a finished build's report is over `max_skip_rate`."""
  for split, r in report["splits"].items():
    if r["defect_rate"] > max_skip_rate:
      counts = {k: n for k, n in r["skipped_by_reason"].items() if n}
      raise SkipRateError(
        f"Split {split!r} of {where} has defect rate {r['defect_rate']:.1%} of "
        f"{r['rows']} rows (ties excluded) > max_skip_rate={max_skip_rate:.1%}. Skips by "
        f"reason: {counts}; every skipped id is in its data_report.json."
      )


# ---------------------------------------------------------------------------
# The TFDS builder.


def _feature(kind: str) -> tfds.features.FeatureConnector:
  return {
    "str": tfds.features.Text(),
    "int": tfds.features.Tensor(shape=(), dtype=np.int64),
    "bool": tfds.features.Tensor(shape=(), dtype=np.bool_),
    "float": tfds.features.Tensor(shape=(), dtype=np.float32),
  }[kind]


def _extra_value(value: Any, kind: str) -> Any:
  if kind == "str":
    return "" if value is None else (value if isinstance(value, str) else str(value))
  if kind == "int":
    return -1 if value is None else int(value)
  if kind == "bool":
    return False if value is None else bool(value)
  return np.nan if value is None else float(value)


@dataclasses.dataclass(eq=False)
class PickAPicConfig(tfds.core.BuilderConfig):
  """Build options. The config name must change whenever an option does: TFDS
  reuses an existing build of the same name and version (`make_config` derives it).

  Attributes:
    columns: logical field -> parquet column (see `PICKAPIC_COLUMNS`).
    extra_columns: further columns kept as they are (see `PICKAPIC_EXTRA_COLUMNS`).
    max_examples: read at most this many rows per split (a quick subset); the
      report's rates are over the rows read.
    keep_empty_captions: keep null/blank captions as "" instead of skipping them.
    max_skip_rate: abort the build if a split's defect rate (skips other than
      ties) exceeds this.
    max_image_pixels: reject images whose header declares more pixels.
    allowed_formats: Pillow formats accepted.
    num_workers: threads decoding images for the checks (Pillow releases the GIL).
    row_ranges: split -> (start, stop) rows (files concatenated) to build,
      instead of every row (up to max_examples): one process's share of a
      parallel build (`dpo_jax.data.build`). Splits not named are left out.
    check_skip_rate: abort when a split's defect rate exceeds max_skip_rate.
      A share of a parallel build does not: the rate is a whole split's.
  """

  columns: Mapping[str, str | None] = dataclasses.field(
    default_factory=lambda: dict(PICKAPIC_COLUMNS)
  )
  extra_columns: Mapping[str, str] = dataclasses.field(
    default_factory=lambda: dict(PICKAPIC_EXTRA_COLUMNS)
  )
  max_examples: int | None = None
  keep_empty_captions: bool = False
  max_skip_rate: float = 0.1
  max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS
  allowed_formats: tuple[str, ...] = decode.ALLOWED_FORMATS
  num_workers: int = 8
  row_ranges: Mapping[str, tuple[int, int]] | None = None
  check_skip_rate: bool = True


def make_config(**options: Any) -> PickAPicConfig:
  """A config whose name encodes every option that changes the written data."""
  ref = PickAPicConfig(name="ref")
  changed = {
    k: v
    for k, v in sorted(options.items())
    if k not in ("num_workers", "max_examples", "max_skip_rate", "row_ranges", "check_skip_rate")
    and v != getattr(ref, k)
  }
  name = "full" if options.get("max_examples") is None else f"max{options['max_examples']}"
  if changed:
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=list).encode()).hexdigest()
    name += f"_{digest[:8]}"
  return PickAPicConfig(name=name, **options)


class PickAPicV2(tfds.core.GeneratorBasedBuilder):
  """Pick-a-Pic v2 preference pairs, checked and stored as array_record."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local parquet shards, checked rows only."}
  # Used only when no config is passed; `make_config` names its configs "full"/"max<n>"
  # because TFDS refuses a custom config that reuses a class config's name.
  BUILDER_CONFIGS = [PickAPicConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Place the Pick-a-Pic v2 parquet shards (train-*.parquet, validation_unique-*.parquet, ...) "
    "in one directory and pass it as the manual dir."
  )

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._reports: dict[str, dict[str, Any]] = {}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources` (not installed: TFDS does
    # not declare it) for modules inside a package; it only wants this file's
    # path, to look for a checksums file that a manual-only dataset lacks.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: PickAPicConfig = self.builder_config
    features = {
      "caption": tfds.features.Text(),
      "jpg_0": tfds.features.Tensor(shape=(), dtype=np.object_, doc="Encoded image bytes."),
      "jpg_1": tfds.features.Tensor(shape=(), dtype=np.object_, doc="Encoded image bytes."),
      "label_0": tfds.features.Tensor(shape=(), dtype=np.float32, doc="1 if jpg_0 won."),
      "label_1": tfds.features.Tensor(shape=(), dtype=np.float32),
      "example_id": tfds.features.Tensor(shape=(), dtype=np.int64),
    }
    features.update({k: _feature(kind) for k, kind in cfg.extra_columns.items()})
    # `DatasetInfo` directly rather than `dataset_info_from_configs`: the latter
    # reads README/citation files from a TFDS package layout we don't have.
    # Shuffling is left to the reader, so the writer keeps parquet order.
    return tfds.core.DatasetInfo(
      builder=self,
      description="Pick-a-Pic v2 preference pairs (ties and unusable rows removed).",
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg: PickAPicConfig = self.builder_config
    splits = split_files(os.fspath(dl_manager.manual_dir))
    if cfg.row_ranges is not None:
      splits = {k: v for k, v in splits.items() if k in cfg.row_ranges}
    # Every schema first: a missing column should fail in seconds, not after
    # hours of decoding the shards before it.
    for paths in splits.values():
      for p in paths:
        check_columns(p, cfg.columns, cfg.extra_columns)
    return {name: self._generate_examples(name, paths) for name, paths in splits.items()}

  def _generate_examples(self, split: str, paths: Sequence[str]):
    cfg: PickAPicConfig = self.builder_config
    report = SplitReport(split, paths)
    start, stop = 0, cfg.max_examples
    if cfg.row_ranges is not None:
      start, stop = cfg.row_ranges[split]
    rows = iter_rows(paths, cfg.columns, cfg.extra_columns, max_rows=stop, start=start)
    check = lambda r: decode.check_row(
      r[3], cfg.keep_empty_captions, cfg.max_image_pixels, cfg.allowed_formats
    )
    with concurrent.futures.ThreadPoolExecutor(cfg.num_workers) as pool:
      for (index, file, row_in_file, row), verdict in _ordered_map(
        pool, check, rows, 4 * cfg.num_workers
      ):
        eid = index if cfg.columns.get("example_id") is None else int(row["example_id"])
        report.add(eid, file, row_in_file, verdict)
        if verdict.reason is None:
          yield index, self._example(row, eid, verdict.caption)
    self._reports[split] = report.to_dict()
    if cfg.check_skip_rate and report.defect_rate > cfg.max_skip_rate:
      # Next to TFDS's temporary build dir, which is deleted when this raises.
      failed = os.fspath(epath.Path(self.data_dir).parent / "data_report.failed.json")
      write_data_report(self._full_report(), failed)
      counts = {r: n for r, n in report.skipped_by_reason.items() if n}
      raise SkipRateError(
        f"Split {split!r}: {report.defect_rate:.1%} of {report.rows} rows were unusable "
        f"(ties excluded), above max_skip_rate={cfg.max_skip_rate:.1%}. Skips by reason: {counts}. "
        f"Every skipped id is listed in {failed}."
      )

  def _example(self, row: Mapping[str, Any], eid: int, caption: str) -> dict[str, Any]:
    cfg: PickAPicConfig = self.builder_config
    ex = {
      "caption": caption,
      "jpg_0": row["jpg_0"],
      "jpg_1": row["jpg_1"],
      "label_0": float(row["label_0"]),
      "label_1": float(row["label_1"]),
      "example_id": eid,
    }
    ex.update({k: _extra_value(row[k], kind) for k, kind in cfg.extra_columns.items()})
    return ex

  def _full_report(self) -> dict[str, Any]:
    cfg: PickAPicConfig = self.builder_config
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("release_notes",)}
    options = json.loads(json.dumps(options, default=str))
    return {"dataset": self.name, "config": options, "splits": dict(self._reports)}

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    report = self._full_report()
    # Summary (without per-id lists) in TFDS metadata; the full list in JSON.
    self.info.metadata["data_report"] = {
      s: {k: v for k, v in r.items() if k != "skipped_examples"}
      for s, r in report["splits"].items()
    }
    # `self.data_dir` is TFDS's temporary directory here; it is renamed to the
    # final one on success, so the report never describes a half-built set.
    write_data_report(report, os.fspath(epath.Path(self.data_dir) / "data_report.json"))


def _ordered_map(
  pool: concurrent.futures.Executor, fn: Callable[[Any], Any], items: Iterator[Any], window: int
) -> Iterator[tuple[Any, Any]]:
  """(item, fn(item)) in input order, with up to `window` calls in flight.

  Input order, not completion order: the written order (and so every seed's
  batches) must not depend on thread timing. The window bounds memory (each
  item holds two images) while keeping every worker busy.
  """
  pending: collections.deque[tuple[Any, concurrent.futures.Future]] = collections.deque()
  for item in items:
    pending.append((item, pool.submit(fn, item)))
    if len(pending) >= window:
      head, future = pending.popleft()
      yield head, future.result()
  while pending:
    head, future = pending.popleft()
    yield head, future.result()


def source_fingerprint(parquet_dir: str, edge_bytes: int = 1 << 16) -> str:
  """8 hex digits over the shards' content: names, sizes, and their first and last bytes.

  Content, not paths or modification times: every host of a job must find the
  same build from its own copy of the shards (another path, another mtime),
  and a rewritten shard must not reuse a stale one. The last `edge_bytes` hold
  parquet's footer (every row group's and column chunk's offsets, sizes and
  statistics: any rewrite of the data moves them), the first the start of the
  data; 128 KiB per file is 83 MB for all of Pick-a-Pic, not its 335 GB.
  """
  h = hashlib.sha1()
  for split, files in sorted(split_files(parquet_dir).items()):
    for f in files:
      path = epath.Path(f)
      size = path.stat().length
      h.update(json.dumps([split, path.name, size]).encode())
      with path.open("rb") as fh:
        h.update(fh.read(edge_bytes))
        fh.seek(max(size - edge_bytes, 0))
        h.update(fh.read(edge_bytes))
  return h.hexdigest()[:8]


def build_pickapic(
  parquet_dir: str,
  data_dir: str,
  config: PickAPicConfig | None = None,
  **options: Any,
) -> PickAPicV2:
  """Builds (or reuses) the checked array_record dataset.

  Args:
    parquet_dir: directory of parquet shards (the TFDS manual dir).
    data_dir: TFDS data root; the build lands in
      `data_dir/pick_a_pic_v2/<config name>/1.0.0/` (`builder.data_dir`).
    config: a full config; otherwise `make_config(**options)`.

  Returns:
    The prepared builder; `open_split(builder.data_dir, split)` reads it.

  Raises:
    MissingColumnError: a configured column is absent from some shard.
    SkipRateError: a split's defect rate exceeds `max_skip_rate`.
  """
  if config is None:
    config = make_config(**options)
    # The build is reused by name: tie it to these exact shards, so a workdir
    # pointed at other (or rewritten) parquet files never reads a stale build.
    config = dataclasses.replace(config, name=f"{config.name}_src{source_fingerprint(parquet_dir)}")
  builder = PickAPicV2(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=parquet_dir))
  # The threshold is not part of the config name, so an earlier build made
  # under a looser one is reused: hold it to this call's threshold too.
  if config.check_skip_rate:
    where = f"the existing build {builder.data_dir}"
    check_skip_rates(load_data_report(builder.data_dir), config.max_skip_rate, where)
  return builder


def build_rows(
  parquet_dir: str, data_dir: str, config: PickAPicConfig, split: str, start: int, stop: int
) -> tuple[str | None, dict[str, Any]]:
  """Builds rows [start, stop) of one split (a share of a parallel build).

  Args:
    parquet_dir: directory of parquet shards.
    data_dir: TFDS data root of this share alone.
    config: the build's config (its name); the row range is set here.
    split, start, stop: the rows, counted over the split's files in order.

  Returns:
    (`builder.data_dir`, or None when no row of the range was kept; the
    split's report, `SplitReport.to_dict`). TFDS refuses to write a split of
    zero examples, which a share of a small split can be (say eight
    validation rows, all ties); its report still counts them.
  """
  config = dataclasses.replace(config, row_ranges={split: (start, stop)}, check_skip_rate=False)
  builder = PickAPicV2(config=config, data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=parquet_dir)
    )
  except AssertionError as e:
    report = builder._reports.get(split)
    if "No examples were yielded" not in str(e) or report is None or report["kept"]:
      raise
    return None, report
  return os.fspath(builder.data_dir), load_data_report(builder.data_dir)["splits"][split]


# A parallel build (`dpo_jax.data.build`) is one TFDS build per process share,
# listed in order by this file in the build's root; `open_split` joins them.
MANIFEST = "manifest.json"


class ConcatSource(Sequence):
  """Random access over several sources as one: their rows in order."""

  def __init__(self, parts: Sequence[Sequence[Any]]):
    self._parts = list(parts)
    self._starts = np.cumsum([0] + [len(p) for p in self._parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"Row {index} of a source of {len(self)} rows.")
    part = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._parts[part][index - int(self._starts[part])]


def open_split(data_dir: str, split: str = "train") -> Sequence[dict[str, Any]]:
  """Random-access source over a built split, no builder class needed.

  Args:
    data_dir: `builder.data_dir` of `build_pickapic`, or the root of a
      parallel build (`dpo_jax.data.build.build_dataset`, which holds MANIFEST).
    split: split name.

  Returns:
    Elements are dicts of numpy scalars/bytes: caption (utf-8 bytes), jpg_0,
    jpg_1 (encoded bytes), label_0, label_1, example_id and the extra columns.
  """
  manifest = epath.Path(data_dir) / MANIFEST
  if not manifest.exists():
    return tfds.builder_from_directory(data_dir).as_data_source(split)
  parts = json.loads(manifest.read_text())["parts"]
  dirs = [p["data_dirs"][split] for p in parts if p["data_dirs"].get(split)]
  if not dirs:
    known = sorted({s for p in parts for s, d in p["data_dirs"].items() if d})
    raise KeyError(f"No rows of split {split!r} in the build {data_dir}; it has {known}.")
  root = epath.Path(data_dir)
  return ConcatSource(
    [tfds.builder_from_directory(os.fspath(root / d)).as_data_source(split) for d in dirs]
  )
