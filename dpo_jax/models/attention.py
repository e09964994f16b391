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
           `use_memory_efficient_attention=True` gave; Rabe & Staats 2021)
           with a flash-attention backward pass (a custom VJP): queries in
           chunks under `lax.map`; the forward keeps only the output and each
           row's log-sum-exp, the backward recomputes one chunk's
           probabilities at a time, so at most one chunk's [B, heads, chunk,
           Lk] matrix is alive. Chunks: `CHUNK_SIZE` rows on accelerators; on
           CPU as many rows as keep a chunk's logits cache-sized, which makes
           it 2-4x faster than "xla" there at 1024 tokens (fwd+bwd).
  auto     cudnn where it applies (GPU, half precision, supported head dim);
           on CPU chunked from 128 x 128 logits per head up; xla elsewhere;
           decided per call from the shapes.

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
# CPU: float32 logits elements per chunk, [B, heads, rows, Lk] (2 MiB: cache-sized).
_CPU_TILE = 1 << 19
# "auto" on CPU uses "chunked" from this many logits per (batch, head) up.
_AUTO_CHUNKED_MIN = 128 * 128
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


def _chunk_rows(b: int, n: int, lq: int, lk: int, chunk_size: int | None) -> int:
  """Query rows per chunk: `chunk_size`, or the backend's default for these shapes."""
  if chunk_size:
    return min(chunk_size, lq)
  if jax.default_backend() != "cpu":
    return min(CHUNK_SIZE, lq)
  # CPU: a chunk's [B, heads, rows, Lk] logits should stay in cache (~2 MiB of
  # float32) so the exp, the row sums and both matmuls reread it from there,
  # not from memory; fewer than 16 rows costs more in loop overhead than it saves.
  rows = max(16, _CPU_TILE // max(1, b * n * lk))
  return min(1 << (rows.bit_length() - 1), CHUNK_SIZE, lq)


def _to_heads(x: jax.Array, chunk: int, chunks: int) -> jax.Array:
  """[B, L, heads, D] -> [chunks, B, heads, chunk, D], zero-padded to chunks * chunk rows."""
  b, length, n, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, chunks * chunk - length), (0, 0), (0, 0)))
  return x.reshape(b, chunks, chunk, n, d).transpose(1, 0, 3, 2, 4)


def _from_heads(x: jax.Array, length: int) -> jax.Array:
  """[chunks, B, heads, chunk, D] -> [B, length, heads, D] (inverse of `_to_heads`)."""
  chunks, b, n, chunk, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, chunks * chunk, n, d)[:, :length]


def _chunk_logits(qc, k, scale, is_causal, offset):
  """float32 q k^T * scale of one query chunk [B, heads, chunk, D] against k [B, heads, Lk, D]."""
  s = jnp.einsum("bnth,bnsh->bnts", qc, k, preferred_element_type=jnp.float32) * scale
  if is_causal:
    rows = jnp.arange(qc.shape[2])[:, None] + offset
    cols = jnp.arange(k.shape[2])[None, :]
    s = jnp.where(rows >= cols, s, jnp.finfo(jnp.float32).min)
  return s


def _chunked_forward(q, k, v, scale, is_causal, chunk_size):
  """The output [B, Lq, heads, D] and what the backward pass needs (flash attention's residuals)."""
  b, lq, n, _ = q.shape
  rows = _chunk_rows(b, n, lq, k.shape[1], chunk_size)
  chunks = -(-lq // rows)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def one(args):
    qc, offset = args
    s = _chunk_logits(qc, kh, scale, is_causal, offset)
    m = s.max(axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bnts,bnsh->bnth", e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    # Log-sum-exp of each row: the backward pass recomputes the probabilities from it.
    return (o / total).astype(q.dtype), m + jnp.log(total)

  out, lse = jax.lax.map(one, (_to_heads(q, rows, chunks), jnp.arange(chunks) * rows))
  return _from_heads(out, lq), (q, k, v, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(q, k, v, scale, is_causal, chunk_size):
  """Query-chunked attention with a flash-attention backward pass (Dao et al. 2022).

  Same result as `_plain` up to rounding; the forward pass keeps only the
  output and each row's log-sum-exp, and the backward pass recomputes one
  chunk's probabilities at a time. XLA's own backward of the plain form
  writes and rereads the whole [B, heads, Lq, Lk] matrix several times, which
  on CPU is what attention's time went to (1.4 s fwd+bwd at 1024 tokens).
  """
  return _chunked_forward(q, k, v, scale, is_causal, chunk_size)[0]


def _chunked_fwd(q, k, v, scale, is_causal, chunk_size):
  return _chunked_forward(q, k, v, scale, is_causal, chunk_size)


def _chunked_bwd(scale, is_causal, chunk_size, residuals, d_out):
  q, k, v, out, lse = residuals
  b, lq, n, _ = q.shape
  chunks, rows = out.shape[0], out.shape[3]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  do = _to_heads(d_out, rows, chunks)
  # D_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij: the softmax backward's row term.
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

  def one(carry, args):
    dk, dv = carry
    qc, doc, lse_c, delta_c, offset = args
    p = jnp.exp(_chunk_logits(qc, kh, scale, is_causal, offset) - lse_c)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    dv = dv + f32("bnts,bnth->bnsh", p.astype(doc.dtype), doc)
    dp = f32("bnth,bnsh->bnts", doc, vh)
    ds = (p * (dp - delta_c) * scale).astype(qc.dtype)
    dq = f32("bnts,bnsh->bnth", ds, kh).astype(q.dtype)
    dk = dk + f32("bnts,bnth->bnsh", ds, qc)
    return (dk, dv), dq

  zeros = jnp.zeros(kh.shape, jnp.float32)
  offsets = jnp.arange(chunks) * rows
  (dk, dv), dq = jax.lax.scan(
    one, (zeros, zeros), (_to_heads(q, rows, chunks), do, lse, delta, offsets)
  )
  back = lambda x, like: x.transpose(0, 2, 1, 3).astype(like.dtype)
  return _from_heads(dq, lq), back(dk, k), back(dv, v)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


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
    chunk_size: query rows per chunk for "chunked"; None = `CHUNK_SIZE` on
      accelerators, a cache-sized chunk on CPU.

  Returns:
    [B, Lq, heads, D] in q's dtype.

  Raises:
    ValueError: an unknown implementation, or "cudnn" where cuDNN cannot run it.
  """
  check_implementation(implementation)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation == "auto":
    if not _cudnn_problem(q):
      implementation = "cudnn"
    elif q.shape[1] * k.shape[1] >= _AUTO_CHUNKED_MIN and jax.default_backend() == "cpu":
      implementation = "chunked"
    else:
      implementation = "xla"
  if implementation == "cudnn":
    problem = _cudnn_problem(q)
    if problem:
      raise ValueError(
        f"config.model.attention='cudnn' cannot run here: {problem}. Use 'xla' or 'chunked' "
        "(any backend and dtype), or 'auto' (cuDNN only where it applies)."
      )
  if implementation == "chunked" and mask is None:
    return _chunked(q, k, v, scale, is_causal, chunk_size)
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
