"""The toy comparison's picture: prompts (rows) x models (column blocks), each image annotated.

Every tile shows one sample enlarged, its reward, and what the judge
(`toy.judge`) reads from it: the letters C, Q, S (colour, quadrant, shape) in
green when right for the prompt and red when wrong, or "blank". Rows are
labelled with their prompt and column blocks with their model, so the grid can
be read without the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpo_jax.toy import judge, world

SCALE = 4  # Nearest-neighbour enlargement of each 16 px sample.
_RIGHT, _WRONG, _TEXT = (0, 140, 0), (200, 0, 0), (0, 0, 0)
_FONT_SIZE = 11
_LABEL_W = 210  # Row-label column (prompt text), pixels.
_HEADER_H = 20
_CAPTION_H = 2 * _FONT_SIZE + 6
_PAD = 3  # Between tiles.
_BLOCK_GAP = 14  # Between model blocks.


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType.
  except (TypeError, OSError):
    return ImageFont.load_default()


def annotated_grid(
  scored: Mapping[str, tuple[np.ndarray, np.ndarray]],
  specs: Sequence[world.PromptSpec],
  num_prompts: int,
  seeds_per_prompt: int,
  columns: int = 6,
) -> np.ndarray:
  """The grid as uint8 [H, W, 3].

  Args:
    scored: model -> (images uint8 [N, h, w, 3], rewards [N]), all on the same
      prompt-major (prompt, seed) grid; blocks appear in this order.
    specs: the N prompts of that grid (N = num_prompts * seeds_per_prompt).
    num_prompts, seeds_per_prompt: the grid's shape.
    columns: samples shown per prompt and model (the first seeds).
  """
  k = min(columns, seeds_per_prompt)
  font = _font(_FONT_SIZE)
  first = next(iter(scored.values()))[0]
  tile = first.shape[1] * SCALE
  cell_w, cell_h = tile + _PAD, tile + _CAPTION_H + _PAD
  block_w = k * cell_w
  width = _LABEL_W + len(scored) * (block_w + _BLOCK_GAP)
  height = _HEADER_H + num_prompts * cell_h
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for b, (name, (images, rewards)) in enumerate(scored.items()):
    x0 = _LABEL_W + b * (block_w + _BLOCK_GAP)
    draw.text((x0 + block_w // 2, 2), name, fill=_TEXT, font=_font(_FONT_SIZE + 3), anchor="ma")
    acc = judge.accuracy(images, specs)
    for p in range(num_prompts):
      for j in range(k):
        i = p * seeds_per_prompt + j
        x, y = x0 + j * cell_w, _HEADER_H + p * cell_h
        big = np.asarray(images[i]).repeat(SCALE, axis=0).repeat(SCALE, axis=1)
        canvas.paste(Image.fromarray(big), (x, y))
        ty = y + tile + 1
        draw.text((x, ty), f"r {rewards[i]:+.2f}", fill=_TEXT, font=font)
        ty += _FONT_SIZE + 2
        if acc["blank"][i]:
          draw.text((x, ty), "blank", fill=_WRONG, font=font)
          continue
        for letter, metric, dx in (("C", "colour", 0), ("Q", "quadrant", 12), ("S", "shape", 24)):
          colour = _RIGHT if acc[metric][i] else _WRONG
          draw.text((x + dx, ty), letter, fill=colour, font=font)
  for p in range(num_prompts):
    y = _HEADER_H + p * cell_h + tile // 2
    draw.text((4, y), specs[p * seeds_per_prompt].text, fill=_TEXT, font=font, anchor="lm")
  return np.asarray(canvas)
