"""Reward models ("scorers") for generated images, in Flax, from local folders.

  scorer = make_scorer("pickscore", "/models/PickScore_v1")
  scores = scorer(images, prompts)       # uint8 [N,H,W,3] (or a list of [H,W,3]), N prompts -> [N]

Every scorer reads a folder on disk (nothing is downloaded) and runs one
jitted function per fixed-size batch (the last batch is padded by repeating
its last row, and the padding is dropped), so a whole evaluation compiles once.

  clip_score    transformers CLIP model folder; 100 * max(cos(image, text), 0), in [0, 100]
                (the torchmetrics CLIPScore convention)
  pickscore     transformers CLIP model folder (PickScore_v1 is a CLIP-H/14);
                exp(logit_scale) * cos(image, text) (the PickScore repo's inference example)
  aesthetic     CLIP ViT-L/14 folder + aesthetic_mlp.safetensors; the LAION improved
                aesthetic predictor, MLP(l2_normalize(image embedding)) (prompt ignored)
  hpsv2, image_reward   registered only to say which package and weights they need

A "transformers CLIP model" folder is what `CLIPModel.save_pretrained` /
the hub snapshot holds: `config.json` (CLIPConfig), weights
(`model.safetensors` with PyTorch names, converted without torch by
`dpo_jax.models.loader`; or `pytorch_model.bin` (needs torch) or
`flax_model.msgpack`), `preprocessor_config.json` (CLIPImageProcessor fields)
and the CLIP tokenizer files (`vocab.json`, `merges.txt`; not needed by
`aesthetic`).

Image preprocessing is CLIPImageProcessor's, reimplemented from the folder's
`preprocessor_config.json`: resize the shortest side to `size.shortest_edge`
with PIL (`resample`, bicubic in every CLIP checkpoint; this is also what
transformers does internally for uint8 images), centre crop to `crop_size`
(zero padding if smaller, as transformers does), `* rescale_factor` then
`(x - image_mean) / image_std` in float32. Prompts are tokenized by
`models.tokenizer` (cleaned as openai/CLIP does) to the text model's
`max_position_embeddings` (77) with truncation; padding beyond the end token
does not change CLIP's pooled (end-token) output because of the causal mask.
The model is `models.clip.CLIPModel`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from PIL import Image

from dpo_jax.models import clip as clip_lib
from dpo_jax.models import loader

Params = dict[str, Any]
ImagesLike = np.ndarray | Sequence[np.ndarray]

AESTHETIC_MLP_FILE = "aesthetic_mlp.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
_MLP_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


# ---------------------------------------------------------------------------
# Image preprocessing (CLIPImageProcessor, numpy + PIL).


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


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| over the last axis (CLIP's convention: no epsilon)."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity: [B,D], [B,D] -> [B] (float32)."""
  a, b = l2_normalize(a.astype(jnp.float32)), l2_normalize(b.astype(jnp.float32))
  return jnp.sum(a * b, axis=-1)


def clip_score_from_embeds(img: jax.Array, txt: jax.Array) -> jax.Array:
  """torchmetrics CLIPScore per pair: 100 * max(cos(image, text), 0).  [B]."""
  return 100.0 * jnp.maximum(cosine(img, txt), 0.0)


def pickscore_from_embeds(img: jax.Array, txt: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """PickScore per pair: exp(logit_scale) * cos(image, text).  [B]."""
  return jnp.exp(logit_scale.astype(jnp.float32)) * cosine(img, txt)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
  """Prompts -> {"ids", "mask"}: int32 [N, max_length], truncated and padded."""
  out = tokenizer(list(prompts), max_length=max_length)
  return {"ids": out["input_ids"].astype(np.int32), "mask": out["attention_mask"].astype(np.int32)}


# ---------------------------------------------------------------------------
# LAION improved aesthetic predictor.


def load_aesthetic_mlp(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """The aesthetic MLP's linear layers from a safetensors file, in order.

  Expected keys are the original `sac+logos+ava1-l14-linearMSE.pth`'s
  (`nn.Sequential` named `layers`: Linear 768->1024, Dropout, Linear ->128,
  Dropout, Linear ->64, Dropout, Linear ->16, Linear ->1; no activations):
  `layers.{0,2,4,6,7}.weight` ([out, in], PyTorch layout) and `.bias` ([out]).
  Convert the .pth once with
    `safetensors.torch.save_file(torch.load(pth, map_location="cpu"), "aesthetic_mlp.safetensors")`.

  Returns:
    [(kernel [in, out] float32, bias [out] float32)] in layer order.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Missing {path}: the LAION aesthetic MLP as safetensors (keys layers.N.weight/bias)."
    )
  state = safetensors.numpy.load_file(path)
  layers: dict[int, dict[str, np.ndarray]] = {}
  for key, value in sorted(state.items()):
    m = _MLP_KEY.match(key)
    if m is None:
      raise ValueError(f"{path}: unexpected tensor {key!r}; expected layers.N.weight / .bias.")
    layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
  out, width = [], None
  for i in sorted(layers):
    if set(layers[i]) != {"weight", "bias"}:
      raise ValueError(f"{path}: layer {i} has {sorted(layers[i])}, expected weight and bias.")
    w, b = layers[i]["weight"], layers[i]["bias"]
    if w.ndim != 2 or b.shape != (w.shape[0],) or (width is not None and w.shape[1] != width):
      raise ValueError(
        f"{path}: layer {i} weight {w.shape} / bias {b.shape} does not continue width {width}."
      )
    width = w.shape[0]
    out.append((np.asarray(w.T, np.float32), np.asarray(b, np.float32)))
  if not out or width != 1:
    raise ValueError(f"{path}: the MLP must end in one output, got width {width}.")
  return out


def aesthetic_mlp(layers: Sequence[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
  """The predictor's MLP in eval mode (dropouts are identities): [B, D] -> [B]."""
  for kernel, bias in layers:
    x = x @ kernel + bias
  return x[:, 0]


# ---------------------------------------------------------------------------
# Scorers.


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` by repeating the last row: one compiled batch shape for all calls."""
  return np.concatenate([a, np.repeat(a[-1:], size - len(a), 0)])


# (params, pixels [B,h,w,3], ids [B,L], mask [B,L]) -> scores [B].
BatchFn = Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Scorer:
  """A reward model: `scorer(images, prompts) -> float64 [N]`.

  Attributes:
    name: registry name.
    params: what `batch_fn` reads (model and head weights).
    batch_fn: jitted `(params, pixels, ids, mask) -> [B]` on a fixed batch size.
    preprocessing: image preprocessing (uint8 -> pixels).
    tokenizer: CLIP tokenizer, or None when the score ignores the prompt.
    max_length: token sequence length.
    batch_size: images per `batch_fn` call.
    uses_prompt: whether the score depends on the prompt.
  """

  name: str
  params: Params
  batch_fn: BatchFn
  preprocessing: ImagePreprocessing
  tokenizer: Any
  max_length: int
  batch_size: int = 32
  uses_prompt: bool = True

  def _text(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    if self.tokenizer is None:  # The batch function ignores them; keep shapes static.
      zeros = np.zeros((len(prompts), 1), np.int32)
      return {"ids": zeros, "mask": zeros}
    return tokenize(self.tokenizer, prompts, self.max_length)

  def __call__(self, images: ImagesLike, prompts: Sequence[str]) -> np.ndarray:
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = slice(start, start + self.batch_size)
      pixels = preprocess_images(images[chunk], self.preprocessing)
      text = self._text(list(prompts[chunk]))
      n = len(pixels)
      args = [_pad_rows(a, self.batch_size) for a in (pixels, text["ids"], text["mask"])]
      out.append(np.asarray(self.batch_fn(self.params, *args), np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float64)


def _clip_scorer(name: str, path: str, head: Callable, batch_size: int, dtype) -> Scorer:
  clip = load_clip(path, dtype=dtype)
  module = clip.module

  def batch_fn(params, pixels, ids, mask):
    img = image_embeds(module, params, pixels)
    txt = text_embeds(module, params, ids, mask)
    return head(img, txt, params["logit_scale"])

  return Scorer(
    name=name,
    params=clip.params,
    batch_fn=jax.jit(batch_fn),
    preprocessing=clip.preprocessing,
    tokenizer=clip.tokenizer,
    max_length=clip.config.text_config.max_position_embeddings,
    batch_size=batch_size,
  )


def make_clip_score(path: str, batch_size: int = 32, dtype=jnp.float32) -> Scorer:
  """CLIPScore (torchmetrics convention): 100 * max(cos(image, text), 0), in [0, 100]."""
  head = lambda img, txt, _: clip_score_from_embeds(img, txt)
  return _clip_scorer("clip_score", path, head, batch_size, dtype)


def make_pickscore(path: str, batch_size: int = 32, dtype=jnp.float32) -> Scorer:
  """PickScore: exp(logit_scale) * cos(image, text) (≈ 100 * cos for PickScore_v1)."""
  return _clip_scorer("pickscore", path, pickscore_from_embeds, batch_size, dtype)


def make_aesthetic(path: str, batch_size: int = 32, dtype=jnp.float32) -> Scorer:
  """LAION improved aesthetic predictor: MLP(l2_normalize(CLIP image embedding)).

  `path` holds a CLIP ViT-L/14 transformers folder (e.g. openai/clip-vit-large-patch14:
  config.json, weights, preprocessor_config.json) plus `aesthetic_mlp.safetensors`
  (see `load_aesthetic_mlp`). The prompt is ignored. The original ran OpenAI's
  `clip` package, whose preprocessing is the same bicubic resize + centre crop
  except that torchvision rounds the crop offset where transformers floors it
  (at most one pixel of shift, only for odd size differences).
  """
  clip = load_clip(path, with_tokenizer=False, dtype=dtype)
  mlp = load_aesthetic_mlp(os.path.join(path, AESTHETIC_MLP_FILE))
  if mlp[0][0].shape[0] != clip.config.projection_dim:
    raise ValueError(
      f"{path}: the MLP takes {mlp[0][0].shape[0]}-d inputs but the CLIP model's "
      f"projection_dim is {clip.config.projection_dim} (the original needs ViT-L/14, 768)."
    )
  module = clip.module

  def batch_fn(params, pixels, ids, mask):
    del ids, mask
    img = image_embeds(module, params["clip"], pixels).astype(jnp.float32)
    return aesthetic_mlp(params["mlp"], l2_normalize(img))

  params = {"clip": clip.params, "mlp": [(jnp.asarray(k), jnp.asarray(b)) for k, b in mlp]}
  return Scorer(
    name="aesthetic",
    params=params,
    batch_fn=jax.jit(batch_fn),
    preprocessing=clip.preprocessing,
    tokenizer=None,
    max_length=1,
    batch_size=batch_size,
    uses_prompt=False,
  )


def _unavailable(name: str, package: str, pip: str, weights: str) -> Callable[..., Scorer]:
  def make(path: str, batch_size: int = 32, dtype=jnp.float32) -> Scorer:
    del batch_size, dtype
    installed = importlib.util.find_spec(package) is not None
    state = (
      "it is installed, but dpo_jax has no wrapper for it yet"
      if installed
      else f"it is not installed (`pip install {pip}`)"
    )
    raise NotImplementedError(
      f"Scorer {name!r} is not available: it needs the `{package}` package ({state}) and its "
      f"weights ({weights}) in {path!r}. Available now: clip_score, pickscore, aesthetic."
    )

  return make


SCORERS: Mapping[str, Callable[..., Scorer]] = {
  "clip_score": make_clip_score,
  "pickscore": make_pickscore,
  "aesthetic": make_aesthetic,
  "hpsv2": _unavailable(
    "hpsv2", "hpsv2", "hpsv2", "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt + OpenCLIP ViT-H-14"
  ),
  "image_reward": _unavailable(
    "image_reward", "ImageReward", "image-reward", "ImageReward.pt and med_config.json (BLIP)"
  ),
}


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionScorer:
  """A model-free score in numpy: `scorer(images, prompts) -> float64 [N]` (same-size images)."""

  name: str
  fn: Callable[[np.ndarray, Sequence[str]], np.ndarray]
  uses_prompt: bool

  def __call__(self, images: ImagesLike, prompts: Sequence[str]) -> np.ndarray:
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    if len(images) == 0:
      return np.zeros((0,), np.float64)
    return np.asarray(self.fn(np.stack(list(images)), list(prompts)), np.float64)


def _toy_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  from dpo_jax.toy import reward, world

  return reward.reward(images, [world.parse_prompt(p) for p in prompts])


def _toy_attribute(metric: str) -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
  def fn(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    from dpo_jax.toy import judge, world

    return judge.accuracy(images, [world.parse_prompt(p) for p in prompts])[metric]

  return fn


def _model_free() -> dict[str, FunctionScorer]:
  """Scorers that need no weights: the style metrics (`data.style`), the toy reward and
  the toy judge's 0 / 1 attribute scores (`toy_colour`, ..., `toy_all_three`, `toy_blank`)."""
  from dpo_jax.data import style

  out = {
    f"style_{name}": FunctionScorer(f"style_{name}", lambda x, _, s=s: s.score(x), False)
    for name, s in style.STYLES.items()
  }
  out["toy_reward"] = FunctionScorer("toy_reward", _toy_reward, True)
  for metric in ("colour", "quadrant", "shape", "all_three", "blank"):  # toy.judge.METRICS
    out[f"toy_{metric}"] = FunctionScorer(f"toy_{metric}", _toy_attribute(metric), True)
  return out


def model_free_scorers() -> list[str]:
  """Names usable without a folder (`--scorers=style_amber_duotone,toy_reward`)."""
  return sorted(_model_free())


def make_scorer(
  name: str, path: str, batch_size: int = 32, dtype=jnp.float32
) -> Scorer | FunctionScorer:
  """The scorer `name` (see `SCORERS`) loaded from the local folder `path`.

  Model-free scorers (`model_free_scorers()`) ignore `path`.
  """
  model_free = _model_free()
  if name in model_free:
    return model_free[name]
  if name not in SCORERS:
    raise ValueError(f"Unknown scorer {name!r}; known: {sorted(SCORERS) + sorted(model_free)}.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Scorer {name!r}: {path!r} is not a folder.")
  return SCORERS[name](path, batch_size=batch_size, dtype=dtype)


def parse_scorer_specs(spec: str | Sequence[str]) -> dict[str, str]:
  """`"clip_score=/m/clip,pickscore=/m/pick"` (or a list of `NAME=PATH`) -> {name: path}.

  Model-free scorers may be given by name alone (path "").
  """
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  out: dict[str, str] = {}
  for item in (i.strip() for i in items):
    if not item:
      continue
    name, sep, path = item.partition("=")
    if not sep and name in model_free_scorers():
      path = ""
    elif not sep or not name or not path:
      raise ValueError(f"Scorer spec {item!r} is not NAME=PATH.")
    if name in out:
      raise ValueError(f"Scorer {name!r} given twice.")
    out[name] = path
  return out
