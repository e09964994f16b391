"""CLIP text and vision towers in Flax linen, computing what transformers' PyTorch CLIP computes.

Built from a plain config (the folder's `config.json` as a dict, or a
`CLIPTextConfig` / `CLIPVisionConfig` / `CLIPConfig` dataclass):

  CLIPTextModel                 text_model                       (SD1.5 / SDXL text_encoder)
  CLIPTextModelWithProjection   text_model + text_projection     (SDXL text_encoder_2)
  CLIPVisionModelWithProjection vision_model + visual_projection (image embedders)
  CLIPModel                     both towers, both projections, logit_scale (scorers)

Parameter paths are the PyTorch state-dict keys in Flax form (`models.naming`):
`text_model/encoder/layers_0/self_attn/q_proj/kernel`, `vision_model/pre_layrnorm/scale`,
`vision_model/embeddings/class_embedding`, `logit_scale`, ...

The text towers are called as transformers' old Flax CLIP modules were,
`module.apply({"params": p}, input_ids, attention_mask, position_ids,
output_hidden_states=...)`, and return a `CLIPTextOutput`; images are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models import attention

# `hidden_act` values (transformers' ACT2FN names) -> functions.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


# Initialisers of transformers' Flax CLIP (the toy world trains a text tower from scratch).
_INIT_001 = nn.initializers.normal(0.01)
_INIT_002 = nn.initializers.normal(0.02)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention with float32 logits and softmax (as transformers' eager CLIP).

  Args:
    q, k, v: [B, L, H, D].
    mask: bool, broadcastable to [B, H, Lq, Lk]; True = attend. None: no mask.

  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  return attention.dot_product_attention(q, k, v, "xla", mask=mask)


def _config_fields(cls: type, config: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The dataclass fields of `cls` present in `config` (others are ignored), lists -> tuples."""
  names = {f.name for f in dataclasses.fields(cls)}
  out = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
  for key in ("attention_dropout", "dropout"):
    if float(config.get(key) or 0.0) != 0.0:
      raise ValueError(
        f"{source}: {key}={config[key]!r} is not supported by dpo_jax's CLIP, which "
        f"implements only {key}=0.0 (frozen encoders run deterministically)."
      )
  heads, width = out.get("num_attention_heads"), out.get("hidden_size")
  if heads and width and width % heads:
    raise ValueError(
      f"{source}: hidden_size={width} is not divisible by num_attention_heads={heads}."
    )
  act = out.get("hidden_act", "quick_gelu")
  if act not in _ACTIVATIONS:
    raise ValueError(
      f"{source}: hidden_act={act!r} is not supported by dpo_jax's CLIP; implemented: "
      f"{sorted(_ACTIVATIONS)}."
    )
  return out


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' `CLIPTextConfig` fields that the text tower uses (its defaults)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  # 2 is the legacy value of the SD checkpoints: pool at argmax(input_ids) instead.
  eos_token_id: int | None = 49407

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], source: str = "CLIP text config") -> CLIPTextConfig:
    """From a `config.json` dict (a CLIPTextModel's, or a CLIPConfig's `text_config`)."""
    return cls(**_config_fields(cls, config, source))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' `CLIPVisionConfig` fields that the vision tower uses (its defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_dict(
    cls, config: Mapping[str, Any], source: str = "CLIP vision config"
  ) -> CLIPVisionConfig:
    return cls(**_config_fields(cls, config, source))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' `CLIPConfig`: both towers, the shared projection width, logit_scale init."""

  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], source: str = "CLIP config") -> CLIPConfig:
    """From a CLIPModel `config.json` dict (old files' `*_config_dict` entries win)."""
    text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
    vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    return cls(
      text_config=CLIPTextConfig.from_dict(text, f"{source} text_config"),
      vision_config=CLIPVisionConfig.from_dict(vision, f"{source} vision_config"),
      projection_dim=int(config.get("projection_dim", 512)),
      logit_scale_init_value=float(config.get("logit_scale_init_value", 2.6592)),
    )


def _as_config(cls: type, config: Any) -> Any:
  return config if isinstance(config, cls) else cls.from_dict(config)


def _text_ids(config: CLIPTextConfig) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)


def _pixels(config: CLIPVisionConfig) -> jax.ShapeDtypeStruct:
  side = config.image_size
  return jax.ShapeDtypeStruct((1, side, side, config.num_channels), jnp.float32)


def _abstract(module: nn.Module, *args: Any) -> dict[str, Any]:
  """The module's parameter tree as ShapeDtypeStructs (traced, nothing initialised)."""
  return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


@flax.struct.dataclass
class CLIPTextOutput:
  """A text tower's outputs.

  Attributes:
    last_hidden_state: [B, L, D], after the final layer norm (SD1.5's context).
    pooler_output: [B, D], last_hidden_state at the end-of-text token.
    penultimate_hidden_state: [B, L, D], the second-to-last layer's output,
      no final layer norm (= transformers' `hidden_states[-2]`, SD2 / SDXL's context).
    hidden_states: (embeddings, layer 1, ..., layer N) when asked for, else None.
    text_embeds: [B, P] = text_projection(pooler_output) (WithProjection only, else None).
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array
  penultimate_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None
  text_embeds: jax.Array | None = None


class CLIPAttention(nn.Module):
  embed_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    b, length, _ = x.shape
    head_dim = self.embed_dim // self.num_heads

    def proj(name):
      y = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=_INIT_001, name=name)(x)
      return y.reshape(b, length, self.num_heads, head_dim)

    out = _attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), mask)
    return nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=_INIT_001, name="out_proj")(
      out.reshape(b, length, self.embed_dim)
    )


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, kernel_init=_INIT_001, name="fc1")(x)
    x = _ACTIVATIONS[self.hidden_act](x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_INIT_001, name="fc2")(x)


class CLIPEncoder(nn.Module):
  """The pre-norm transformer stack -> [input, layer 1 output, ..., layer N output]."""

  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> list[jax.Array]:
    hidden = [x]
    for i in range(self.config.num_hidden_layers):
      x = _EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
      hidden.append(x)
    return hidden


class _EncoderLayer(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    c = self.config
    h = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, name="self_attn")(
      h, mask
    )
    h = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
    mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp")
    return x + mlp(h)


class CLIPTextTransformer(nn.Module):
  """transformers' `CLIPTextTransformer` (params under `text_model/`)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    output_hidden_states: bool = False,
  ) -> CLIPTextOutput:
    c = self.config
    length = input_ids.shape[-1]
    if length > c.max_position_embeddings:
      raise ValueError(
        f"{length} tokens but the CLIP text model has max_position_embeddings="
        f"{c.max_position_embeddings}; tokenize with max_length <= that."
      )
    if position_ids is None:
      position_ids = jnp.arange(length)[None]
    x = _TextEmbeddings(c, self.dtype, name="embeddings")(input_ids, position_ids)
    # Causal mask, and the padding mask on keys when given (1 = token, 0 = padding).
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    hidden = CLIPEncoder(c, self.dtype, name="encoder")(x, mask)
    last = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(hidden[-1])
    if c.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773): end-of-text has the highest id.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      # The first end-of-text (the pad token may equal it).
      eos_pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(
      last_hidden_state=last,
      pooler_output=pooled,
      penultimate_hidden_state=hidden[-2],
      hidden_states=tuple(hidden) if output_hidden_states else None,
    )


class _TextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
    c = self.config
    embed = lambda n, name: nn.Embed(
      n, c.hidden_size, dtype=self.dtype, embedding_init=_INIT_001, name=name
    )
    tok = embed(c.vocab_size, "token_embedding")
    pos = embed(c.max_position_embeddings, "position_embedding")
    return tok(input_ids) + pos(position_ids)


class CLIPTextModel(nn.Module):
  """transformers' `CLIPTextModel`. Apply: `(input_ids [B,L], attention_mask, position_ids)`.

  Build with `CLIPTextModel(CLIPTextConfig(...))` or `CLIPTextModel.from_config(dict)`.
  `deterministic` is accepted (and ignored: no dropout) for the old Flax call signature.
  """

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | CLIPTextConfig, dtype: Any = jnp.float32):
    return cls(_as_config(CLIPTextConfig, config), dtype=dtype)

  def init_abstract(self) -> dict[str, Any]:
    """Parameter shapes (ShapeDtypeStructs), for loading weights without a random init."""
    return _abstract(self, _text_ids(self.config))

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    deterministic: bool = True,
    output_hidden_states: bool = False,
  ) -> CLIPTextOutput:
    del deterministic
    tower = CLIPTextTransformer(self.config, self.dtype, name="text_model")
    return tower(input_ids, attention_mask, position_ids, output_hidden_states)


class CLIPTextModelWithProjection(CLIPTextModel):
  """transformers' `CLIPTextModelWithProjection`: also `text_embeds` [B, projection_dim]."""

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    deterministic: bool = True,
    output_hidden_states: bool = False,
  ) -> CLIPTextOutput:
    del deterministic
    tower = CLIPTextTransformer(self.config, self.dtype, name="text_model")
    out = tower(input_ids, attention_mask, position_ids, output_hidden_states)
    proj = nn.Dense(
      self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection"
    )
    return out.replace(text_embeds=proj(out.pooler_output))


class CLIPVisionTransformer(nn.Module):
  """transformers' `CLIPVisionTransformer`: pixels [B,H,W,C] -> (last hidden state, pooled)."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    x = _VisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    last = CLIPEncoder(c, self.dtype, name="encoder")(x, None)[-1]
    pooled = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(last[:, 0])
    return last, pooled


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    p = c.patch_size
    patches = nn.Conv(
      c.hidden_size,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      kernel_init=_INIT_001,
      name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)
    cls = self.param("class_embedding", _INIT_002, (c.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    num_positions = (c.image_size // p) ** 2 + 1
    pos = nn.Embed(
      num_positions,
      c.hidden_size,
      dtype=self.dtype,
      embedding_init=_INIT_001,
      name="position_embedding",
    )
    return x + pos(jnp.arange(num_positions))[None]


class CLIPVisionModelWithProjection(nn.Module):
  """transformers' `CLIPVisionModelWithProjection`: pixels NHWC -> image_embeds [B, P]."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | CLIPVisionConfig, dtype: Any = jnp.float32):
    return cls(_as_config(CLIPVisionConfig, config), dtype=dtype)

  def init_abstract(self) -> dict[str, Any]:
    return _abstract(self, _pixels(self.config))

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    _, pooled = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(pixel_values)
    proj = nn.Dense(
      self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection"
    )
    return proj(pooled)


class CLIPModel(nn.Module):
  """transformers' `CLIPModel` (both towers; what the CLIP scorers load).

  Methods (`module.apply(..., method=...)`): `get_text_features(ids, mask)` and
  `get_image_features(pixels NHWC)` give the unnormalised projected embeddings;
  `__call__` returns (image_embeds, text_embeds, logit_scale) for init.
  A method touches only its tower's params, so a params subset
  (`vision_model`, `visual_projection`) suffices for `get_image_features`.
  """

  config: CLIPConfig
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | CLIPConfig, dtype: Any = jnp.float32):
    return cls(_as_config(CLIPConfig, config), dtype=dtype)

  def init_abstract(self) -> dict[str, Any]:
    c = self.config
    return _abstract(self, _text_ids(c.text_config), _pixels(c.vision_config))

  def setup(self):
    c = self.config
    self.text_model = CLIPTextTransformer(c.text_config, self.dtype)
    self.vision_model = CLIPVisionTransformer(c.vision_config, self.dtype)
    dense = lambda: nn.Dense(
      c.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=_INIT_002
    )
    self.text_projection = dense()
    self.visual_projection = dense()
    init = c.logit_scale_init_value
    self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(init, jnp.float32))

  def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """[B, L] ids (and 1/0 padding mask) -> [B, projection_dim]."""
    return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    """[B, H, W, C] normalised pixels -> [B, projection_dim]."""
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def __call__(self, input_ids, pixel_values, attention_mask=None):
    img = self.get_image_features(pixel_values)
    txt = self.get_text_features(input_ids, attention_mask)
    return img, txt, self.logit_scale
