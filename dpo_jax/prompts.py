"""Prompt sets for sampling and evaluation.

`load_prompts(spec)` accepts:
  builtin                  `BUILTIN_PROMPTS`: 16 varied prompts (people, animals,
                           scenes, styles, text rendering, counting, spatial
                           relations) for a quick look at a checkpoint;
  pickapic:DIR[:SPLIT]     the distinct captions of a Pick-a-Pic-format parquet
                           folder's split (default `validation_unique`, else
                           `test_unique`), in file order;
  a file path              `.jsonl` (one object a line with `prompt` or
                           `caption`) or plain text (one prompt a line; blank
                           lines and lines starting with `#` are skipped).
Empty prompts are an error naming where they came from, never silently used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

BUILTIN_PROMPTS: tuple[str, ...] = (
  "a portrait photo of an old fisherman with a grey beard, golden hour",
  "a corgi wearing sunglasses on a beach, photograph",
  "a red apple next to a green pear on a wooden table",
  "three blue balloons floating above a yellow house",
  "a futuristic city skyline at night with flying cars, digital art",
  "a bowl of ramen with a soft-boiled egg, food photography",
  "an astronaut riding a horse on the moon",
  "a watercolor painting of a lighthouse in a storm",
  "a cat sitting to the left of a dog, studio photo",
  "a street sign that says 'hello world'",
  "a cozy reading nook with a window and rain outside, illustration",
  "a snowy mountain reflected in a calm lake at sunrise",
  "an oil painting of a vase of sunflowers in the style of van gogh",
  "a robot playing chess against a child in a park",
  "a macro photo of a dewdrop on a spider web",
  "a medieval castle on a cliff above the sea, fantasy concept art",
)

PICKAPIC_EVAL_SPLITS = ("validation_unique", "test_unique", "validation", "test")


def _from_file(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Prompt file {path} does not exist (expected .txt or .jsonl).")
  with open(path) as f:
    lines = f.read().splitlines()
  if path.endswith(".jsonl"):
    out = []
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      text = row.get("prompt", row.get("caption"))
      if text is None:
        raise ValueError(f"{path}:{n}: a JSONL prompt line needs a 'prompt' or 'caption' field.")
      out.append(str(text))
    return out
  return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def pickapic_captions(parquet_dir: str, split: str | None = None) -> list[str]:
  """Distinct non-empty captions of a Pick-a-Pic-format split, in file order."""
  import pyarrow.parquet as pq

  from dpo_jax.data import pickapic

  splits = pickapic.split_files(parquet_dir)
  if split is None:
    split = next((s for s in PICKAPIC_EVAL_SPLITS if s in splits), None)
    if split is None:
      raise ValueError(
        f"{parquet_dir} has no evaluation split ({', '.join(PICKAPIC_EVAL_SPLITS)}); "
        f"found {sorted(splits)}. Name one: pickapic:{parquet_dir}:SPLIT."
      )
  if split not in splits:
    raise ValueError(f"No split {split!r} in {parquet_dir}; found {sorted(splits)}.")
  seen: dict[str, None] = {}
  for f in splits[split]:
    pickapic.check_columns(f, {"caption": "caption"}, {})
    for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist():
      if c and c.strip():
        seen.setdefault(c.strip(), None)
  return list(seen)


def load_prompts(spec: str) -> list[str]:
  """Prompts named by `spec` (see the module docstring)."""
  if spec == "builtin":
    prompts: Sequence[str] = BUILTIN_PROMPTS
  elif spec.startswith("pickapic:"):
    rest = spec[len("pickapic:") :]
    folder, _, split = rest.rpartition(":") if not os.path.isdir(rest) else (rest, "", "")
    prompts = pickapic_captions(folder, split or None)
  else:
    prompts = _from_file(spec)
  if not prompts:
    raise ValueError(f"No prompts in {spec}.")
  return list(prompts)
