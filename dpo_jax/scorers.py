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
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from dpo_jax import score_registry
from dpo_jax.models.clip_folder import (  # noqa: F401 - re-exported: the scorers' API.
  PREPROCESSOR_FILE,
  ClipModel,
  ImagePreprocessing,
  center_crop,
  clip_image_embedder,
  image_embeds,
  load_clip,
  preprocess_image,
  preprocess_images,
  read_preprocessing,
  resize_shortest_edge,
  text_embeds,
)

Params = dict[str, Any]
ImagesLike = np.ndarray | Sequence[np.ndarray]

AESTHETIC_MLP_FILE = "aesthetic_mlp.safetensors"
_MLP_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


# ---------------------------------------------------------------------------
# Image preprocessing (CLIPImageProcessor, numpy + PIL).


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


def _model_free() -> dict[str, FunctionScorer]:
  """Scores that need no weights, as registered in `score_registry` by the modules
  that define them (`data.style`, `toy.reward`, `toy.judge`; the entry points
  import those through `builtin_scores.register`)."""
  return {
    n: FunctionScorer(n, score_registry.get(n).fn, score_registry.get(n).uses_prompt)
    for n in score_registry.names()
  }


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
