"""The fast kernels against plain references: chunked attention (forward and
its custom flash-attention VJP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import attention as attention_lib


def _numpy_attention(q, k, v, causal):
  """softmax(q k^T / sqrt(D)) v in float64 numpy; q [B, Lq, N, D], k/v [B, Lk, N, D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize(
  "lq,lk,chunk,causal",
  [(40, 40, 16, False), (40, 40, 16, True), (33, 7, 8, False), (64, 77, None, False)],
)
def test_chunked_attention_matches_plain_forward_and_gradients(lq, lk, chunk, causal):
  # Lq not a multiple of the chunk exercises the padding; Lk != Lq cross-attention.
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (2, lq, 3, 8))
  k = jax.random.normal(keys[1], (2, lk, 3, 8))
  v = jax.random.normal(keys[2], (2, lk, 3, 8))
  w = jax.random.normal(keys[3], (2, lq, 3, 8))  # A non-uniform cotangent.

  def loss(impl):
    return lambda q, k, v: jnp.sum(
      w * attention_lib.dot_product_attention(q, k, v, impl, is_causal=causal, chunk_size=chunk)
    )

  out = attention_lib.dot_product_attention(q, k, v, "chunked", is_causal=causal, chunk_size=chunk)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal), atol=2e-6, rtol=1e-5)
  fast = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
  plain = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", fast, plain, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_chunked_attention_bf16_keeps_float32_softmax():
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(x, (1, 48, 2, 16), jnp.bfloat16) for x in keys)
  out = attention_lib.dot_product_attention(q, k, v, "chunked", chunk_size=16)
  assert out.dtype == jnp.bfloat16
  ref = _numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), False)
  np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-2)
  g = jax.grad(
    lambda q: (
      attention_lib.dot_product_attention(q, k, v, "chunked", chunk_size=16)
      .astype(jnp.float32)
      .sum()
    )
  )(q)
  g_plain = jax.grad(
    lambda q: attention_lib.dot_product_attention(q, k, v, "xla").astype(jnp.float32).sum()
  )(q)
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(g.astype(np.float32), g_plain.astype(np.float32), atol=3e-2)


def test_auto_picks_chunked_for_long_cpu_sequences():
  q = jnp.zeros((1, 128, 1, 8))
  jaxpr = str(jax.make_jaxpr(lambda q: attention_lib.dot_product_attention(q, q, q, "auto"))(q))
  assert "custom_vjp" in jaxpr
  short = jnp.zeros((1, 64, 1, 8))
  jaxpr = str(jax.make_jaxpr(lambda q: attention_lib.dot_product_attention(q, q, q, "auto"))(short))
  assert "custom_vjp" not in jaxpr
