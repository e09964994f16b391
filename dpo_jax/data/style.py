"""Style alignment (Diffusion-RPO's cheap benchmark): style preference sets and the style metric.

A style preference set pairs each image with a copy of itself in a target
style: the styled copy is the winner, the original the loser, same caption.
A model fine-tuned on it (DPO / RPO) should move its samples toward the style
on prompts it never saw; the metric measures how far, with no human raters.

Styles are procedural image-to-image transforms with a matching score, so the
benchmark is reproducible anywhere (toy world or real photos):

  amber_duotone  every pixel mapped onto the black -> amber line by its
                 brightness (HSV value), i.e. a two-colour palette. Score: the
                 fraction of the image's colour magnitude that lies on that
                 line, 1 - sum_px dist(c, line) / sum_px |c| (1 = fully in
                 style; a pure red shape on black scores 0.43, green 0.17,
                 blue 0.01, yellow 0.77).

  python -m dpo_jax.data.style --input=PARQUET_DIR --output=DIR --style=amber_duotone

reads Pick-a-Pic-format shards (caption, jpg_0, jpg_1), takes every distinct
image once (by content: the same bytes under another caption are a duplicate)
with the caption it first appears with, and writes
`<split>-00000-of-00001.parquet` shards in the same format plus
`style_report.json` (images read, duplicates, undecodable images by reason,
named as in the data build's report (`decode.IMAGE_REASONS`): counted, never
silently dropped). The styled image alternates between the `jpg_0` and
`jpg_1` columns so its position is not a learnable constant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_jax import score_registry

AMBER = (1.0, 170 / 255, 40 / 255)


@dataclasses.dataclass(frozen=True)
class Style:
  """An image-to-image style and how strongly an image shows it."""

  name: str
  transform: Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> uint8 [H, W, 3]
  score: Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float [N]
  description: str


def duotone(image: np.ndarray, light: Sequence[float] = AMBER) -> np.ndarray:
  """uint8 [..., 3] -> the black -> `light` palette, by HSV value (max channel)."""
  value = image.astype(np.float32).max(axis=-1, keepdims=True)
  return np.round(value * np.asarray(light, np.float32)).astype(np.uint8)


def palette_score(images: np.ndarray, light: Sequence[float] = AMBER) -> np.ndarray:
  """Share of each image's colour magnitude on the black -> `light` line, in [0, 1].

  Args:
    images: uint8 [N, H, W, 3].
    light: the palette's bright end (RGB in [0, 1]).

  Returns:
    float64 [N]: 1 - sum_px |c - (c . u) u| / sum_px |c| with u the unit palette
    direction; an all-black image scores 1 (nothing off-palette).
  """
  c = np.asarray(images, np.float64) / 255.0
  u = np.asarray(light, np.float64)
  u = u / np.linalg.norm(u)
  along = (c @ u)[..., None] * u
  off = np.linalg.norm(c - along, axis=-1).sum(axis=(1, 2))
  total = np.linalg.norm(c, axis=-1).sum(axis=(1, 2))
  return 1.0 - off / np.maximum(total, 1e-12)


STYLES: dict[str, Style] = {
  "amber_duotone": Style(
    name="amber_duotone",
    transform=duotone,
    score=palette_score,
    description="an amber duotone (black to amber palette)",
  ),
}


def get_style(name: str) -> Style:
  if name not in STYLES:
    raise ValueError(f"Unknown style {name!r}; available: {sorted(STYLES)}.")
  return STYLES[name]


def _png(image: np.ndarray) -> bytes:
  import io

  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def distinct_images(
  captions: Sequence[str], images_0: Sequence[bytes | None], images_1: Sequence[bytes | None]
) -> tuple[list[tuple[str, bytes | None]], int]:
  """Every distinct image (by content) of a pair table with its first caption; -> (list, dups).

  By content alone, not (caption, content): a style pair teaches "this image,
  restyled, beats it", so an image seen under a second caption would only
  weigh that image twice. Missing and zero-byte images are not deduplicated:
  each is passed on, to be counted as undecodable.
  """
  seen, out, dups = set(), [], 0
  for caption, a, b in zip(captions, images_0, images_1):
    for data in (a, b):
      if data:
        key = hashlib.sha1(data).hexdigest()
        if key in seen:
          dups += 1
          continue
        seen.add(key)
      out.append((caption, data))
  return out, dups


def style_rows(
  items: Sequence[tuple[str, bytes]], style: Style
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """(caption, image bytes) -> Pick-a-Pic rows (styled wins), and undecodable counts by reason."""
  from dpo_jax.data import decode

  rows, skipped = [], {}
  for caption, data in items:
    try:
      img = np.asarray(decode.decode_rgb(data)[0])
    except decode.ImageRejected as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    styled, original = _png(style.transform(img)), _png(img)
    first = len(rows) % 2 == 0  # Alternate the winner's column.
    rows.append(
      {
        "ranking_id": len(rows),
        "caption": caption,
        "jpg_0": styled if first else original,
        "jpg_1": original if first else styled,
        "label_0": 1.0 if first else 0.0,
        "label_1": 0.0 if first else 1.0,
      }
    )
  return rows, skipped


def build_style_pairs(input_dir: str, output_dir: str, style_name: str) -> dict[str, Any]:
  """Pick-a-Pic shards in `input_dir` -> a style preference set in `output_dir`; -> report."""
  from dpo_jax.data import pickapic

  style = get_style(style_name)
  os.makedirs(output_dir, exist_ok=True)
  report: dict[str, Any] = {"style": style.name, "input": input_dir, "splits": {}}
  for split, files in pickapic.split_files(input_dir).items():
    cols = ("caption", "jpg_0", "jpg_1")
    for f in files:
      pickapic.check_columns(f, {c: c for c in cols}, {})
    table = pa.concat_tables([pq.read_table(f, columns=list(cols)) for f in files])
    items, dups = distinct_images(*(table.column(c).to_pylist() for c in cols))
    rows, skipped = style_rows(items, style)
    if not rows:
      raise ValueError(f"No decodable images in split {split!r} of {input_dir}: {skipped}.")
    pq.write_table(
      pa.Table.from_pylist(rows), os.path.join(output_dir, f"{split}-00000-of-00001.parquet")
    )
    report["splits"][split] = {
      "input_rows": table.num_rows,
      "distinct_images": len(items),
      "duplicate_images": dups,
      "pairs_written": len(rows),
      "undecodable": skipped,
    }
  with open(os.path.join(output_dir, "style_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  report = build_style_pairs(f.input, f.output, f.style)
  print(json.dumps(report, indent=2))


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("input", None, "Folder of Pick-a-Pic-format parquet shards.", required=True)
  flags.DEFINE_string("output", None, "Where the style preference shards go.", required=True)
  flags.DEFINE_enum("style", "amber_duotone", sorted(STYLES), "Target style.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)


def _register_scores() -> None:
  for name, style in STYLES.items():
    score_registry.register(f"style_{name}", lambda x, _, s=style: s.score(x), False)


_register_scores()
