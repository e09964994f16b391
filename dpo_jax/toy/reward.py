"""Model-free reward for the toy world: does an image show its prompt?

Definition, for an image x (RGB in [0, 1]) and a prompt (colour c, shape s,
quadrant q); u_c is the palette colour / 255 (its brightest channel is 1):

  brightness  b(p) = max_k x_k(p)                          "is anything drawn at p"
  chroma      u(p) = x(p) / max(b(p), eps)                 colour with brightness divided out
  colour mass m(p) = exp(-|u(p) - u_c|^2 / SIGMA2) * b(p)  "how much of colour c is at p"

  r = sum_{p in q} m(p) / area_{q,s}
  A = min(r, 1 / r)                          right amount of target colour in the quadrant
  B = sum_{p not in q} b(p) / area_{q,s}     anything drawn outside the quadrant
  S = IoU(m|q, T_{q,s}) - max_{s' != s} IoU(m|q, T_{q,s'})
  I = sum_p b(p) / area_{q,s}                 all ink, in objects
  P = BLANK_PENALTY * max(0, 1 - I / HALF)    missing ink: only below half an object
  reward = (A - B + 0.5 * S - P) / ideal_{q,s}

T_{q,s} is the ideal (un-jittered) coverage template of shape s centred in
quadrant q, rendered by the same code as the images, and area_{q,s} its pixel
area. IoU is the soft (Ruzicka) IoU sum(min(a, b)) / sum(max(a, b)), taken as
the best over integer shifts of the template in {-1, 0, 1}^2. ideal_{q,s} is
the value of A - B + 0.5 * S for T_{q,s} itself (1.11 for circles and squares,
1.20 for triangles at 16 px), so the ideal rendering scores exactly 1.

Why this form:
- Chroma comparison times brightness makes m a coverage: an anti-aliased edge
  pixel half covered by red gives m = 0.5 rather than a "wrong colour" penalty,
  so jittered ground truth scores almost like the ideal (within-prompt std of
  about 0.06). A grey or colour-cast background has the wrong chroma and counts
  as no colour. Palette colours are >= 1 apart in chroma (squared), so with
  SIGMA2 = 0.1 cross-talk is < 1e-4.
- Dividing by the target area puts A and B in units of "one whole object".
  A = min(r, 1/r) penalises too little colour (faint, partial, missing shape)
  and too much (a flooded quadrant, two objects) alike. B = 1 is one object's
  worth of stray ink elsewhere, e.g. the shape in the wrong quadrant; it is not
  clipped so more mess is always worse.
- S is a *difference* of IoUs so a blob that fits every shape equally earns
  nothing. It is weighted 0.5 because at 16 px the shapes differ by a few pixels
  (ideal circle vs square IoU = 0.78), so it is weak. The shift alignment keeps
  the +-1 px position jitter of the data from swamping it (same for all shapes).
- P closes a loophole: without it a blank image scores 0, far above the right
  shape in the wrong quadrant (about -0.9), so a model could gain reward by
  drawing nothing, and RPO did (14 % blank samples against 0.5 % for the base).
  With P a blank image scores -BLANK_PENALTY / ideal (-1.8 for circles), below
  the worst jittered rendering of the right colour and shape in a wrong
  quadrant (about -1.1), and so does a near-blank one. Images with at least
  half an object of ink (every ground-truth rendering, anything drawn) are
  untouched, so the ideal still scores 1.
- Normalising by the ideal score fixes the scale: ideal rendering 1, the
  wrong colour in the right place 0, the right picture in the wrong quadrant
  about -0.9, blank about -1.8; jittered ground truth about 0.87 (the
  prototype's reward also gave ~0.85).

Everything is vectorised numpy (~0.04 s per 1000 images at 16 px on one core); the
templates are rendered once per image size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from dpo_jax import score_registry
from dpo_jax.toy.world import COLOURS, QUADRANTS, SHAPES, PromptSpec, quadrant_box, shape_coverage

SIGMA2 = 0.1  # Chroma similarity bandwidth (squared distance), see module docstring.
SHAPE_WEIGHT = 0.5
# Missing-ink penalty P (module docstring): BLANK_PENALTY for a blank image,
# falling linearly to 0 at HALF an object of ink.
BLANK_PENALTY = 2.0
HALF = 0.5
_EPS = 1e-6
_SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))

_COLOUR_NAMES = tuple(COLOURS)
_QUADRANT_NAMES = tuple(QUADRANTS)
# Chroma of each palette colour: [C, 3]. Brightest channel is 1 by construction.
_CHROMA = np.asarray([COLOURS[c] for c in _COLOUR_NAMES], np.float64) / 255.0
# `_split_quadrants` yields quadrants row-major; the names must be in that order too.
assert [QUADRANTS[q] for q in _QUADRANT_NAMES] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def soft_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Soft (Ruzicka) IoU sum(min(a, b)) / sum(max(a, b)) over the last two axes; 0 if both empty."""
  union = np.maximum(a, b).sum(axis=(-2, -1))
  return np.minimum(a, b).sum(axis=(-2, -1)) / np.maximum(union, _EPS)


@functools.lru_cache(maxsize=8)
def _templates(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ideal shape templates, cropped to their quadrant, for one image size (cached).

  Only in-quadrant colour is compared with templates, so each template is kept
  as a crop of its own quadrant (4x less work than full images); coverage that
  a shifted template would put outside the quadrant is dropped.

  Returns:
    templates: float32 [Q, S, K, size/2, size/2], coverage of each (quadrant,
      shape) shifted by each of the K integer offsets in `_SHIFTS`.
    areas: float64 [Q, S], pixel area of each unshifted template.
    ideal_score: float64 [Q, S], un-normalised score A - B + w * S of the
      unshifted template itself; the reward is divided by it.
  """
  half = size // 2
  templates = np.zeros((len(_QUADRANT_NAMES), len(SHAPES), len(_SHIFTS), half, half), np.float32)
  for qi, q in enumerate(_QUADRANT_NAMES):
    r0, r1, c0, c1 = quadrant_box(q, size)
    for si, s in enumerate(SHAPES):
      for ki, (dy, dx) in enumerate(_SHIFTS):
        templates[qi, si, ki] = shape_coverage(s, q, size, dx=dx, dy=dy)[r0:r1, c0:c1]
  ideal = templates[:, :, _SHIFTS.index((0, 0))]  # [Q, S, h, h]
  areas = ideal.sum(axis=(-2, -1), dtype=np.float64)
  # Score of the ideal rendering itself: A = 1, B = 0, S = 1 - best other IoU.
  iou = soft_iou(ideal[:, :, None, None], templates[:, None]).max(axis=-1)  # [Q, S, S]
  best_other = np.where(np.eye(len(SHAPES), dtype=bool), -np.inf, iou).max(axis=-1)
  ideal_score = 1.0 + SHAPE_WEIGHT * (1.0 - best_other.astype(np.float64))
  return templates, areas, ideal_score


def _split_quadrants(a: np.ndarray) -> np.ndarray:
  """[N, H, W] -> [N, 4, H/2, W/2], quadrants in `QUADRANTS` order (row-major)."""
  n, h, w = a.shape
  return a.reshape(n, 2, h // 2, 2, w // 2).transpose(0, 1, 3, 2, 4).reshape(n, 4, h // 2, w // 2)


def to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float [0, 1] images -> float64 in [0, 1] (floats are clipped)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float64) / 255.0
  return np.clip(images.astype(np.float64), 0.0, 1.0)


def colour_mass(images: np.ndarray, colour_idx: np.ndarray) -> np.ndarray:
  """Per-pixel amount of each image's target colour, m(p) in the module docstring.

  Args:
    images: float [N, H, W, 3] in [0, 1].
    colour_idx: int [N], index into `COLOURS`.

  Returns:
    float64 [N, H, W] in [0, 1].
  """
  brightness = images.max(axis=-1)
  chroma = images / np.maximum(brightness, _EPS)[..., None]
  dist2 = ((chroma - _CHROMA[colour_idx][:, None, None, :]) ** 2).sum(axis=-1)
  return np.exp(-dist2 / SIGMA2) * brightness


def reward_terms(images: np.ndarray, specs: Sequence[PromptSpec]) -> dict[str, np.ndarray]:
  """The reward's components A, B, S (see module docstring) and their total.

  Args:
    images: [N, H, W, 3], uint8 or float in [0, 1], H == W even.
    specs: N prompts, one per image.

  Returns:
    Dict of float64 [N] arrays: "colour_in" (A), "outside" (B), "iou_right",
    "iou_other" (best over the wrong shapes), "shape" (S), "blank_penalty" (P),
    all un-normalised, and "reward", the normalised total.
  """
  x = to_unit_float(images)
  if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
    raise ValueError(f"Expected images [N, H, H, 3], got shape {x.shape}.")
  if len(specs) != x.shape[0]:
    raise ValueError(f"Got {x.shape[0]} images but {len(specs)} prompts.")
  templates, areas, ideal_score = _templates(x.shape[1])
  ci = np.asarray([_COLOUR_NAMES.index(s.colour) for s in specs], dtype=np.int64)
  si = np.asarray([SHAPES.index(s.shape) for s in specs], dtype=np.int64)
  qi = np.asarray([_QUADRANT_NAMES.index(s.quadrant) for s in specs], dtype=np.int64)
  rows = np.arange(len(specs))
  area = areas[qi, si]  # [N]

  # Colour mass in the target quadrant only: [N, H/2, W/2].
  mass_in = _split_quadrants(colour_mass(x, ci))[rows, qi]
  ratio = mass_in.sum(axis=(-2, -1)) / area
  colour_in = np.minimum(ratio, 1.0 / np.maximum(ratio, _EPS))
  # Everything drawn outside it = all brightness minus the target quadrant's.
  brightness = _split_quadrants(x.max(axis=-1)).sum(axis=(-2, -1))  # [N, 4]
  outside = (brightness.sum(axis=-1) - brightness[rows, qi]) / area
  ink = brightness.sum(axis=-1) / area
  blank_penalty = BLANK_PENALTY * np.maximum(0.0, 1.0 - ink / HALF)

  # IoU against every shape, best over integer shifts: [N, S]. float32 halves the work.
  iou = soft_iou(mass_in[:, None, None].astype(np.float32), templates[qi]).max(axis=-1)
  iou_right = iou[rows, si].astype(np.float64)
  others = np.where(np.arange(len(SHAPES)) == si[:, None], -np.inf, iou)
  iou_other = others.max(axis=-1).astype(np.float64)
  shape = iou_right - iou_other
  total = (colour_in - outside + SHAPE_WEIGHT * shape - blank_penalty) / ideal_score[qi, si]
  return {
    "colour_in": colour_in,
    "outside": outside,
    "iou_right": iou_right,
    "iou_other": iou_other,
    "shape": shape,
    "blank_penalty": blank_penalty,
    "reward": total,
  }


def reward(images: np.ndarray, specs: Sequence[PromptSpec]) -> np.ndarray:
  """Scores how well each image shows its prompt; see the module docstring.

  Args:
    images: [N, H, W, 3], uint8 or float in [0, 1] (floats are clipped), H == W even.
    specs: N prompts, one per image.

  Returns:
    float64 [N]: 1 for the ideal rendering, ~0.87 for jittered ground truth,
    0 for the wrong colour in the right place, ~-0.9 for the right picture in
    the wrong quadrant, lower still for more stray ink, ~-1.8 for a blank image.
  """
  return reward_terms(images, specs)["reward"]


def _score_prompts(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  from dpo_jax.toy import world

  return reward(images, [world.parse_prompt(p) for p in prompts])


score_registry.register("toy_reward", _score_prompts, True)
