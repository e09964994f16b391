"""Safe image decoding and the per-pair checks of a preference row.

Shared by the dataset build (`pickapic.py` runs `check_row` on every row and
keeps what passes) and the input pipeline (`pipeline.py`, which decodes it). Every way a row can
be unusable has a named skip reason so that the data report can count it.

Pillow's own safety stays on: `ImageFile.LOAD_TRUNCATED_IMAGES` must be False
(a truncated JPEG would otherwise decode to a half-grey image and train the
model on it) and every image's header size is checked against a finite pixel
limit *before* any pixel is decoded, which is what stops decompression bombs.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageFile

# Skip reasons in the order the checks run; a row is counted under the first
# reason that applies.
SKIP_REASONS = (
  "null_label",  # label_0 or label_1 is null.
  "bad_label",  # Not in {0, 0.5, 1}, NaN, or label_0 + label_1 != 1.
  "tie",  # label_0 == 0.5: no preference to learn from.
  "missing_caption",  # Null caption (kept as "" only if configured).
  "empty_caption",  # Empty or whitespace-only caption (idem).
  "missing_image",  # Null image bytes.
  "zero_byte_image",
  "identical_images",  # Byte-equal jpg_0 and jpg_1: the DPO term is 0 by construction.
  "non_image",  # Not a decodable image of an allowed format.
  "oversized_image",  # Header says more than max_image_pixels (decompression bomb).
  "truncated_image",
  "corrupt_image",  # Any other decoder error.
)
# What `decode_rgb` can say about one image: every tool that decodes (the
# build, relabelling, style sets) names a bad image the same way.
IMAGE_REASONS = (
  "missing_image",
  "zero_byte_image",
  "non_image",
  "oversized_image",
  "truncated_image",
  "corrupt_image",
)

# Pick-a-Pic images are at most ~1.5k px a side; 4096^2 leaves room for other
# preference sets and stays well under Pillow's own 89.5 MP bomb warning.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
VALID_LABELS = (0.0, 0.5, 1.0)


class ImageRejected(Exception):
  """An image that must not be used; `reason` is one of `IMAGE_REASONS`."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def _assert_pillow_safety() -> None:
  # Another import may have flipped this process-wide switch; decoding on would
  # silently accept truncated files, so refuse rather than guess.
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError(
      "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images would be "
      "used silently. Something imported before dpo_jax.data set it; unset it."
    )


def _rejected(e: Exception) -> ImageRejected:
  # Pillow signals truncation only through the message ("image file is
  # truncated", "Truncated File Read"), from the header parser or the decoder.
  reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
  return ImageRejected(reason, f"{type(e).__name__}: {e}")


def to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode -> RGB.

  Alpha (RGBA, LA, P with transparency) is composited onto white: a plain
  `convert("RGB")` drops alpha and exposes whatever colour the transparent
  pixels happen to store (often black), which is not what a viewer saw.
  """
  if img.mode == "RGB":
    return img
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def decode_rgb(
  data: bytes | None,
  *,
  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
  formats: Sequence[str] = ALLOWED_FORMATS,
  draft_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, tuple[int, int], str]:
  """Decodes image bytes fully and safely.

  Args:
    data: encoded image (None or b"" are rejected as missing / zero-byte).
    max_pixels: reject images whose header declares more pixels than this.
    formats: Pillow format names accepted (others count as `non_image`).
    draft_size: (w, h); for JPEG, let libjpeg decode at the smallest 1/2, 1/4
      or 1/8 DCT scale that is still at least this large (much faster for
      large images that will be downscaled anyway).

  Returns:
    (RGB image, (original_h, original_w) from the header, original mode).

  Raises:
    ImageRejected: with the reason the image cannot be used.
  """
  _assert_pillow_safety()
  if data is None:
    raise ImageRejected("missing_image", "null image bytes")
  if len(data) == 0:
    raise ImageRejected("zero_byte_image", "zero bytes")
  try:
    img = Image.open(io.BytesIO(data), formats=list(formats))
  except Image.DecompressionBombError as e:
    raise ImageRejected("oversized_image", str(e)) from None
  except (Image.UnidentifiedImageError, ValueError, TypeError) as e:
    raise ImageRejected("non_image", str(e)) from None
  except Exception as e:  # header parsers raise many types.
    raise _rejected(e) from None
  w, h = img.size
  # The header check happens before `load()`: this is what makes a 30000^2
  # JPEG of a few hundred bytes cheap to reject.
  if w <= 0 or h <= 0:
    raise ImageRejected("corrupt_image", f"size {w}x{h}")
  if w * h > max_pixels:
    raise ImageRejected("oversized_image", f"{w}x{h} > max_image_pixels={max_pixels}")
  mode = img.mode
  try:
    if draft_size is not None and img.format == "JPEG":
      img.draft("RGB", draft_size)
    img.load()
  except Image.DecompressionBombError as e:
    raise ImageRejected("oversized_image", str(e)) from None
  except Exception as e:  # decoders raise OSError, SyntaxError, struct.error...
    raise _rejected(e) from None
  return to_rgb(img), (h, w), mode


def check_labels(label_0: float | None, label_1: float | None) -> str | None:
  """Skip reason for a label pair, or None if it states a strict preference."""
  if label_0 is None or label_1 is None:
    return "null_label"
  l0, l1 = float(label_0), float(label_1)
  if math.isnan(l0) or math.isnan(l1) or l0 not in VALID_LABELS or l1 not in VALID_LABELS:
    return "bad_label"
  if l0 + l1 != 1.0:
    return "bad_label"
  if l0 == 0.5:
    return "tie"
  return None


def check_caption(caption: str | bytes | None, keep_empty: bool) -> tuple[str | None, str]:
  """-> (skip reason or None, caption to store)."""
  if caption is None:
    return (None if keep_empty else "missing_caption"), ""
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8", errors="replace")
  if not caption.strip():
    return (None if keep_empty else "empty_caption"), ""
  return None, caption


def check_image_bytes(jpg_0: bytes | None, jpg_1: bytes | None) -> tuple[str, str] | None:
  """Cheap byte-level checks, before any decoding. -> (reason, detail) or None."""
  for name, data in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
    if data is None:
      return "missing_image", name
  for name, data in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
    if len(data) == 0:
      return "zero_byte_image", name
  if jpg_0 == jpg_1:
    return "identical_images", f"{len(jpg_0)} bytes"
  return None


@dataclasses.dataclass(frozen=True)
class RowCheck:
  """Verdict on one row.

  Attributes:
    reason: one of `SKIP_REASONS`, or None when the row is kept.
    detail: what failed (which image, the decoder's message, the labels).
    caption: the caption to store (kept rows).
    modes: Pillow modes of (jpg_0, jpg_1) before RGB conversion (kept rows).
    sizes: (h, w) of (jpg_0, jpg_1) (kept rows).
  """

  reason: str | None
  detail: str = ""
  caption: str = ""
  modes: tuple[str, ...] = ()
  sizes: tuple[tuple[int, int], ...] = ()


def check_row(
  row: Mapping[str, Any],
  keep_empty_captions: bool = False,
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
  allowed_formats: Sequence[str] = ALLOWED_FORMATS,
) -> RowCheck:
  """Runs every check of `SKIP_REASONS` in order; decodes both images fully.

  Full decoding is the only way to find truncated or corrupt entropy data;
  it is done once here so the training pipeline never meets a bad image.
  """
  reason = check_labels(row["label_0"], row["label_1"])
  if reason:
    return RowCheck(reason, f"label_0={row['label_0']!r} label_1={row['label_1']!r}")
  reason, caption = check_caption(row["caption"], keep_empty_captions)
  if reason:
    return RowCheck(reason)
  bad = check_image_bytes(row["jpg_0"], row["jpg_1"])
  if bad:
    return RowCheck(*bad)
  modes, sizes = [], []
  for name in ("jpg_0", "jpg_1"):
    try:
      _, size, mode = decode_rgb(row[name], max_pixels=max_image_pixels, formats=allowed_formats)
    except ImageRejected as e:
      return RowCheck(e.reason, f"{name}: {e.detail}")
    modes.append(mode)
    sizes.append(size)
  return RowCheck(None, caption=caption, modes=tuple(modes), sizes=tuple(sizes))
