"""The one PyTorch -> Flax naming rule (models.naming)."""

import numpy as np
import pytest

from dpo_jax.models import naming


def _expected(*paths_shapes):
  return {p: np.zeros(s) for p, s in paths_shapes}


def test_numbers_glue_to_the_previous_segment():
  assert naming.flax_module_path(
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"
  ) == (
    "down_blocks_0",
    "attentions_1",
    "transformer_blocks_0",
    "attn1",
    "to_out_0",
    "weight",
  )
  assert naming.flax_module_path("time_embedding.linear_1.bias") == (
    "time_embedding",
    "linear_1",
    "bias",
  )


def test_layouts():
  rng = np.random.default_rng(0)
  conv = rng.normal(size=(8, 3, 3, 2))  # [O, I, kh, kw]
  path, kernel = naming.torch_to_flax("conv_in.weight", conv, {})
  assert path == ("conv_in", "kernel") and kernel.shape == (3, 2, 3, 8)
  np.testing.assert_array_equal(kernel[1, 0, 2, 5], conv[5, 2, 1, 0])
  dense = rng.normal(size=(6, 4))  # [out, in]
  path, kernel = naming.torch_to_flax("a.1.to_q.weight", dense, {})
  assert path == ("a_1", "to_q", "kernel")
  np.testing.assert_array_equal(kernel, dense.T)
  path, scale = naming.torch_to_flax("norm.weight", np.ones(5), {})
  assert path == ("norm", "scale")
  path, bias = naming.torch_to_flax("norm.bias", np.ones(5), {})
  assert path == ("norm", "bias")


def test_embedding_is_not_transposed():
  table = np.arange(12.0).reshape(4, 3)
  expected = _expected((("emb", "token_embedding", "embedding"), (4, 3)))
  path, value = naming.torch_to_flax("emb.token_embedding.weight", table, expected)
  assert path == ("emb", "token_embedding", "embedding")
  np.testing.assert_array_equal(value, table)


@pytest.mark.parametrize("old,new", list(naming.LEGACY_ATTENTION_NAMES.items()))
def test_legacy_attention_names(old, new):
  path, _ = naming.torch_to_flax(f"mid_block.attentions.0.{old}.weight", np.ones((2, 2)), {})
  assert path == ("mid_block", "attentions_0", new, "kernel")
  assert naming.legacy_flax_path(("mid_block", "attentions_0", old, "bias")) == (
    "mid_block",
    "attentions_0",
    new,
    "bias",
  )
