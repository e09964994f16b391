"""Procedural text-to-image world: a coloured shape in one quadrant of a black image.

The vocabulary is 4 colours x 3 shapes x 4 quadrants = 48 prompts, e.g.
"a red circle at the top left". Images are `size x size` RGB uint8 (16 x 16 by
default). Shapes are drawn with PIL at 4x resolution and box-downsampled so that
edges carry fractional coverage (anti-aliasing), which makes the rendering a
smooth function of the sub-pixel jitter instead of a staircase.

Everything here is deterministic given a seed or a `np.random.Generator`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Every colour has its brightest channel at 255 so that "brightness" (max
# channel) of a fully covered pixel is exactly 1 for every colour; the reward's
# colour mass relies on this.
COLOURS: dict[str, tuple[int, int, int]] = {
  "red": (255, 0, 0),
  "green": (0, 255, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 255, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (row, column) of each quadrant in a 2 x 2 grid.
QUADRANTS: dict[str, tuple[int, int]] = {
  "top left": (0, 0),
  "top right": (0, 1),
  "bottom left": (1, 0),
  "bottom right": (1, 1),
}

SUPERSAMPLE = 4  # Draw at 4x, then box-downsample: 16 coverage levels per pixel edge.
EXTENT_FRACTION = 0.75  # Shape side / diameter as a fraction of the quadrant side.
POSITION_JITTER = 1.0  # Max |shift| of the shape centre, in output pixels (per axis).
SIZE_JITTER = 0.5  # Max |change| of the shape extent, in output pixels.


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """One prompt of the world: which colour, shape and quadrant to draw."""

  colour: str
  shape: str
  quadrant: str

  def __post_init__(self):
    if self.colour not in COLOURS:
      raise ValueError(f"Unknown colour {self.colour!r}; expected one of {list(COLOURS)}.")
    if self.shape not in SHAPES:
      raise ValueError(f"Unknown shape {self.shape!r}; expected one of {list(SHAPES)}.")
    if self.quadrant not in QUADRANTS:
      raise ValueError(f"Unknown quadrant {self.quadrant!r}; expected one of {list(QUADRANTS)}.")

  @property
  def text(self) -> str:
    """The caption, e.g. "a red circle at the top left"."""
    return f"a {self.colour} {self.shape} at the {self.quadrant}"

  @property
  def words(self) -> tuple[str, str, str]:
    """The three content words (colour, shape, quadrant) used as model tokens."""
    return (self.colour, self.shape, self.quadrant)


def parse_prompt(text: str) -> PromptSpec:
  """Inverse of `PromptSpec.text`; tolerant of case and surrounding whitespace.

  Raises:
    ValueError: if `text` is not of the form "a <colour> <shape> at the <quadrant>"
      with words from the vocabulary.
  """
  tokens = text.strip().lower().split()
  if len(tokens) != 7 or tokens[0] != "a" or tokens[3:5] != ["at", "the"]:
    raise ValueError(
      f"Cannot parse prompt {text!r}: expected 'a <colour> <shape> at the <quadrant>'."
    )
  try:
    return PromptSpec(tokens[1], tokens[2], " ".join(tokens[5:]))
  except ValueError as e:
    raise ValueError(f"Cannot parse prompt {text!r}: {e}") from None


def all_specs() -> list[PromptSpec]:
  """All 48 prompts in a fixed order (colour-major, then shape, then quadrant)."""
  return [PromptSpec(c, s, q) for c in COLOURS for s in SHAPES for q in QUADRANTS]


def _words_covered(specs: Sequence[PromptSpec]) -> bool:
  """Whether every colour, shape and quadrant occurs in at least one of `specs`."""
  return (
    {s.colour for s in specs} == set(COLOURS)
    and {s.shape for s in specs} == set(SHAPES)
    and {s.quadrant for s in specs} == set(QUADRANTS)
  )


def split_specs(num_heldout: int = 8, seed: int = 0) -> tuple[list[PromptSpec], list[PromptSpec]]:
  """Deterministic train / held-out split of the prompts.

  Held-out prompts test compositional generalisation: each is an unseen
  *combination*, but every one of its words must still appear in training (a
  word never seen in training has an untrained embedding, which would test
  nothing). Candidates are visited in a seeded random order and one is skipped
  if removing it would leave some word without a training prompt.

  Returns:
    (train, heldout), both in `all_specs()` order.

  Raises:
    ValueError: if `num_heldout` prompts cannot be held out under that rule.
  """
  specs = all_specs()
  order = np.random.default_rng(seed).permutation(len(specs))
  heldout: set[PromptSpec] = set()
  for i in order:
    if len(heldout) == num_heldout:
      break
    candidate = heldout | {specs[i]}
    if _words_covered([s for s in specs if s not in candidate]):
      heldout = candidate
  if len(heldout) != num_heldout:
    raise ValueError(f"Cannot hold out {num_heldout} prompts and keep every word in training.")
  return [s for s in specs if s not in heldout], [s for s in specs if s in heldout]


def quadrant_box(quadrant: str, size: int) -> tuple[int, int, int, int]:
  """Pixel box (row0, row1, col0, col1), end-exclusive, of `quadrant` in a size x size image."""
  if size % 2:
    raise ValueError(f"Image size must be even to split into quadrants, got {size}.")
  half = size // 2
  r, c = QUADRANTS[quadrant]
  return r * half, (r + 1) * half, c * half, (c + 1) * half


def shape_coverage(
  shape: str, quadrant: str, size: int, dx: float = 0.0, dy: float = 0.0, dsize: float = 0.0
) -> np.ndarray:
  """Fraction of each output pixel covered by the shape, float32 [size, size] in [0, 1].

  The shape is centred in its quadrant (then shifted by `dx`, `dy` output pixels)
  with side / diameter / base-and-height `EXTENT_FRACTION * size / 2 + dsize`.
  With zero jitter this is the ideal template the reward compares against.
  """
  k = SUPERSAMPLE
  r0, r1, c0, c1 = quadrant_box(quadrant, size)
  cx, cy = (c0 + c1) / 2 + dx, (r0 + r1) / 2 + dy
  half_extent = (EXTENT_FRACTION * size / 2 + dsize) / 2
  # Continuous extent [a, b) in output pixels covers hi-res pixels round(k*a) ..
  # round(k*b) - 1; PIL boxes are end-inclusive, hence the -1.
  x0, x1 = round(k * (cx - half_extent)), round(k * (cx + half_extent)) - 1
  y0, y1 = round(k * (cy - half_extent)), round(k * (cy + half_extent)) - 1
  hi = Image.new("L", (k * size, k * size), 0)
  draw = ImageDraw.Draw(hi)
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=255)
  elif shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=255)
  elif shape == "triangle":
    # Upward-pointing isosceles triangle filling the bounding box.
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
  else:
    raise ValueError(f"Unknown shape {shape!r}.")
  lo = hi.resize((size, size), Image.BOX)
  return np.asarray(lo, dtype=np.float32) / 255.0


def render(spec: PromptSpec, rng: np.random.Generator, size: int = 16) -> np.ndarray:
  """Renders one jittered image of `spec`.

  Position jitter is uniform in [-1, 1] output pixels per axis and size jitter
  uniform in [-0.5, 0.5] pixels of extent, so no two samples are pixel-identical
  while the shape always stays (almost entirely) inside its quadrant.

  Returns:
    uint8 [size, size, 3], the shape in its colour on black.
  """
  dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
  dsize = rng.uniform(-SIZE_JITTER, SIZE_JITTER)
  cov = shape_coverage(spec.shape, spec.quadrant, size, float(dx), float(dy), float(dsize))
  rgb = cov[..., None] * np.asarray(COLOURS[spec.colour], dtype=np.float32)
  return np.round(rgb).astype(np.uint8)


def render_batch(specs: Sequence[PromptSpec], seed: int, size: int = 16) -> np.ndarray:
  """Renders `specs` in order with one generator seeded by `seed`.

  Returns:
    uint8 [N, size, size, 3]; identical for identical (specs, seed, size).
  """
  rng = np.random.default_rng(seed)
  out = np.zeros((len(specs), size, size, 3), dtype=np.uint8)
  for i, spec in enumerate(specs):
    out[i] = render(spec, rng, size)
  return out


def corrupt_caption(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
  """Returns `spec` with its colour or (equally likely) its quadrant changed.

  Used to make imperfect training captions: the image stays right, the text
  lies about one attribute, so a base model learns a noisy text-image mapping
  that preference tuning can then sharpen. The replacement is uniform over the
  *other* values, so the result always differs from `spec`.
  """
  if rng.random() < 0.5:
    others = [c for c in COLOURS if c != spec.colour]
    return dataclasses.replace(spec, colour=others[rng.integers(len(others))])
  others = [q for q in QUADRANTS if q != spec.quadrant]
  return dataclasses.replace(spec, quadrant=others[rng.integers(len(others))])


def grid_specs(
  specs: Sequence[PromptSpec], seeds: Sequence[int]
) -> tuple[list[PromptSpec], list[int]]:
  """Every (spec, seed) combination, prompt-major: (specs [N], seeds [N])."""
  return [s for s in specs for _ in seeds], [int(x) for _ in specs for x in seeds]
