"""diffusers' `AutoencoderKL` (the SD1.x / SD2.x / SDXL VAE) in Flax linen.

Built from the folder's `vae/config.json`; parameters are named as the PyTorch
state dict (`encoder/down_blocks_0/resnets_0/conv1/kernel`,
`decoder/mid_block/attentions_0/to_q/kernel`, `quant_conv/kernel`, ...; see
`models.naming`). The public methods take and return channels-first arrays, as
PyTorch does; inside, everything is channels-last (NHWC, XLA's conv layout).

  posterior = vae.apply(v, images [B,3,H,W], method=vae.encode)  # DiagonalGaussian, NCHW
  latents = (posterior.mode() - shift_factor) * scaling_factor   # what the UNet sees
  images = vae.apply(v, latents / scaling_factor + shift_factor, method=vae.decode)

`models.conditioning.vae_encode / vae_decode` do the scaling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models import attention

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu}
_DOWN_BLOCKS = ("DownEncoderBlock2D",)
_UP_BLOCKS = ("UpDecoderBlock2D",)
# diffusers' encoder / decoder hard-code these.
_EPS = 1e-6


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """One-head attention over [B, L, C] (float32 softmax, as diffusers upcasts it)."""
  return attention.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], "xla")[
    :, :, 0
  ]


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """diffusers' `AutoencoderKL` config fields (with its defaults)."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], source: str = "VAE config") -> AutoencoderKLConfig:
    """From a `vae/config.json` dict; a value this VAE does not implement is refused by name.

    Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
    c = cls(**kw)

    def refuse(field, value, implemented):
      raise ValueError(
        f"{source}: {field}={value!r} is not supported by dpo_jax's AutoencoderKL, which "
        f"implements {implemented}."
      )

    if c.act_fn not in _ACTIVATIONS:
      refuse("act_fn", c.act_fn, f"act_fn in {sorted(_ACTIVATIONS)}")
    for field, allowed in (("down_block_types", _DOWN_BLOCKS), ("up_block_types", _UP_BLOCKS)):
      for block in getattr(c, field):
        if block not in allowed:
          refuse(field, getattr(c, field), f"only {allowed[0]} blocks")
    n = len(c.block_out_channels)
    if len(c.down_block_types) != n or len(c.up_block_types) != n:
      raise ValueError(
        f"{source}: block_out_channels has {n} entries but down_block_types "
        f"{len(c.down_block_types)} and up_block_types {len(c.up_block_types)}; they must match."
      )
    for ch in c.block_out_channels:
      if ch % c.norm_num_groups:
        raise ValueError(
          f"{source}: block_out_channels {c.block_out_channels} are not all divisible by "
          f"norm_num_groups={c.norm_num_groups}."
        )
    # diffusers' AutoencoderKL ignores these itself; only some pipelines read
    # them, so a latent cache built without them would silently differ.
    for field in ("latents_mean", "latents_std"):
      if getattr(c, field) is not None:
        refuse(field, getattr(c, field), f"only {field}=None (use shift_factor/scaling_factor)")
    return c


@flax.struct.dataclass
class DiagonalGaussian:
  """diffusers' `DiagonalGaussianDistribution` (the VAE posterior), channels first.

  Attributes:
    mean: [B, C, h, w].
    logvar: [B, C, h, w], clipped to [-30, 20] as diffusers does.
  """

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, rng: jax.Array) -> jax.Array:
    """mean + std * N(0, 1), the noise drawn in float32."""
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
    return (self.mean + self.std * eps).astype(self.mean.dtype)


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, pad: int | str = 1):
  padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
  return nn.Conv(
    features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name
  )


class ResnetBlock2D(nn.Module):
  """diffusers' `ResnetBlock2D` without a time embedding (eps 1e-6, output scale 1)."""

  out_channels: int
  groups: int
  act_fn: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _ACTIVATIONS[self.act_fn]
    h = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, name="norm1")(x)
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(act(h))
    h = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, name="norm2")(h)
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(act(h))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut", pad=0)(x)
    return x + h


class VAEAttention(nn.Module):
  """The mid block's single-head spatial self-attention (diffusers' `Attention` there)."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, name="group_norm")(x)
    y = y.reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
    y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(_attention(q, k, v))
    return x + y.reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
  channels: int
  groups: int
  act_fn: str
  add_attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    res = lambda i: ResnetBlock2D(
      self.channels, self.groups, self.act_fn, self.dtype, name=f"resnets_{i}"
    )
    x = res(0)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
    return res(1)(x)


class Encoder(nn.Module):
  config: AutoencoderKLConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]."""
    c = self.config
    x = _conv(c.block_out_channels[0], 3, self.dtype, "conv_in")(x)
    last = len(c.block_out_channels) - 1
    for i, ch in enumerate(c.block_out_channels):
      x = _Block(ch, c.layers_per_block, c, i < last, "down", self.dtype, name=f"down_blocks_{i}")(
        x
      )
    x = UNetMidBlock2D(
      c.block_out_channels[-1],
      c.norm_num_groups,
      c.act_fn,
      c.mid_block_add_attention,
      self.dtype,
      name="mid_block",
    )(x)
    x = nn.GroupNorm(c.norm_num_groups, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(x)
    return _conv(2 * c.latent_channels, 3, self.dtype, "conv_out")(_ACTIVATIONS[c.act_fn](x))


class _Block(nn.Module):
  """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then a 2x down / up sampler."""

  channels: int
  num_layers: int
  config: AutoencoderKLConfig
  resample: bool
  direction: str  # "down" or "up"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    for j in range(self.num_layers):
      x = ResnetBlock2D(
        self.channels, c.norm_num_groups, c.act_fn, self.dtype, name=f"resnets_{j}"
      )(x)
    if not self.resample:
      return x
    if self.direction == "down":
      # diffusers' Downsample2D(padding=0): pad right/bottom by one, stride-2 conv.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return _Resample(self.channels, 2, "VALID", self.dtype, name="downsamplers_0")(x)
    # Upsample2D: nearest-neighbour 2x, then a 3x3 conv.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _Resample(self.channels, 1, 1, self.dtype, name="upsamplers_0")(x)


class _Resample(nn.Module):
  channels: int
  stride: int
  pad: int | str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(self.channels, 3, self.dtype, "conv", stride=self.stride, pad=self.pad)(x)


class Decoder(nn.Module):
  config: AutoencoderKLConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """[B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""
    c = self.config
    channels = tuple(reversed(c.block_out_channels))
    x = _conv(channels[0], 3, self.dtype, "conv_in")(z)
    x = UNetMidBlock2D(
      channels[0],
      c.norm_num_groups,
      c.act_fn,
      c.mid_block_add_attention,
      self.dtype,
      name="mid_block",
    )(x)
    for i, ch in enumerate(channels):
      layers = c.layers_per_block + 1
      x = _Block(ch, layers, c, i < len(channels) - 1, "up", self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.GroupNorm(c.norm_num_groups, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(x)
    return _conv(c.out_channels, 3, self.dtype, "conv_out")(_ACTIVATIONS[c.act_fn](x))


class AutoencoderKL(nn.Module):
  """diffusers' `AutoencoderKL`. Build with `AutoencoderKL.from_config(dict_or_config)`.

  Attributes:
    config: an `AutoencoderKLConfig`.
    dtype: compute dtype. float16 with `config.force_upcast` computes in
      float32, as diffusers' pipelines upcast such a VAE (the SDXL VAE
      overflows in float16); bfloat16 has float32's range and is kept.
  """

  config: AutoencoderKLConfig
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | AutoencoderKLConfig, dtype: Any = jnp.float32):
    if not isinstance(config, AutoencoderKLConfig):
      config = AutoencoderKLConfig.from_dict(config)
    return cls(config, dtype=dtype)

  @property
  def block_out_channels(self) -> tuple[int, ...]:
    return self.config.block_out_channels

  @property
  def scaling_factor(self) -> float:
    return float(self.config.scaling_factor)

  @property
  def shift_factor(self) -> float:
    return float(self.config.shift_factor or 0.0)

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.config.block_out_channels) - 1)

  def _compute_dtype(self) -> Any:
    if self.config.force_upcast and jnp.dtype(self.dtype) == jnp.float16:
      return jnp.float32
    return self.dtype

  def setup(self):
    c, dtype = self.config, self._compute_dtype()
    self.encoder = Encoder(c, dtype)
    self.decoder = Decoder(c, dtype)
    if c.use_quant_conv:
      self.quant_conv = _conv(2 * c.latent_channels, 1, dtype, "quant_conv", pad=0)
    if c.use_post_quant_conv:
      self.post_quant_conv = _conv(c.latent_channels, 1, dtype, "post_quant_conv", pad=0)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """images [B, in_channels, H, W] (in [-1, 1]) -> posterior over [B, C, H/f, W/f]."""
    x = jnp.transpose(images, (0, 2, 3, 1)).astype(self._compute_dtype())
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = jnp.transpose(moments, (0, 3, 1, 2))
    mean, logvar = jnp.split(moments, 2, axis=1)
    return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents [B, C, h, w] -> images [B, out_channels, h*f, w*f] (about [-1, 1])."""
    z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self._compute_dtype())
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Reconstruction (posterior mode, or a sample with `rng`); used to init the params."""
    posterior = self.encode(images)
    return self.decode(posterior.mode() if rng is None else posterior.sample(rng))

  def init_abstract(self) -> dict[str, Any]:
    """The parameter tree as ShapeDtypeStructs (no random init), from a 1 x H x W image."""
    side = self.downsampling_factor
    images = jax.ShapeDtypeStruct((1, self.config.in_channels, side, side), jnp.float32)
    return jax.eval_shape(self.init, jax.random.key(0), images)["params"]
