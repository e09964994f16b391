"""The one attention of every model (UNet now; VAE and CLIP use the same function).

`config.model.attention` picks how softmax(q k^T * scale) v is computed; the
result is the same up to rounding, so the choice is about speed and memory:

  xla      plain attention (two einsums and a softmax) that XLA compiles and
           fuses; works everywhere, stores the whole [B, heads, Lq, Lk]
           probability matrix for the backward pass. The same math as
           `jax.nn.dot_product_attention(implementation="xla")`, whose
           grouped-query reshape to 5-D dot products XLA:CPU runs 1.8x slower
           (fwd+bwd of [8, 1024, 8, 8], measured), so it is written out here.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash
           attention. NVIDIA GPU only, bfloat16/float16 only, head dim <= 128
           and a multiple of 8 (e.g. not the VAE's 512-wide single head).
  chunked  query-chunked memory-efficient attention (what diffusers' Flax
           `use_memory_efficient_attention=True` gave; Rabe & Staats 2021):
           queries in chunks of `CHUNK_SIZE` under `lax.map`, each chunk's
           probabilities recomputed in the backward pass (`jax.checkpoint`), so
           at most one chunk's [B, heads, chunk, Lk] matrix is alive at a time.
  auto     cudnn where it applies (GPU, half precision, supported head dim),
           xla elsewhere, decided per call from the shapes.

Every implementation accumulates q k^T in float32 and does the softmax in
float32 (cuDNN always does; the xla and chunked paths here too), which
is what diffusers' `upcast_attention=True` asks for, so that field needs no
extra work and `False` loses nothing.

Layout is JAX's: q [B, Lq, heads, D], k and v [B, Lk, heads, D].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "auto")
# Query rows per chunk of the "chunked" implementation (diffusers' Flax default).
CHUNK_SIZE = 1024
_HALF = (jnp.bfloat16, jnp.float16)


def check_implementation(implementation: str) -> str:
  """Returns `implementation` if it is a known name, else a ValueError naming the field."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"config.model.attention={implementation!r} is unknown; expected one of {IMPLEMENTATIONS}."
    )
  return implementation


def _cudnn_problem(q: jax.Array) -> str | None:
  """Why cuDNN flash attention cannot run `q`'s attention here, or None if it can."""
  backend = jax.default_backend()
  if backend != "gpu":
    return f"it needs an NVIDIA GPU (backend here: {backend})"
  if q.dtype not in _HALF:
    return f"it needs bfloat16 or float16 compute (got {q.dtype})"
  head_dim = q.shape[-1]
  if head_dim > 128 or head_dim % 8:
    return f"it needs a head dim <= 128 and a multiple of 8 (got {head_dim})"
  return None


def _chunked(q, k, v, scale, is_causal, chunk_size):
  """Query-chunked attention; same result as the plain one, one chunk's logits at a time."""
  b, lq, n, d = q.shape
  if lq <= chunk_size:
    return _plain(q, k, v, scale, is_causal, 0)
  chunks = -(-lq // chunk_size)
  pad = chunks * chunk_size - lq
  # Padded query rows are independent of the real ones and sliced off below.
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qp = qp.reshape(b, chunks, chunk_size, n, d).swapaxes(0, 1)
  offsets = jnp.arange(chunks) * chunk_size

  # Recompute each chunk's probabilities in the backward pass instead of keeping
  # all of them: that is the memory saving (prevent_cse=False: lax.map is a scan).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one(args):
    qc, offset = args
    return _plain(qc, k, v, scale, is_causal, offset)

  out = jax.lax.map(one, (qp, offsets))
  return out.swapaxes(0, 1).reshape(b, chunks * chunk_size, n, d)[:, :lq]


def _plain(q, k, v, scale, is_causal, q_offset, mask=None):
  """Einsum attention with float32 logits and softmax; `q_offset`: first query's position."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if is_causal:
    rows = jnp.arange(q.shape[1])[:, None] + q_offset
    cols = jnp.arange(k.shape[1])[None, :]
    logits = jnp.where(rows >= cols, logits, jnp.finfo(jnp.float32).min)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  implementation: str = "xla",
  *,
  is_causal: bool = False,
  mask: jax.Array | None = None,
  scale: float | None = None,
  chunk_size: int | None = None,
) -> jax.Array:
  """softmax(q k^T * scale [+ causal mask]) v, computed by `implementation`.

  Args:
    q: [B, Lq, heads, D] queries.
    k: [B, Lk, heads, D] keys.
    v: [B, Lk, heads, D] values.
    implementation: one of `IMPLEMENTATIONS` (`config.model.attention`).
    is_causal: query i attends to keys 0..i only (CLIP's text encoder).
    mask: optional bool, broadcastable to [B, heads, Lq, Lk]; True = attend
      (CLIP's padding mask). With a mask "chunked" runs unchunked: masks come
      with the 77-token text encoders, where chunking saves nothing.
    scale: logit scale; None = 1 / sqrt(D).
    chunk_size: query rows per chunk for "chunked"; None = `CHUNK_SIZE`.

  Returns:
    [B, Lq, heads, D] in q's dtype.

  Raises:
    ValueError: an unknown implementation, or "cudnn" where cuDNN cannot run it.
  """
  check_implementation(implementation)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation == "auto":
    implementation = "xla" if _cudnn_problem(q) else "cudnn"
  if implementation == "cudnn":
    problem = _cudnn_problem(q)
    if problem:
      raise ValueError(
        f"config.model.attention='cudnn' cannot run here: {problem}. Use 'xla' or 'chunked' "
        "(any backend and dtype), or 'auto' (cuDNN only where it applies)."
      )
  if implementation == "chunked" and mask is None:
    return _chunked(q, k, v, scale, is_causal, chunk_size or CHUNK_SIZE)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=is_causal, mask=mask, implementation="cudnn"
    )
  return _plain(q, k, v, scale, is_causal, 0, mask)


class Attention(nn.Module):
  """diffusers' `Attention` (to_q, to_k, to_v, to_out.0) on [B, L, C] tokens.

  Self-attention when `context` is None, else cross-attention to it. Parameter
  names are the PyTorch ones (`models.naming`): to_q/to_k/to_v/to_out_0.

  Attributes:
    heads: number of heads.
    dim_head: width of one head; the projections are heads * dim_head wide.
    out_dim: width of the output (the query's width).
    qkv_bias: whether to_q/to_k/to_v have biases (UNet: no; VAE: yes).
    implementation: a name of `IMPLEMENTATIONS`.
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  out_dim: int
  qkv_bias: bool = False
  implementation: str = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x [B, Lq, C], context [B, Lk, Cc] or None -> [B, Lq, out_dim]."""
    context = x if context is None else context
    inner = self.heads * self.dim_head
    dense = functools.partial(nn.Dense, inner, use_bias=self.qkv_bias, dtype=self.dtype)
    q = dense(name="to_q")(x)
    k = dense(name="to_k")(context)
    v = dense(name="to_v")(context)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
    out = dot_product_attention(split(q), split(k), split(v), self.implementation)
    out = out.reshape(*out.shape[:2], inner)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(out)
