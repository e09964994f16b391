"""Our Flax UNet2DConditionModel vs PyTorch diffusers' on the same random weights.

Each config is a tiny copy of a real family's structure. The PyTorch model is
saved with `save_pretrained` (config.json + safetensors, the hub format) and
read back by `loader.load_unet`, so the test covers config parsing, the
PyTorch -> Flax naming rule and the forward pass together.
"""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpo_jax.models import attention as attention_lib  # noqa: E402
from dpo_jax.models import loader, unet2d  # noqa: E402
from dpo_jax.models import unet as unet_lib  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # float32 PyTorch vs XLA: summation order only.

CONFIGS = {
  # SD1.5: attention at the highest resolution, conv projections, heads given
  # as attention_head_dim, default norm groups 32, two layers per block.
  "sd15": {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": 4,
    "cross_attention_dim": 24,
  },
  # SD2: linear projections, per-block head counts (attention_head_dim is the
  # number of heads), norm_num_groups 16, upcast attention; also per-block
  # layers and only_cross_attention, and the other time-embedding convention.
  "sd2": {
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": (1, 2, 1),
    "attention_head_dim": (2, 4, 8),
    "norm_num_groups": 16,
    "norm_eps": 1e-6,
    "use_linear_projection": True,
    "upcast_attention": True,
    "only_cross_attention": (True, False, False),
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "cross_attention_dim": 24,
  },
  # SDXL: no attention at the highest resolution, several transformer layers
  # per block, text_time added conditioning.
  "sdxl": {
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4, 8),
    "transformer_layers_per_block": (1, 1, 2),
    "use_linear_projection": True,
    "cross_attention_dim": 40,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
  },
}


def _torch_unet(config: dict):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    # Norm scales are 1 and biases small at init: perturb every 1-D parameter
    # so that a norm scale, bias or shift loaded into the wrong place shows.
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(config: dict, side: tuple[int, int], seed: int = 1):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(2, 4, *side, generator=g)
  t = torch.tensor([10, 700])
  context = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
  added = None
  if config.get("addition_embed_type") == "text_time":
    added = {
      "text_embeds": torch.randn(2, 16, generator=g),
      "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32], [64.0, 48, 4, 8, 32, 32]]),
    }
  return x, t, context, added


def _to_jax(tree):
  if tree is None:
    return None
  if isinstance(tree, dict):
    return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}
  return jnp.asarray(tree.numpy())


@pytest.fixture(scope="module")
def load(tmp_path_factory):
  """name -> (name, config, PyTorch model, our module, params) via save_pretrained, load_unet."""
  cache = {}

  def get(name):
    if name not in cache:
      model = _torch_unet(CONFIGS[name])
      path = str(tmp_path_factory.mktemp(name))
      model.save_pretrained(path)
      module, params = loader.load_unet(path)
      cache[name] = (name, CONFIGS[name], model, module, params)
    return cache[name]

  return get


def _max_diff(pair, side, module=None) -> tuple[float, float]:
  name, config, model, ours, params = pair
  x, t, context, added = _inputs(config, side)
  with torch.no_grad():
    want = model(x, t, context, added_cond_kwargs=added).sample.numpy()
  apply = jax.jit(unet_lib.make_unet_apply(module or ours))
  got = np.asarray(apply(params, _to_jax(x), _to_jax(t), _to_jax(context), _to_jax(added)))
  assert got.shape == want.shape
  return float(np.abs(got - want).max()), float(np.abs(want).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_pytorch(load, name):
  diff, scale = _max_diff(load(name), (8, 8))
  print(f"{name}: max abs diff {diff:.2e} (output max {scale:.2f})")
  assert scale > 0.1 and diff <= TOL


def test_parity_with_odd_sizes(load):
  """Sides that do not halve evenly (9 -> 5 -> 3 and back): each upsampler goes to its
  skip's size, as diffusers' `upsample_size`."""
  diff, _ = _max_diff(load("sd2"), (9, 6))
  print(f"sd2 9x6: max abs diff {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_names_are_the_pytorch_keys(load, name):
  _, _, model, _, params = load(name)
  flat = {"/".join(path) for path in _paths(params)}
  keys = set(model.state_dict())
  assert len(flat) == len(keys)
  assert "down_blocks_0/resnets_0/conv1/kernel" in flat
  assert "mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel" in flat
  assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight" in keys


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def test_chunked_attention_unet_matches_xla(load, monkeypatch):
  """The whole UNet with query-chunked attention (chunks of 24 of the 64 tokens)."""
  monkeypatch.setattr(attention_lib, "CHUNK_SIZE", 24)
  _, config, _, ours, params = load("sd15")
  args = [_to_jax(a) for a in _inputs(config, (8, 8))]
  xla = jax.jit(unet_lib.make_unet_apply(ours))(params, *args)
  chunked = unet_lib.with_attention(ours, "chunked")
  got = jax.jit(unet_lib.make_unet_apply(chunked))(params, *args)
  assert float(jnp.abs(got - xla).max()) <= 1e-5


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_implementations_agree_with_numpy(is_causal):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 37, 3, 8)).astype(np.float32) for _ in range(3))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
  if is_causal:
    logits = np.where(np.tril(np.ones((37, 37), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)
  for impl, kw in (("xla", {}), ("auto", {}), ("chunked", {"chunk_size": 10})):
    got = attention_lib.dot_product_attention(q, k, v, impl, is_causal=is_causal, **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=impl)
  # "xla" is JAX's own XLA attention, written out (faster on XLA:CPU).
  jax_nn = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  np.testing.assert_allclose(jax_nn, want, atol=1e-5)


def test_chunked_attention_gradients_match_xla():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32) for _ in range(3))
  w = jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32)

  def loss(impl, q, k, v):
    return jnp.sum(w * attention_lib.dot_product_attention(q, k, v, impl, chunk_size=16))

  grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))
  want, got = grad("xla")(q, k, v), grad("chunked")(q, k, v)
  for g, x in zip(got, want):
    np.testing.assert_allclose(g, x, atol=1e-5)


def test_attention_choice_errors():
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"attention='cudnn'.*NVIDIA GPU.*'xla' or 'chunked'"):
    attention_lib.dot_product_attention(q, q, q, "cudnn")
  with pytest.raises(ValueError, match=r"config.model.attention='flash' is unknown"):
    attention_lib.dot_product_attention(q, q, q, "flash")


BASE = CONFIGS["sd15"]


@pytest.mark.parametrize(
  "field,value",
  [
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("time_cond_proj_dim", 8),
    ("act_fn", "gelu"),
    ("mid_block_type", None),
    ("attention_type", "gated"),
    ("cross_attention_norm", "group_norm"),
    ("conv_in_kernel", 5),
    ("encoder_hid_dim_type", "text_proj"),
    ("dual_cross_attention", True),
    ("addition_embed_type", "text"),
    ("center_input_sample", True),
    ("dropout", 0.1),
    ("norm_num_groups", None),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    ("transformer_layers_per_block", ((1, 2), (1, 1))),
    ("some_new_field", 1),
  ],
)
def test_unimplemented_config_values_are_refused_by_name(field, value):
  with pytest.raises(ValueError) as e:
    unet2d.UNet2DConditionModel.from_config({**BASE, field: value})
  msg = str(e.value)
  assert field in msg and repr(value)[:20] in msg, msg


def test_config_quirks_and_bookkeeping():
  # diffusers' quirk: without num_attention_heads, attention_head_dim counts heads.
  quirk = unet2d.UNet2DConditionModel.from_config({**BASE, "_class_name": "x", "sample_size": 8})
  explicit = unet2d.UNet2DConditionModel.from_config({**BASE, "num_attention_heads": 4})
  assert quirk.heads_per_block == explicit.heads_per_block == (4, 4)
  params = jax.eval_shape(quirk.init_weights, jax.random.PRNGKey(0))
  # 4 heads over 32 channels: the projections are 32 wide whatever the head count.
  to_q = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
  assert to_q["kernel"].shape == (32, 32) and "bias" not in to_q
  with pytest.raises(ValueError, match="3 attention heads do not divide"):
    unet2d.UNet2DConditionModel.from_config({**BASE, "attention_head_dim": 3})


# sha256 (first 16 hex) of the sorted (path, shape) list of diffusers 0.39's
# FlaxUNet2DConditionModel parameter tree for CONFIGS[name] (304 / 408 arrays),
# recorded with diffusers 0.39.0, the last release with Flax models.
OLD_FLAX_TREE = {"sd15": "d4f8774b6b725204", "sdxl": "fe0ba1635c5c09da"}


def _tree_fingerprint(flat) -> str:
  import hashlib

  listing = sorted(("/".join(k), tuple(v.shape)) for k, v in flat.items())
  return hashlib.sha256(repr(listing).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_old_diffusers_flax_tree_is_ours(name):
  """Checkpoints written with diffusers' Flax UNet restore into ours as they are:
  its UNet already named attention to_q/to_k/to_v/to_out_0 (only its VAE used
  query/key/value/proj_attn), and every other path and shape is the same. Compared
  with the old tree itself where diffusers still has it, else with its recorded
  fingerprint."""
  from flax.traverse_util import flatten_dict

  ours = unet2d.UNet2DConditionModel.from_config(CONFIGS[name])
  new = flatten_dict(jax.eval_shape(ours.init_weights, jax.random.PRNGKey(0)))
  assert _tree_fingerprint(new) == OLD_FLAX_TREE[name]
  if hasattr(diffusers, "FlaxUNet2DConditionModel"):
    old_module = diffusers.FlaxUNet2DConditionModel(**CONFIGS[name])
    old = flatten_dict(jax.eval_shape(old_module.init_weights, jax.random.PRNGKey(0)))
    assert _tree_fingerprint(old) == OLD_FLAX_TREE[name]
