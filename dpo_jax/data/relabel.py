"""Relabels a Pick-a-Pic-format parquet set with a reward model (AI feedback).

  python -m dpo_jax.data.relabel --input=/data/pickapic_v2/data --output=/data/pickapic_pickscore \
      --scorer=pickscore=/models/PickScore_v1 [--tie_margin=0.0]

Every `*.parquet` file of --input is rewritten, under the same name, to
--output with the same rows and columns except:

- `label_0` / `label_1`: from the scorer's scores `s_0`, `s_1` of `jpg_0`,
  `jpg_1` for the row's caption (a null caption scores as ""): 1 / 0 for the
  higher score, 0.5 / 0.5 when `|s_0 - s_1| <= tie_margin` (the trainer's data
  build skips ties, as for human labels);
- `best_image_uid` (when `image_0_uid` / `image_1_uid` exist too): the new
  winner's uid, null for a tie;
- two new float columns `ai_score_0`, `ai_score_1`: the scores themselves, so a
  different tie margin can be applied later without rescoring.

Rows whose image bytes are missing, empty or undecodable (the same safe
decoder and reasons as the data build, `dpo_jax.data.decode`) cannot be scored:
they are left out of the output, counted by reason and listed (file, row,
example id, which image, decoder message) in `relabel_report.json`, which also
holds the row counts, the new ties and how the new labels compare with the
original ones (agreements, flips, strict <-> tie changes).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_jax import builtin_scores, logs
from dpo_jax.data import decode, pickapic

ScoreFn = Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray]
REPORT = "relabel_report.json"
SCORE_COLUMNS = ("ai_score_0", "ai_score_1")
MAX_LISTED = 1000  # Undecodable rows listed individually in the report (all are counted).


def new_labels(s0: np.ndarray, s1: np.ndarray, tie_margin: float) -> np.ndarray:
  """label_0 from scores: 1 if s0 wins, 0 if s1 wins, 0.5 if |s0 - s1| <= tie_margin.  [N]."""
  d = np.asarray(s0, np.float64) - np.asarray(s1, np.float64)
  return np.where(np.abs(d) <= tie_margin, 0.5, np.where(d > 0, 1.0, 0.0))


def label_changes(old_label_0: Sequence[float | None], new_label_0: np.ndarray) -> dict[str, int]:
  """How new labels relate to the original ones.

  Returns:
    Counts of: `agree` (same strict winner), `flip` (opposite strict winner),
    `strict_to_tie`, `tie_to_strict`, `tie_to_tie`, and `original_unlabeled`
    (the original label_0 is null or not in {0, 0.5, 1}).
  """
  counts = dict.fromkeys(
    ("agree", "flip", "strict_to_tie", "tie_to_strict", "tie_to_tie", "original_unlabeled"), 0
  )
  for old, new in zip(old_label_0, new_label_0):
    if old is None or float(old) not in decode.VALID_LABELS:
      counts["original_unlabeled"] += 1
    elif old == 0.5:
      counts["tie_to_tie" if new == 0.5 else "tie_to_strict"] += 1
    elif new == 0.5:
      counts["strict_to_tie"] += 1
    else:
      counts["agree" if float(old) == new else "flip"] += 1
  return counts


def decode_pair(jpg_0: bytes | None, jpg_1: bytes | None) -> tuple[list[np.ndarray], str, str]:
  """Both images as uint8 [H,W,3], or ([], reason, detail) when one cannot be used."""
  for name, data in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
    if data is None:
      return [], "missing_image", name
    if len(data) == 0:
      return [], "zero_byte_image", name
  images = []
  for name, data in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
    try:
      img, _, _ = decode.decode_rgb(data)
    except decode.ImageRejected as e:
      return [], e.reason, f"{name}: {e.detail}"
    images.append(np.asarray(img))
  return images, "", ""


def _winner_uid(label_0: np.ndarray, uid_0: Sequence, uid_1: Sequence) -> list:
  return [a if l0 == 1.0 else b if l0 == 0.0 else None for l0, a, b in zip(label_0, uid_0, uid_1)]


def _replace(table: pa.Table, name: str, values: Any, dtype: pa.DataType) -> pa.Table:
  i = table.schema.get_field_index(name)
  column = pa.array(values, type=dtype)
  if i < 0:
    return table.append_column(name, column)
  return table.set_column(i, name, column)


@dataclasses.dataclass(frozen=True)
class BatchResult:
  """One relabelled batch of rows.

  Attributes:
    table: the decodable rows with new labels and score columns.
    old_label_0: their original label_0.
    new_label_0: their new label_0 ([K] float64).
    undecodable: (row index in the input batch, reason, detail) per dropped row.
  """

  table: pa.Table
  old_label_0: list
  new_label_0: np.ndarray
  undecodable: list[tuple[int, str, str]]


def relabel_table(
  table: pa.Table,
  score_fn: ScoreFn,
  tie_margin: float,
  columns: Mapping[str, str | None] = pickapic.PICKAPIC_COLUMNS,
) -> BatchResult:
  """Decodes and scores one batch of rows and writes their new labels."""
  data = table.select([columns["caption"], columns["jpg_0"], columns["jpg_1"]]).to_pydict()
  keep, bad, images = [], [], []
  for i, (j0, j1) in enumerate(zip(data[columns["jpg_0"]], data[columns["jpg_1"]])):
    pair, reason, detail = decode_pair(j0, j1)
    if reason:
      bad.append((i, reason, detail))
    else:
      keep.append(i)
      images.append(pair)
  kept = table.take(pa.array(keep, pa.int64()))
  captions = [data[columns["caption"]][i] or "" for i in keep]
  if keep:
    scores = score_fn([p[0] for p in images] + [p[1] for p in images], captions + captions)
    s0, s1 = np.asarray(scores[: len(keep)]), np.asarray(scores[len(keep) :])
  else:
    s0 = s1 = np.zeros((0,))
  label_0 = new_labels(s0, s1, tie_margin)
  old_label_0 = kept.column(columns["label_0"]).to_pylist()
  label_type = table.schema.field(columns["label_0"]).type
  label_type = pa.float64() if pa.types.is_null(label_type) else label_type  # All-null labels.
  kept = _replace(kept, columns["label_0"], label_0, label_type)
  kept = _replace(kept, columns["label_1"], 1.0 - label_0, label_type)
  names = kept.schema.names
  if {"best_image_uid", "image_0_uid", "image_1_uid"} <= set(names):
    uids = _winner_uid(
      label_0, kept.column("image_0_uid").to_pylist(), kept.column("image_1_uid").to_pylist()
    )
    uid_type = kept.schema.field("best_image_uid").type
    # An all-null column is typed `null` by pyarrow; it now holds uids.
    uid_type = kept.schema.field("image_0_uid").type if pa.types.is_null(uid_type) else uid_type
    kept = _replace(kept, "best_image_uid", uids, uid_type)
  for name, s in zip(SCORE_COLUMNS, (s0, s1)):
    kept = _replace(kept, name, np.asarray(s, np.float64), pa.float64())
  return BatchResult(kept, old_label_0, label_0, bad)


def relabel(
  input_dir: str,
  output_dir: str,
  score_fn: ScoreFn,
  tie_margin: float = 0.0,
  batch_rows: int = 256,
  columns: Mapping[str, str | None] = pickapic.PICKAPIC_COLUMNS,
  scorer_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Rewrites every parquet file of `input_dir` into `output_dir` with scorer labels.

  Args:
    input_dir: folder of Pick-a-Pic-format parquet files.
    output_dir: output folder (created); files keep their names.
    score_fn: `(uint8 images, prompts) -> [N]` scores (a `dpo_jax.scorers.Scorer`).
    tie_margin: |score difference| at or below this is a tie.
    batch_rows: rows read, decoded and scored at a time (bounds memory).
    columns: logical field -> column (`pickapic.PICKAPIC_COLUMNS` layout).
    scorer_info: what the report says about the scorer (name, path).

  Returns:
    The report (also written to `output_dir/relabel_report.json`).
  """
  if tie_margin < 0:
    raise ValueError(f"tie_margin must be >= 0, got {tie_margin}.")
  files = [f for split in pickapic.split_files(input_dir).values() for f in split]
  os.makedirs(output_dir, exist_ok=True)
  changes: collections.Counter[str] = collections.Counter()
  by_reason: collections.Counter[str] = collections.Counter()
  listed, per_file = [], {}
  rows = written = ties = 0
  id_column = columns.get("example_id")
  for path in files:
    pickapic.check_columns(path, {k: v for k, v in columns.items() if k != "example_id"}, {})
    name = os.path.basename(path)
    row_in_file, file_written = 0, 0
    writer = None
    try:
      for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([batch])
        res = relabel_table(table, score_fn, tie_margin, columns)
        for i, reason, detail in res.undecodable:
          by_reason[reason] += 1
          if len(listed) < MAX_LISTED:
            eid = table.column(id_column)[i].as_py() if id_column in table.schema.names else None
            row = {"file": name, "row": row_in_file + i, "id": eid, "reason": reason}
            listed.append({**row, "detail": detail})
        changes.update(label_changes(res.old_label_0, res.new_label_0))
        ties += int(np.sum(res.new_label_0 == 0.5))
        if writer is None:
          writer = pq.ParquetWriter(os.path.join(output_dir, name), res.table.schema)
        writer.write_table(res.table)
        rows += table.num_rows
        row_in_file += table.num_rows
        file_written += res.table.num_rows
    finally:
      if writer is not None:
        writer.close()
    written += file_written
    per_file[name] = {"rows": row_in_file, "written": file_written}
  report = {
    **(scorer_info or {}),
    "input": os.path.abspath(input_dir),
    "output": os.path.abspath(output_dir),
    "tie_margin": tie_margin,
    "rows": rows,
    "rows_written": written,
    "undecodable_rows": sum(by_reason.values()),
    "undecodable_by_reason": dict(by_reason),
    "undecodable": listed,
    "ties": ties,
    "flips": changes["flip"],
    "label_changes": {k: changes[k] for k in sorted(changes)},
    "files": per_file,
  }
  with open(os.path.join(output_dir, REPORT), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def parse_flags(argv: Sequence[str]):
  """absl flags in their own FlagValues (no process-wide FLAGS)."""
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("input", None, "Folder of Pick-a-Pic-format parquet files.", flag_values=fv)
  flags.DEFINE_string("output", None, "Output folder.", flag_values=fv)
  flags.DEFINE_string("scorer", None, "NAME=PATH (see dpo_jax.scorers).", flag_values=fv)
  flags.DEFINE_float("tie_margin", 0.0, "|score difference| <= this is a tie.", flag_values=fv)
  flags.DEFINE_integer("batch_rows", 256, "Rows decoded and scored at a time.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Images per scorer call.", flag_values=fv)
  return logs.parse_own_flags(fv, argv, __doc__, ("input", "output", "scorer"))


def main(argv: Sequence[str]) -> dict[str, Any]:
  """`python -m dpo_jax.data.relabel`: see the module docstring."""
  from dpo_jax import scorers

  fv = parse_flags(argv)
  builtin_scores.register()  # The model-free scores, by name.
  specs = scorers.parse_scorer_specs(fv.scorer)
  if len(specs) != 1:
    raise ValueError(f"--scorer takes one NAME=PATH, got {fv.scorer!r}.")
  (name, path), *_ = specs.items()
  scorer = scorers.make_scorer(name, path, batch_size=fv.batch_size)
  info = {"scorer": name, "scorer_path": os.path.abspath(path)}
  report = relabel(fv.input, fv.output, scorer, fv.tie_margin, fv.batch_rows, scorer_info=info)
  summary = {k: report[k] for k in ("rows", "rows_written", "undecodable_rows", "ties", "flips")}
  print(f"Relabelled with {name}: {summary}; report in {os.path.join(fv.output, REPORT)}")
  return report


if __name__ == "__main__":
  main(sys.argv)
