"""Loads a diffusers-format Stable Diffusion 1.5 / XL folder into Flax modules and params.

Folder layout (the hub layout; `[.V]` is the optional variant, e.g. `.fp16`):
  model_index.json
  unet/, vae/       config.json + diffusion_pytorch_model[.V].safetensors
                    (or diffusion_pytorch_model[.V].bin, or diffusion_flax_model[.V].msgpack)
  text_encoder/     config.json + model[.V].safetensors
                    (or pytorch_model[.V].bin, or flax_model[.V].msgpack)
  text_encoder_2/   SDXL only: CLIPTextModelWithProjection (OpenCLIP bigG)
  tokenizer/, tokenizer_2/ (SDXL): CLIP BPE files
  scheduler/scheduler_config.json

The models are ours (`models.unet2d`, `models.vae`, `models.clip`,
`models.tokenizer`; no diffusers or transformers code at run time), each built
from the folder's own config and tokenizer files. Tensors are read as numpy
(`safetensors.numpy`; torch only for `.bin`) and fed, one by one, to the one
PyTorch -> Flax rule (`models.naming`: names, conv/linear transposes) against
the model's *abstract* parameter tree from `jax.eval_shape`, so nothing is
random-initialised first (minutes and gigabytes for the SDXL UNet).
Every parameter must then be present with its exact shape, so a config/weights
mismatch fails loudly with the file, key and shapes in the message.

Parameters come back as plain nested dicts of jnp arrays in `param_dtype`
(float32 by default, whatever the file stores); `dtype` is the modules'
compute dtype, as in `dpo_jax.models.unet`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax.traverse_util import flatten_dict, unflatten_dict

from dpo_jax.models import clip, naming
from dpo_jax.models import tokenizer as tokenizer_lib
from dpo_jax.models import vae as vae_lib
from dpo_jax.models.unet import parse_dtype
from dpo_jax.models.unet2d import UNet2DConditionModel

Params = dict[str, Any]
DTypeLike = str | jnp.dtype | type

KINDS = ("sd15", "sdxl")
# The noise-prediction targets a scheduler config may name that this package trains
# and samples (`diffusion.training_target`, `sampler`); "sample" is refused.
PREDICTION_TYPES = ("epsilon", "v_prediction")

# (safetensors, torch pickle, Flax msgpack) file names of each library.
DIFFUSERS_WEIGHTS = (
  "diffusion_pytorch_model.safetensors",
  "diffusion_pytorch_model.bin",
  "diffusion_flax_model.msgpack",
)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")

# Non-parameter buffers that PyTorch checkpoints may carry.
_IGNORED_BUFFERS = ("position_ids", "num_batches_tracked")


# eq=False: identity hashing/equality (comparing parameter trees by value is meaningless).
@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """A loaded SD1.5 / SDXL pipeline: Flax modules, their params and the rest.

  Attributes:
    kind: "sd15" (one text encoder; SD 1.x / 2.x structure) or "sdxl".
    unet: `unet2d.UNet2DConditionModel`; apply with `{"params": unet_params}`.
    vae: `models.vae.AutoencoderKL`, or None for a pixel-space pipeline (`model_index.json`
      lists `"vae": [null, null]`; the UNet then works on images in [-1, 1]).
    text_encoder: `models.clip.CLIPTextModel`, CLIP ViT-L for SD1.5 / SDXL.
    tokenizer: `models.tokenizer.CLIPTokenizer` of `text_encoder`.
    scheduler_config: `scheduler/scheduler_config.json` without "_" keys,
      always with "prediction_type"; feeds `diffusion.make_noise_schedule`.
    vae_scaling_factor: latents = VAE mean/sample * this (0.18215 / 0.13025;
      1.0 without a VAE).
    text_encoder_2, tokenizer_2: SDXL's OpenCLIP bigG (`CLIPTextModelWithProjection`), else None.
    path: the folder it came from.
  """

  kind: str
  unet: UNet2DConditionModel
  unet_params: Params
  vae: vae_lib.AutoencoderKL | None
  vae_params: Params | None
  text_encoder: clip.CLIPTextModel
  text_encoder_params: Params
  tokenizer: tokenizer_lib.CLIPTokenizer
  scheduler_config: dict[str, Any]
  vae_scaling_factor: float
  text_encoder_2: clip.CLIPTextModelWithProjection | None = None
  text_encoder_2_params: Params | None = None
  tokenizer_2: tokenizer_lib.CLIPTokenizer | None = None
  path: str = ""


def _as_dtype(dtype: DTypeLike) -> jnp.dtype:
  return parse_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Missing file {path}.")
  with open(path) as f:
    return json.load(f)


def add_variant(filename: str, variant: str | None) -> str:
  """`model.safetensors` -> `model.fp16.safetensors` (diffusers/transformers naming)."""
  if not variant:
    return filename
  stem, ext = filename.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def find_weights(directory: str, names: tuple[str, str, str], variant: str | None = None) -> str:
  """Path of the weights file in `directory`, preferring safetensors, then .bin, then msgpack.

  Sharded checkpoints (`<name>.index.json`) are found too. Raises
  FileNotFoundError naming the folder, every file name that was accepted, and
  the variants whose files the folder does hold (a hub folder with only
  `*.fp16.safetensors` needs `variant="fp16"`).
  """
  candidates = []
  for name in names:
    candidates.append(add_variant(name, variant))
    if not name.endswith(".msgpack"):
      candidates.append(add_variant(name + ".index.json", variant))
  for candidate in candidates:
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No weights in {directory}: the folder does not exist.")
  present = sorted(os.listdir(directory))
  raise FileNotFoundError(
    f"No weights in {directory}: expected one of {candidates} (found: {present}). "
    + variant_hint(weight_variants(present, names), variant)
  )


def weight_variants(filenames: list[str], names: tuple[str, ...]) -> list[str]:
  """The weights variants among `filenames`: "" for plain files, else e.g. "fp16".

  `names` are the plain file names (`DIFFUSERS_WEIGHTS` / `TRANSFORMERS_WEIGHTS`);
  a variant `V` is `<stem>.V.<ext>` or, sharded, `<name>.index.V.json`.
  """
  found = set()
  for name in names:
    stem, ext = name.rsplit(".", 1)
    plain = re.compile(rf"^{re.escape(name)}(\.index\.json)?$")
    with_variant = re.compile(
      rf"^(?:{re.escape(stem)}\.(?P<a>[^.]+)\.{re.escape(ext)}"
      rf"|{re.escape(name)}\.index\.(?P<b>[^.]+)\.json)$"
    )
    for f in filenames:
      if plain.match(f):
        found.add("")
      elif m := with_variant.match(f):
        found.add(m.group("a") or m.group("b"))
  return sorted(found)


def variant_hint(found: list[str], variant: str | None) -> str:
  """What to do about a weights variant mismatch, from the variants a folder holds."""
  if not found:
    return "No weights file of any variant is there."
  listed = ", ".join(f"{v!r}" if v else "'' (the plain files)" for v in found)
  # Suggest a named variant, unless a variant was asked for and plain files exist.
  v = next((v for v in found if v), "") if not variant or "" not in found else ""
  flag = v or "''"
  return (
    f"Variants found: {listed}; load with variant={v!r} (--config.pretrained_variant={flag} "
    f"for train / cache, --pretrained_variant={flag} for sample / export)."
  )


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{path} is a PyTorch pickle and reading it needs torch (`pip install torch`); "
      "or convert the folder to safetensors."
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  # numpy has no bfloat16: widen, the cast to param_dtype happens later anyway.
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def weight_files(path: str) -> list[str]:
  """The tensor files behind a weights path: the file itself, or a sharded index's shards."""
  if not path.endswith(".index.json"):
    return [path]
  directory = os.path.dirname(path)
  shards = sorted(set(_read_json(path)["weight_map"].values()))
  return [os.path.join(directory, shard) for shard in shards]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """PyTorch-named tensors of a `.safetensors`, `.bin` or sharded `*.index.json` file."""
  if path.endswith(".index.json"):
    state = {}
    for shard in weight_files(path):
      state.update(read_state_dict(shard))
    return state
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Missing file {path}.")
  if path.endswith(".safetensors"):
    return safetensors.numpy.load_file(path)
  if path.endswith(".bin"):
    return _torch_load(path)
  raise ValueError(f"Unknown weights format: {path}.")


RenameFn = Callable[[str, np.ndarray, dict], tuple[tuple[str, ...], np.ndarray]]


def _shape_error(source: str, key: str, got: tuple, flax_key: tuple, want: tuple, config: str):
  return ValueError(
    f"{source}: tensor {key!r} has shape {got} (Flax {'/'.join(flax_key)}) but the model "
    f"built from {config} expects {want}."
  )


def _check_complete(flat: dict, expected: dict, unexpected: list[str], source: str, config: str):
  missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
  if missing:
    raise ValueError(
      f"{source} lacks {len(missing)} parameter(s) that the model built from {config} needs, "
      f"e.g. {missing[:5]}. Are the weights and config.json from the same checkpoint?"
    )
  if unexpected:
    raise ValueError(
      f"{source} has {len(unexpected)} tensor(s) that the model built from {config} does not "
      f"use, e.g. {sorted(unexpected)[:5]}. Are the weights and config.json from the same "
      "checkpoint, and does the Flax class support this architecture?"
    )


def convert_pt_state_dict(
  state: dict[str, np.ndarray],
  abstract_params: Params,
  rename: RenameFn,
  source: str,
  config: str,
) -> dict[tuple[str, ...], np.ndarray]:
  """PyTorch-named numpy tensors -> flat {Flax path: array}, fully checked.

  Args:
    state: {"down_blocks.0.resnets.0.conv1.weight": array, ...}.
    abstract_params: the module's parameter tree of ShapeDtypeStructs.
    rename: the library's per-tensor rule, `(pt_key, tensor, expected) ->
      (flax_key, tensor)` (transposes conv [O,I,H,W] -> [H,W,I,O], linear -> .T).
    source, config: file names for error messages.
  """
  expected = flatten_dict(abstract_params)
  flat, unexpected = {}, []
  for pt_key, tensor in state.items():
    flax_key, value = rename(pt_key, tensor, expected)
    if flax_key not in expected:
      if pt_key.rsplit(".", 1)[-1] not in _IGNORED_BUFFERS:
        unexpected.append(pt_key)
      continue
    if value.shape != expected[flax_key].shape:
      raise _shape_error(source, pt_key, tensor.shape, flax_key, expected[flax_key].shape, config)
    flat[flax_key] = value
  _check_complete(flat, expected, unexpected, source, config)
  return flat


def _legacy_msgpack_path(path: tuple[str, ...]) -> tuple[str, ...]:
  """A path of a msgpack written by diffusers' / transformers' Flax classes -> ours.

  transformers named list entries by a bare number (`encoder/layers/0/...`,
  ours `encoder/layers_0/...`); diffusers' VAE attention used
  `query/key/value/proj_attn` (`naming.legacy_flax_path`).
  """
  return naming.legacy_flax_path(naming.flax_module_path(".".join(path)))


def _read_flax_msgpack(path: str, abstract_params: Params, config: str) -> dict:
  """A Flax msgpack checkpoint -> flat {Flax path: array}, fully checked."""
  with open(path, "rb") as f:
    restored = flax.serialization.msgpack_restore(f.read())
  expected = flatten_dict(abstract_params)
  # diffusers' / transformers' Flax classes wrote other names (query/key/value/
  # proj_attn; layers/0): map a path only where the model does not expect it as is.
  flat = {
    k if k in expected else _legacy_msgpack_path(k): v for k, v in flatten_dict(restored).items()
  }
  unexpected = []
  for key, value in list(flat.items()):
    if key not in expected:
      unexpected.append("/".join(key))
      del flat[key]
    elif value.shape != expected[key].shape:
      raise _shape_error(path, "/".join(key), value.shape, key, expected[key].shape, config)
  _check_complete(flat, expected, unexpected, path, config)
  return flat


def load_params(
  weights_path: str,
  abstract_params: Params,
  rename: RenameFn,
  config_path: str,
  param_dtype: DTypeLike = jnp.float32,
) -> Params:
  """Reads any supported weights file into a nested dict of `param_dtype` jnp arrays."""
  if weights_path.endswith(".msgpack"):
    flat = _read_flax_msgpack(weights_path, abstract_params, config_path)
  else:
    state = read_state_dict(weights_path)
    flat = convert_pt_state_dict(state, abstract_params, rename, weights_path, config_path)
  dtype = _as_dtype(param_dtype)
  # Cast on the host (numpy) so that a float16 checkpoint never occupies the
  # device twice; only floating arrays change dtype.
  flat = {
    k: jnp.asarray(np.asarray(v, dtype=dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v)
    for k, v in flat.items()
  }
  return unflatten_dict(flat)


def _unet_module(
  directory: str, dtype: DTypeLike, attention: str
) -> tuple[UNet2DConditionModel, Params, str]:
  """Our UNet from `directory/config.json`, its abstract params and the config path."""
  config_path = os.path.join(directory, "config.json")
  config = _read_json(config_path)
  try:
    module = UNet2DConditionModel.from_config(config, dtype=_as_dtype(dtype), attention=attention)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  # Shapes only: no random initialisation of a multi-GB model.
  abstract = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  return module, abstract, config_path


def load_unet(
  directory: str,
  *,
  variant: str | None = None,
  param_dtype: DTypeLike = jnp.float32,
  dtype: DTypeLike = jnp.float32,
  attention: str = "xla",
) -> tuple[UNet2DConditionModel, Params]:
  """Loads `directory` (a pipeline's `unet/`) -> (our Flax UNet, params).

  Args:
    directory: config.json + PyTorch weights (safetensors, sharded, .bin) or
      a diffusers-Flax msgpack (its attention names are mapped to ours).
    variant, param_dtype, dtype: as `load_pipeline`.
    attention: `config.model.attention` (`models.attention`).
  """
  module, abstract, config_path = _unet_module(directory, dtype, attention)
  path = find_weights(directory, DIFFUSERS_WEIGHTS, variant)
  return module, load_params(path, abstract, naming.torch_to_flax, config_path, param_dtype)


def load_unet_module(
  directory: str, dtype: DTypeLike = jnp.float32, attention: str = "xla"
) -> UNet2DConditionModel:
  """The Flax UNet of `directory`'s config.json alone (no weights read)."""
  return _unet_module(directory, dtype, attention)[0]


def load_vae(
  directory: str,
  *,
  variant: str | None = None,
  param_dtype: DTypeLike = jnp.float32,
  dtype: DTypeLike = jnp.float32,
) -> tuple[vae_lib.AutoencoderKL, Params]:
  """Loads `directory` (a pipeline's `vae/`) -> (`models.vae.AutoencoderKL`, params).

  The scaling and shift factors are `vae.scaling_factor` / `vae.shift_factor`.
  SDXL's VAE overflows in float16 (its config says `force_upcast`, and the
  module then computes in float32); bfloat16 is fine.
  """
  config_path = os.path.join(directory, "config.json")
  config = vae_lib.AutoencoderKLConfig.from_dict(_read_json(config_path), config_path)
  module = vae_lib.AutoencoderKL(config, dtype=_as_dtype(dtype))
  path = find_weights(directory, DIFFUSERS_WEIGHTS, variant)
  params = load_params(path, module.init_abstract(), naming.torch_to_flax, config_path, param_dtype)
  return module, params


def _text_encoder_rename(pt_key: str, tensor: Any, expected: dict) -> tuple:
  """`naming.torch_to_flax`, also for keys without the `text_model.` prefix.

  transformers 5 saves a `CLIPTextModel` without it (`embeddings.token_embedding
  .weight`); the hub checkpoints and transformers 4 have it.
  """
  path, value = naming.torch_to_flax(pt_key, tensor, expected)
  if path not in expected:
    prefixed, prefixed_value = naming.torch_to_flax("text_model." + pt_key, tensor, expected)
    if prefixed in expected:
      return prefixed, prefixed_value
  return path, value


def load_text_encoder(
  directory: str,
  *,
  with_projection: bool = False,
  variant: str | None = None,
  param_dtype: DTypeLike = jnp.float32,
  dtype: DTypeLike = jnp.float32,
) -> tuple[clip.CLIPTextModel, Params]:
  """Loads a CLIP text encoder folder -> (`models.clip` module, params).

  Args:
    directory: `text_encoder/` or `text_encoder_2/`.
    with_projection: True for SDXL's `text_encoder_2`
      (CLIPTextModelWithProjection: its `text_embeds` are SDXL's pooled embeds).

  Returns:
    `CLIPTextModel` or `CLIPTextModelWithProjection`, called as
    `module.apply({"params": p}, ids, attention_mask, position_ids, output_hidden_states=...)`,
    and its params.
  """
  config_path = os.path.join(directory, "config.json")
  config = clip.CLIPTextConfig.from_dict(_read_json(config_path), config_path)
  cls = clip.CLIPTextModelWithProjection if with_projection else clip.CLIPTextModel
  module = cls(config, dtype=_as_dtype(dtype))
  path = find_weights(directory, TRANSFORMERS_WEIGHTS, variant)
  params = load_params(path, module.init_abstract(), _text_encoder_rename, config_path, param_dtype)
  return module, params


def load_clip(
  directory: str,
  *,
  variant: str | None = None,
  param_dtype: DTypeLike = jnp.float32,
  dtype: DTypeLike = jnp.float32,
) -> tuple[clip.CLIPModel, Params]:
  """Loads a transformers `CLIPModel` folder (both towers; scorers, RPO) -> (module, params)."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"Missing {config_path}: not a transformers CLIP model folder.")
  config = clip.CLIPConfig.from_dict(_read_json(config_path), config_path)
  module = clip.CLIPModel(config, dtype=_as_dtype(dtype))
  path = find_weights(directory, TRANSFORMERS_WEIGHTS, variant)
  params = load_params(path, module.init_abstract(), naming.torch_to_flax, config_path, param_dtype)
  return module, params


def load_tokenizer(directory: str) -> tokenizer_lib.CLIPTokenizer:
  """The CLIP BPE tokenizer of a local folder (vocab.json, merges.txt, tokenizer_config.json)."""
  return tokenizer_lib.CLIPTokenizer.from_pretrained(directory)


def load_scheduler_config(directory: str) -> dict[str, Any]:
  """`scheduler_config.json` as a dict, with the prediction type made explicit.

  Only the training-relevant fields matter downstream (num_train_timesteps,
  beta_*, prediction_type); inference-only fields of the checkpoint's PNDM /
  Euler scheduler are kept but ignored by `diffusion.make_noise_schedule`.
  """
  config = _read_json(os.path.join(directory, "scheduler_config.json"))
  config = {k: v for k, v in config.items() if not k.startswith("_")}
  # diffusers' default when the field is absent (old SD1.x configs).
  config.setdefault("prediction_type", "epsilon")
  if config["prediction_type"] not in PREDICTION_TYPES:
    raise ValueError(
      f"{directory}/scheduler_config.json: prediction_type={config['prediction_type']!r} is "
      f"not supported; expected one of {PREDICTION_TYPES}."
    )
  return config


def detect_kind(path: str) -> str:
  """ "sd15" or "sdxl" from `model_index.json` (which components the pipeline has)."""
  index = _read_json(os.path.join(path, "model_index.json"))
  present = {
    k
    for k, v in index.items()
    if not k.startswith("_") and isinstance(v, list) and v[0] is not None
  }
  missing = {"unet", "scheduler"} - present
  if missing:
    raise ValueError(f"{path}/model_index.json lacks components {sorted(missing)}.")
  if "text_encoder" not in present:
    # SDXL refiner: only the bigG encoder and 5 time ids.
    raise ValueError(f"{path}: pipelines without `text_encoder` (e.g. SDXL refiner) unsupported.")
  return "sdxl" if "text_encoder_2" in present else "sd15"


def has_vae(path: str) -> bool:
  """Whether the pipeline at `path` has a VAE (False: a pixel-space pipeline).

  A pixel-space pipeline says so explicitly with `"vae": [null, null]` in
  `model_index.json`; a missing entry is an error, not a silent pixel model.
  """
  index = _read_json(os.path.join(path, "model_index.json"))
  if "vae" not in index:
    raise ValueError(
      f"{path}/model_index.json has no 'vae' entry; expected a VAE component, or "
      '"vae": [null, null] for a pixel-space pipeline.'
    )
  entry = index["vae"]
  return isinstance(entry, list) and entry[0] is not None


def load_pipeline(
  path: str,
  *,
  variant: str | None = None,
  param_dtype: DTypeLike = jnp.float32,
  dtype: DTypeLike = jnp.float32,
  unet_weights: bool = True,
) -> Pipeline:
  """Loads every component of the diffusers folder `path`.

  Args:
    path: pipeline root (with model_index.json).
    variant: weights variant, e.g. "fp16" -> `*.fp16.safetensors`, for all
      components. Values are cast to `param_dtype` regardless.
    param_dtype: dtype of the returned parameters (float32 master copy by default).
    dtype: compute dtype of the modules.
    unet_weights: False leaves `unet_params` None (the caller brings its own,
      e.g. the params being trained) and reads only the UNet's config.

  Returns:
    A `Pipeline`.
  """
  kind = detect_kind(path)
  kw = {"variant": variant, "param_dtype": param_dtype, "dtype": dtype}
  if unet_weights:
    unet, unet_params = load_unet(os.path.join(path, "unet"), **kw)
  else:
    unet, unet_params = load_unet_module(os.path.join(path, "unet"), dtype), None
  vae, vae_params = None, None
  if has_vae(path):
    vae, vae_params = load_vae(os.path.join(path, "vae"), **kw)
  text_encoder, text_encoder_params = load_text_encoder(os.path.join(path, "text_encoder"), **kw)
  extra = {}
  if kind == "sdxl":
    module, params = load_text_encoder(
      os.path.join(path, "text_encoder_2"), with_projection=True, **kw
    )
    extra = {
      "text_encoder_2": module,
      "text_encoder_2_params": params,
      "tokenizer_2": load_tokenizer(os.path.join(path, "tokenizer_2")),
    }
  return Pipeline(
    kind=kind,
    unet=unet,
    unet_params=unet_params,
    vae=vae,
    vae_params=vae_params,
    text_encoder=text_encoder,
    text_encoder_params=text_encoder_params,
    tokenizer=load_tokenizer(os.path.join(path, "tokenizer")),
    scheduler_config=load_scheduler_config(os.path.join(path, "scheduler")),
    vae_scaling_factor=float(vae.config.scaling_factor) if vae is not None else 1.0,
    path=path,
    **extra,
  )
