"""A transformers CLIP model folder as the scorers and Diffusion-RPO use it.

The folder (`CLIPModel.save_pretrained` / the hub snapshot): `config.json`
(CLIPConfig), weights (converted by `models.loader` with our naming),
`preprocessor_config.json` (CLIPImageProcessor fields) and the tokenizer files.
Image preprocessing is CLIPImageProcessor's, reimplemented from that file:
resize the shortest side with PIL (`resample`, bicubic in every CLIP
checkpoint), centre crop to `crop_size` (zero padding if smaller), `*
rescale_factor`, then `(x - image_mean) / image_std` in float32. Here, in
`models/`, so that the data side (RPO's frozen image embeddings) and the
scorers share it and the data side imports no scorer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dpo_jax.models import clip as clip_lib
from dpo_jax.models import loader

Params = dict[str, Any]
ImagesLike = np.ndarray | Sequence[np.ndarray]
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
  """The fields of a `preprocessor_config.json` that CLIP preprocessing uses.

  Attributes:
    shortest_edge: resize so the shorter side has this length (None: no resize).
    crop_size: (height, width) of the centre crop (None: no crop).
    resample: PIL resampling filter id (3 = bicubic).
    rescale_factor: multiplies uint8 values (1/255), None: no rescale.
    mean, std: per-channel normalisation (None: no normalisation).
  """

  shortest_edge: int | None = 224
  crop_size: tuple[int, int] | None = (224, 224)
  resample: int = 3
  rescale_factor: float | None = 1 / 255
  mean: tuple[float, float, float] | None = (0.48145466, 0.4578275, 0.40821073)
  std: tuple[float, float, float] | None = (0.26862954, 0.26130258, 0.27577711)


def _size_field(value: Any, path: str) -> tuple[int, int] | int | None:
  """`size` / `crop_size`: an int, {"shortest_edge": n} or {"height", "width"}."""
  if value is None or isinstance(value, int):
    return value
  if isinstance(value, dict) and "shortest_edge" in value:
    return int(value["shortest_edge"])
  if isinstance(value, dict) and {"height", "width"} <= value.keys():
    return int(value["height"]), int(value["width"])
  raise ValueError(f"{path}: unsupported size field {value!r}.")


def read_preprocessing(directory: str) -> ImagePreprocessing:
  """`ImagePreprocessing` from `directory/preprocessor_config.json`.

  Only what CLIPImageProcessor does is accepted: a resize to a square (legacy
  `size: {"height", "width"}`) or of the shortest edge, and a centre crop.
  """
  path = os.path.join(directory, PREPROCESSOR_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Missing {path}: the CLIP model folder must carry its CLIPImageProcessor config "
      "(resize, crop, mean, std), as saved by `CLIPImageProcessor.save_pretrained`."
    )
  with open(path) as f:
    cfg = json.load(f)
  size = _size_field(cfg.get("size"), path) if cfg.get("do_resize", True) else None
  if isinstance(size, tuple):
    raise ValueError(f"{path}: resize to a fixed (height, width) is not CLIP's; got {size}.")
  crop = _size_field(cfg.get("crop_size"), path) if cfg.get("do_center_crop", True) else None
  crop = (crop, crop) if isinstance(crop, int) else crop
  rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
  normalize = cfg.get("do_normalize", True)
  return ImagePreprocessing(
    shortest_edge=size,
    crop_size=crop,
    resample=int(cfg.get("resample", 3)),
    rescale_factor=rescale,
    mean=tuple(cfg["image_mean"]) if normalize else None,
    std=tuple(cfg["image_std"]) if normalize else None,
  )


def resize_shortest_edge(image: np.ndarray, size: int, resample: int) -> np.ndarray:
  """uint8 [H,W,3] -> uint8 with the shorter side `size` (longer side floored, as transformers)."""
  h, w = image.shape[:2]
  short, long = min(h, w), max(h, w)
  new_long = int(size * long / short)
  new_h, new_w = (new_long, size) if w <= h else (size, new_long)
  img = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling(resample))
  return np.asarray(img)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H,W,C] -> [h,w,C] centred (top/left floored); zero-padded first when smaller."""
  h, w = image.shape[:2]
  ch, cw = size
  if h < ch or w < cw:
    ph, pw = max(ch, h), max(cw, w)
    padded = np.zeros((ph, pw) + image.shape[2:], image.dtype)
    top, left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
    padded[top : top + h, left : left + w] = image
    image, h, w = padded, ph, pw
  top, left = (h - ch) // 2, (w - cw) // 2
  return image[top : top + ch, left : left + cw]


def preprocess_image(image: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
  """One uint8 [H,W,3] image -> float32 [h,w,3] model input."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Expected a uint8 [H,W,3] image, got {image.dtype} {image.shape}.")
  if spec.shortest_edge is not None:
    image = resize_shortest_edge(image, spec.shortest_edge, spec.resample)
  if spec.crop_size is not None:
    image = center_crop(image, spec.crop_size)
  x = image.astype(np.float32)
  if spec.rescale_factor is not None:
    # transformers multiplies in float64, then casts back to float32.
    x = (image.astype(np.float64) * spec.rescale_factor).astype(np.float32)
  if spec.mean is not None:
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
  return x


def preprocess_images(images: ImagesLike, spec: ImagePreprocessing) -> np.ndarray:
  """uint8 images (any sizes) -> float32 [N,h,w,3] (NHWC, what the Flax vision tower takes)."""
  return np.stack([preprocess_image(img, spec) for img in images])


# ---------------------------------------------------------------------------
# CLIP in Flax.


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
  """A loaded transformers CLIP model folder.

  Attributes:
    module: `models.clip.CLIPModel` (linen); apply with `{"params": params}`.
    params: nested dict of arrays (`text_model`, `vision_model`,
      `text_projection`, `visual_projection`, `logit_scale`).
    config: its `models.clip.CLIPConfig`.
    preprocessing: image preprocessing from `preprocessor_config.json`.
    tokenizer: `models.tokenizer.CLIPTokenizer`, or None when not loaded.
  """

  module: clip_lib.CLIPModel
  params: Params
  config: clip_lib.CLIPConfig
  preprocessing: ImagePreprocessing
  tokenizer: Any = None


def load_clip(
  directory: str,
  *,
  with_tokenizer: bool = True,
  param_dtype: loader.DTypeLike = jnp.float32,
  dtype: loader.DTypeLike = jnp.float32,
) -> ClipModel:
  """Loads a transformers CLIP model folder into Flax (no hub, no random init).

  Weights go through `dpo_jax.models.loader.load_clip` (safetensors read as
  numpy, PyTorch names mapped by `models.naming` against the abstract
  parameter tree), so a missing or misshapen tensor is an error naming it.
  """
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"Missing {config_path}: not a transformers CLIP model folder.")
  module, params = loader.load_clip(directory, param_dtype=param_dtype, dtype=dtype)
  tokenizer = loader.load_tokenizer(directory) if with_tokenizer else None
  return ClipModel(module, params, module.config, read_preprocessing(directory), tokenizer)


def image_embeds(module: clip_lib.CLIPModel, params: Params, pixels: jax.Array) -> jax.Array:
  """Projected CLIP image embeddings (not normalised): [B,h,w,3] NHWC -> [B,D]."""
  return module.apply({"params": params}, pixels, method="get_image_features")


def clip_image_embedder(directory: str) -> tuple[Callable[[Params, jax.Array], jax.Array], Params]:
  """Diffusion-RPO's frozen image tower: -> (embed(params, pixels), params).

  `embed` takes training pixels [B, R, R, 3] in [-1, 1] (already cropped square
  by the data pipeline) and returns projected CLIP image embeddings [B, D],
  jittable: bicubic resize to the folder's crop size on device, then the
  folder's mean / std. For a square image this is CLIPImageProcessor's resize +
  centre crop up to the resampling filter (antialiased jax resize vs PIL).
  The text tower's params are left out (not needed).
  """
  clip = load_clip(directory, with_tokenizer=False)
  spec = clip.preprocessing
  size = clip.config.vision_config.image_size
  h, w = spec.crop_size or (size, size)
  mean = jnp.asarray(spec.mean or (0.0, 0.0, 0.0), jnp.float32)
  std = jnp.asarray(spec.std or (1.0, 1.0, 1.0), jnp.float32)
  # logit_scale: a scalar the module's setup binds even when unused.
  params = {k: clip.params[k] for k in ("vision_model", "visual_projection", "logit_scale")}

  def embed(params: Params, pixels: jax.Array) -> jax.Array:
    x = (pixels.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != (h, w):
      x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "bicubic")
    return image_embeds(clip.module, params, (x - mean) / std)

  return embed, params


def text_embeds(
  module: clip_lib.CLIPModel, params: Params, ids: jax.Array, mask: jax.Array
) -> jax.Array:
  """Projected CLIP text embeddings (not normalised): ids/mask [B,L] -> [B,D]."""
  return module.apply({"params": params}, ids, mask, method="get_text_features")
