"""diffusers' `UNet2DConditionModel` (SD 1.x, SD 2.x, SDXL) as a Flax linen module.

Built from a pipeline's `unet/config.json` (`UNet2DConditionModel.from_config`)
and computing what PyTorch diffusers' class computes for the same weights
(tests/test_unet_parity.py), with parameter paths that are the PyTorch
state-dict keys (`models.naming`): `down_blocks_1/attentions_0/
transformer_blocks_0/attn1/to_q/kernel` is `down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q.weight`, transposed.

Supported structure: down blocks `CrossAttnDownBlock2D` / `DownBlock2D`, mid
block `UNetMidBlock2DCrossAttn`, up blocks `CrossAttnUpBlock2D` / `UpBlock2D`,
positional time embedding, optional SDXL `text_time` added conditioning. Every
config field of diffusers' class is either implemented for any value, or
checked against the values implemented (`FIXED`) and refused otherwise; a
field diffusers does not know is refused too. Nothing is silently ignored,
except the few fields that diffusers itself ignores for these blocks (`INERT`).

Computation: activations NHWC inside (convolutions are channels-last in XLA),
NCHW at the boundary like diffusers; `dtype` is the compute dtype, parameters
may be float32 or bfloat16 (Flax casts them to `dtype`). Attention goes
through `models.attention` (`attention` field = `config.model.attention`).
`remat_policy` puts every down/mid/up block under `nn.remat` with a
`jax.checkpoint` policy (`REMAT_POLICIES`) without changing the parameter tree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models import attention as attention_lib

# config.model.remat -> what a rematerialised block keeps for the backward pass
# (a `jax.checkpoint` policy); "none" does not rematerialise.
#   blocks: nothing (recompute the block's whole forward; least memory).
#   blocks_save_dots: the outputs of weight matmuls (Dense layers: attention
#     projections, feed-forwards), recomputing convolutions, norms and the
#     attention itself; between "none" and "blocks" in memory and time.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "none": None,
  "blocks": jax.checkpoint_policies.nothing_saveable,
  "blocks_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# diffusers config fields with the only values implemented here (diffusers'
# defaults). Another value would change the computation, so it is refused.
FIXED: dict[str, tuple[Any, ...]] = {
  "act_fn": ("silu", "swish"),  # diffusers maps both to SiLU.
  "center_input_sample": (False,),
  "time_embedding_type": ("positional",),
  "time_embedding_dim": (None,),
  "time_embedding_act_fn": (None,),
  "timestep_post_act": (None,),
  "time_cond_proj_dim": (None,),
  "class_embed_type": (None,),
  "num_class_embeds": (None,),
  "class_embeddings_concat": (False,),
  "encoder_hid_dim": (None,),
  "encoder_hid_dim_type": (None,),
  "conv_in_kernel": (3,),
  "conv_out_kernel": (3,),
  "downsample_padding": (1,),
  "mid_block_scale_factor": (1,),
  "dropout": (0.0,),
  "dual_cross_attention": (False,),
  "resnet_time_scale_shift": ("default",),
  "resnet_skip_time_act": (False,),
  "resnet_out_scale_factor": (1.0,),
  "cross_attention_norm": (None,),
  "attention_type": ("default",),
  "reverse_transformer_layers_per_block": (None,),
}
# Fields that diffusers' own class reads only for blocks or options this
# structure does not have, or that only say how the old diffusers-Flax class
# computed (a diffusers-Flax config.json carries them); accepted with any value.
INERT = (
  "addition_embed_type_num_heads",  # Read only for addition_embed_type="text".
  "mid_block_only_cross_attention",  # Read only by UNetMidBlock2DSimpleCrossAttn.
  "use_memory_efficient_attention",  # How to compute: config.model.attention decides.
  "split_head_dim",
)


def _per_block(value: Any, n: int, field: str) -> tuple:
  """An int/bool/str for every block, or a per-block sequence of length `n`."""
  if isinstance(value, list | tuple):
    if len(value) != n:
      raise ValueError(
        f"UNet config: {field}={tuple(value)!r} has {len(value)} entries but there are "
        f"{n} down blocks; give one per block or a single value."
      )
    return tuple(value)
  return (value,) * n


def _refuse(field: str, value: Any, supported: str) -> ValueError:
  return ValueError(f"UNet config: {field}={value!r} is not supported; supported: {supported}.")


def timestep_embedding(
  timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period=10000
) -> jax.Array:
  """diffusers' `get_timestep_embedding`: [N] -> float32 [N, dim] sinusoids."""
  half = dim // 2
  exponent = -jnp.log(float(max_period)) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
  # Two-pass variance (mean of squared deviations): SDXL activations have
  # means large against their spread, where E[x^2] - E[x]^2 loses digits.
  return nn.GroupNorm(
    num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name
  )


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers' `TimestepEmbedding`)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 shortcut if widths differ."""

  out_channels: int
  groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """x [B, H, W, Cin], temb [B, E] -> [B, H, W, out_channels]."""
    conv = functools.partial(nn.Conv, self.out_channels, (3, 3), padding=1, dtype=self.dtype)
    h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv(name="conv1")(h)
    t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv(name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class GEGLU(nn.Module):
  """proj to 2 x inner, then value * gelu(gate) (exact gelu, as torch's default)."""

  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 = GEGLU(dim -> 4 dim), net.2 = Linear(4 dim -> dim)."""

  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(4 * self.dim, self.dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention (cross if only_cross_attention), cross-attention, GEGLU FF."""

  dim: int
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  attention: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, L, dim], context [B, Lc, Dc] -> [B, L, dim]."""
    attn = functools.partial(
      attention_lib.Attention,
      self.heads,
      self.dim_head,
      self.dim,
      implementation=self.attention,
      dtype=self.dtype,
    )
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    h = norm(name="norm1")(x)
    x = x + attn(name="attn1")(h, context if self.only_cross_attention else None)
    x = x + attn(name="attn2")(norm(name="norm2")(x), context)
    return x + FeedForward(self.dim, self.dtype, name="ff")(norm(name="norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in, `num_layers` transformer blocks over H*W tokens, proj_out, residual."""

  heads: int
  dim_head: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  only_cross_attention: bool = False
  attention: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, H, W, C], context [B, Lc, Dc] -> [B, H, W, C]."""
    b, height, width, channels = x.shape
    inner = self.heads * self.dim_head
    h = _group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, height * width, channels))
    else:
      h = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(h)
      h = h.reshape(b, height * width, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
        inner,
        self.heads,
        self.dim_head,
        self.only_cross_attention,
        self.attention,
        self.dtype,
        name=f"transformer_blocks_{i}",
      )(h, context)
    if self.use_linear_projection:
      h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h)
      h = h.reshape(b, height, width, channels)
    else:
      h = h.reshape(b, height, width, inner)
      h = nn.Conv(channels, (1, 1), dtype=self.dtype, name="proj_out")(h)
    return h + x


class Downsample2D(nn.Module):
  """3x3 convolution with stride 2 and padding 1 (H -> ceil(H / 2))."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.channels, (3, 3), strides=2, padding=1, dtype=self.dtype, name="conv")(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch `interpolate(mode="nearest", size=size)` on NHWC: source row floor(i * H / size)."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling to `size`, then a 3x3 convolution."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
    x = upsample_nearest(x, size)
    return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


class _BlockFields(nn.Module):
  """Fields shared by the down, mid and up blocks."""

  out_channels: int
  num_layers: int
  groups: int
  eps: float
  add_sampler: bool = False
  # Cross-attention blocks only:
  heads: int = 1
  transformer_layers: int = 1
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  attention: str = "xla"
  dtype: Any = jnp.float32

  def resnet(self, i: int) -> ResnetBlock2D:
    return ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{i}")

  def transformer(self, i: int) -> Transformer2DModel:
    return Transformer2DModel(
      self.heads,
      self.out_channels // self.heads,
      self.transformer_layers,
      self.groups,
      self.use_linear_projection,
      self.only_cross_attention,
      self.attention,
      self.dtype,
      name=f"attentions_{i}",
    )


class CrossAttnDownBlock2D(_BlockFields):
  """(resnet, transformer) x num_layers, then a stride-2 conv unless it is the last block."""

  @nn.compact
  def __call__(self, x, temb, context):
    """x [B, H, W, Cin] -> (x [B, H', W', C], the skip outputs it adds)."""
    skips = []
    for i in range(self.num_layers):
      x = self.transformer(i)(self.resnet(i)(x, temb), context)
      skips.append(x)
    if self.add_sampler:
      x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class DownBlock2D(_BlockFields):
  """resnet x num_layers, then a stride-2 conv unless it is the last block."""

  @nn.compact
  def __call__(self, x, temb):
    skips = []
    for i in range(self.num_layers):
      x = self.resnet(i)(x, temb)
      skips.append(x)
    if self.add_sampler:
      x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_BlockFields):
  """resnet, then (transformer, resnet) x num_layers."""

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.resnet(0)(x, temb)
    for i in range(self.num_layers):
      x = self.resnet(i + 1)(self.transformer(i)(x, context), temb)
    return x


class CrossAttnUpBlock2D(_BlockFields):
  """(concat skip, resnet, transformer) x num_layers, then upsample to `size` if not last."""

  @nn.compact
  def __call__(self, x, skips, temb, context, size):
    """skips: this block's skip outputs, consumed last first; size: static (H, W) or None."""
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self.transformer(i)(self.resnet(i)(x, temb), context)
    if self.add_sampler:
      x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, size)
    return x


class UpBlock2D(_BlockFields):
  """(concat skip, resnet) x num_layers, then upsample to `size` if not last."""

  @nn.compact
  def __call__(self, x, skips, temb, size):
    for i in range(self.num_layers):
      x = self.resnet(i)(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
    if self.add_sampler:
      x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, size)
    return x


_BLOCK_CLASSES = {
  cls.__name__: cls
  for cls in (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D)
  + (UpBlock2D,)
}
# Positional arguments that are Python values, not arrays (self is argument 0).
_STATIC_ARGNUMS = {"CrossAttnUpBlock2D": (5,), "UpBlock2D": (4,)}


@functools.cache
def _block_class(name: str, remat_policy: str) -> type[nn.Module]:
  """The block class, under `nn.remat` with the policy unless "none"; one class per pair."""
  cls = _BLOCK_CLASSES[name]
  if remat_policy == "none":
    return cls
  # Lifted remat adds no scope level: parameters stay at down_blocks_0/...
  return nn.remat(
    cls, policy=REMAT_POLICIES[remat_policy], static_argnums=_STATIC_ARGNUMS.get(name, ())
  )


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel; fields are its config fields (see `from_config`).

  Field semantics follow diffusers, including its naming quirk: when
  `num_attention_heads` is None, `attention_head_dim` is the number of heads
  per block (SD 1.x/2.x/XL configs all rely on this); a head's width is then
  the block's channels / heads. (PyTorch diffusers refuses a non-None
  `num_attention_heads`; here it means the number of heads, as its name says.)
  Per-block fields are an int/bool or one value per down block (the up blocks
  take them in reverse order). `upcast_attention` needs no code: every
  `models.attention` implementation does the softmax in float32 anyway.

  Extra fields (how to compute, not architecture):
    attention: `models.attention` implementation (`config.model.attention`).
    remat_policy: a key of `REMAT_POLICIES` (`config.model.remat`).
    dtype: compute dtype.
  """

  sample_size: Any = None
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  )
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = (
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
  )
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  attention: str = "xla"
  remat_policy: str = "none"
  dtype: Any = jnp.float32

  def __post_init__(self):
    self._check()
    super().__post_init__()

  # --- configuration --------------------------------------------------------

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> UNet2DConditionModel:
    """The module of a diffusers `unet/config.json` dict; `kwargs` set attention/remat/dtype.

    Raises:
      ValueError: a field value that is not implemented (naming the field, its
        value and what is supported), or a field diffusers' class does not have.
    """
    fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
    arch = {}
    for key, value in config.items():
      if key.startswith("_") or key in INERT:
        continue  # Bookkeeping (_class_name, _diffusers_version, ...).
      if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      if key in FIXED:
        if value not in FIXED[key]:
          raise _refuse(key, value, " or ".join(repr(v) for v in FIXED[key]))
      elif key in fields and key not in ("attention", "remat_policy", "dtype"):
        arch[key] = value
      else:
        raise ValueError(
          f"UNet config: unknown field {key!r} (={value!r}); it is not a field of diffusers' "
          "UNet2DConditionModel that dpo_jax implements."
        )
    return cls(**arch, **kwargs)

  def _check(self) -> None:
    """Refuses unimplemented values of the architecture fields, naming field and value."""
    attention_lib.check_implementation(self.attention)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"Unknown remat policy {self.remat_policy!r}; expected one of {list(REMAT_POLICIES)}."
      )
    n = len(self.block_out_channels)
    for field, types, supported in (
      ("down_block_types", self.down_block_types, DOWN_BLOCKS),
      ("up_block_types", self.up_block_types, UP_BLOCKS),
    ):
      if len(types) != n:
        raise ValueError(
          f"UNet config: {field} has {len(types)} entries but block_out_channels has {n}."
        )
      for t in types:
        if t not in supported:
          raise _refuse(field, tuple(types), f"tuples of {supported}")
    if self.mid_block_type not in MID_BLOCKS:
      raise _refuse("mid_block_type", self.mid_block_type, repr(MID_BLOCKS[0]))
    if self.addition_embed_type not in (None, "text_time"):
      raise _refuse("addition_embed_type", self.addition_embed_type, "None or 'text_time'")
    if self.addition_embed_type == "text_time" and None in (
      self.addition_time_embed_dim,
      self.projection_class_embeddings_input_dim,
    ):
      raise ValueError(
        "UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
        "projection_class_embeddings_input_dim."
      )
    if not isinstance(self.norm_num_groups, int) or any(
      c % self.norm_num_groups for c in self.block_out_channels
    ):
      raise _refuse(
        "norm_num_groups",
        self.norm_num_groups,
        f"an int dividing every block_out_channels {tuple(self.block_out_channels)}",
      )
    for v in self._per_block("transformer_layers_per_block"):
      if not isinstance(v, int):
        raise _refuse(
          "transformer_layers_per_block",
          self.transformer_layers_per_block,
          "an int or one int per block (not per layer)",
        )
    if len(set(self._per_block("cross_attention_dim"))) != 1:
      raise _refuse(
        "cross_attention_dim",
        self.cross_attention_dim,
        "one width for every block (one encoder_hidden_states feeds them all)",
      )
    for field in ("only_cross_attention", "layers_per_block", "attention_head_dim"):
      self._per_block(field)
    for channels, heads in zip(self.block_out_channels, self.heads_per_block):
      if not isinstance(heads, int) or channels % heads:
        raise ValueError(
          f"UNet config: {heads} attention heads do not divide a block's {channels} channels "
          "(heads = num_attention_heads, or attention_head_dim when that is None)."
        )

  def _per_block(self, field: str) -> tuple:
    return _per_block(getattr(self, field), len(self.block_out_channels), field)

  @property
  def heads_per_block(self) -> tuple[int, ...]:
    """Attention heads of each down block (diffusers: num_attention_heads or attention_head_dim)."""
    if self.num_attention_heads is not None:
      return self._per_block("num_attention_heads")
    return self._per_block("attention_head_dim")

  # --- parameters -----------------------------------------------------------

  def init_weights(self, rng: jax.Array) -> dict[str, Any]:
    """Random float32 parameters (a plain nested dict), from the smallest valid input."""
    side = 2 ** (len(self.block_out_channels) - 1)
    sample = jnp.zeros((1, self.in_channels, side, side), jnp.float32)
    context = jnp.zeros((1, 1, self._per_block("cross_attention_dim")[0]), jnp.float32)
    added = None
    if self.addition_embed_type == "text_time":
      # The split between pooled text and time ids does not change any shape.
      width = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
      added = {"text_embeds": jnp.zeros((1, width)), "time_ids": jnp.zeros((1, 1))}
    variables = self.init(rng, sample, jnp.zeros((1,), jnp.int32), context, added)
    return flax.core.unfreeze(variables["params"])

  # --- forward --------------------------------------------------------------

  def _block(self, block_type: str, **fields: Any) -> nn.Module:
    return _block_class(block_type, self.remat_policy)(**fields)

  @nn.compact
  def __call__(
    self,
    sample: jax.Array,
    timesteps: jax.Array,
    encoder_hidden_states: jax.Array,
    added_cond_kwargs: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array:
    """Predicts the noise (or v) of `sample`.

    Args:
      sample: [B, in_channels, H, W] noisy latents.
      timesteps: [B] or a scalar (broadcast to the batch).
      encoder_hidden_states: [B, L, cross_attention_dim] text context.
      added_cond_kwargs: SDXL only: {"text_embeds": [B, E], "time_ids": [B, T]}
        with E + T * addition_time_embed_dim = projection_class_embeddings_input_dim.

    Returns:
      [B, out_channels, H, W] in the compute dtype.
    """
    channels = self.block_out_channels
    n = len(channels)
    batch = sample.shape[0]
    dt = self.dtype
    groups, eps = self.norm_num_groups, self.norm_eps
    heads = self.heads_per_block
    layers = self._per_block("layers_per_block")
    tlayers = self._per_block("transformer_layers_per_block")
    only_cross = self._per_block("only_cross_attention")
    common = {
      "groups": groups,
      "eps": eps,
      "use_linear_projection": self.use_linear_projection,
      "attention": self.attention,
      "dtype": dt,
    }

    # 1. Time (and SDXL's added) embedding; the sinusoids are float32 as in diffusers.
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = timestep_embedding(t, channels[0], self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepEmbedding(4 * channels[0], dt, name="time_embedding")(t_emb.astype(dt))
    if self.addition_embed_type == "text_time":
      if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
        raise ValueError(
          "This UNet has addition_embed_type='text_time' (SDXL) and needs added_cond_kwargs "
          "with 'text_embeds' and 'time_ids'."
        )
      text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
      time_embeds = timestep_embedding(
        time_ids.reshape(-1), self.addition_time_embed_dim, self.flip_sin_to_cos, self.freq_shift
      ).reshape(batch, -1)
      add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
      emb = emb + TimestepEmbedding(4 * channels[0], dt, name="add_embedding")(add.astype(dt))

    # 2. Down.
    context = encoder_hidden_states.astype(dt)
    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(dt)
    x = nn.Conv(channels[0], (3, 3), padding=1, dtype=dt, name="conv_in")(x)
    skips = [x]
    for i, block_type in enumerate(self.down_block_types):
      fields = dict(common, out_channels=channels[i], num_layers=layers[i], add_sampler=i < n - 1)
      if block_type == "CrossAttnDownBlock2D":
        fields.update(
          heads=heads[i], transformer_layers=tlayers[i], only_cross_attention=only_cross[i]
        )
        block = self._block(block_type, **fields, name=f"down_blocks_{i}")
        x, res = block(x, emb, context)
      else:
        x, res = self._block(block_type, **fields, name=f"down_blocks_{i}")(x, emb)
      skips.extend(res)

    # 3. Mid (diffusers passes it neither only_cross_attention nor per-layer counts).
    x = self._block(
      "UNetMidBlock2DCrossAttn",
      **common,
      out_channels=channels[-1],
      num_layers=1,
      heads=heads[-1],
      transformer_layers=tlayers[-1],
      name="mid_block",
    )(x, emb, context)

    # 4. Up: block i mirrors down block n-1-i, with one more layer (the
    # downsampler's skip) and upsampling to the next skip's size, which is 2x
    # unless a side was odd on the way down.
    for i, block_type in enumerate(self.up_block_types):
      j = n - 1 - i
      count = layers[j] + 1
      res, skips = tuple(skips[-count:]), skips[:-count]
      size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      fields = dict(common, out_channels=channels[j], num_layers=count, add_sampler=i < n - 1)
      if block_type == "CrossAttnUpBlock2D":
        fields.update(
          heads=heads[j], transformer_layers=tlayers[j], only_cross_attention=only_cross[j]
        )
        x = self._block(block_type, **fields, name=f"up_blocks_{i}")(x, res, emb, context, size)
      else:
        x = self._block(block_type, **fields, name=f"up_blocks_{i}")(x, res, emb, size)

    # 5. Out.
    x = nn.silu(_group_norm(groups, eps, dt, "conv_norm_out")(x))
    x = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(x)
    return jnp.transpose(x, (0, 3, 1, 2))
