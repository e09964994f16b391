"""Pretrained-pipeline loading: tiny PyTorch SD1.5 / SDXL folders vs their Flax loads.

The folders are written by `dpo_jax.tools.make_tiny_pipeline` with the PyTorch
diffusers/transformers classes (the exact hub format), then loaded with
`dpo_jax.models.loader` and compared with the PyTorch pipeline on the same
inputs: UNet (incl. SDXL's added conditioning), text encoders (through the
pipelines' own `encode_prompt`), VAE encode/decode, and SDXL `add_time_ids`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is local.

import json  # noqa: E402
import shutil  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402

from dpo_jax import diffusion  # noqa: E402
from dpo_jax.models import conditioning, loader  # noqa: E402
from dpo_jax.models.unet import make_unet_apply  # noqa: E402
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline  # noqa: E402
from tests.fixtures import torch_unet_inputs  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# float32 PyTorch vs XLA on the same weights; differences are summation order.
TOL = 1e-4
PROMPTS = [
  "a photo of a red cat",
  "",  # Caption dropout: the empty prompt.
  " ".join(["a painting of a blue dog in the style of van gogh"] * 12),  # > 77 tokens.
]


def _max_diff(a, b) -> float:
  a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
  return make_tiny_pipeline("sd15", str(tmp_path_factory.mktemp("sd15")), seed=0)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  return make_tiny_pipeline("sdxl", str(tmp_path_factory.mktemp("sdxl")), seed=1)


@pytest.fixture(scope="module")
def sd15(sd15_dir):
  return loader.load_pipeline(sd15_dir)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
  return loader.load_pipeline(sdxl_dir)


@pytest.fixture(scope="module")
def torch_sd15(sd15_dir):
  return diffusers.StableDiffusionPipeline.from_pretrained(sd15_dir).to(torch.float32)


@pytest.fixture(scope="module")
def torch_sdxl(sdxl_dir):
  return diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_dir).to(torch.float32)


def test_pipeline_metadata(sd15, sdxl):
  assert (sd15.kind, sdxl.kind) == ("sd15", "sdxl")
  assert sd15.vae_scaling_factor == pytest.approx(0.18215)
  assert sdxl.vae_scaling_factor == pytest.approx(0.13025)
  assert sd15.text_encoder_2 is None and sd15.tokenizer_2 is None
  assert sdxl.scheduler_config["prediction_type"] == "epsilon"
  assert sdxl.scheduler_config["beta_schedule"] == "scaled_linear"
  # The scheduler config feeds the trainer's noise schedule as is.
  schedule = diffusion.make_noise_schedule(sd15.scheduler_config)
  assert schedule.alphas_cumprod.shape == (1000,)
  for params in (sd15.unet_params, sdxl.text_encoder_2_params):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_parity(kind, request):
  pipe = request.getfixturevalue(kind)
  torch_pipe = request.getfixturevalue(f"torch_{kind}")
  x, t, context, added = torch_unet_inputs(kind, torch_pipe.unet.config.cross_attention_dim)
  with torch.no_grad():
    want = torch_pipe.unet(x, t, context, added_cond_kwargs=added).sample
  apply = jax.jit(make_unet_apply(pipe.unet))
  added_jax = None if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()}
  got = apply(
    pipe.unet_params,
    jnp.asarray(x.numpy()),
    jnp.asarray(t.numpy()),
    jnp.asarray(context.numpy()),
    added_jax,
  )
  diff = _max_diff(got, want)
  print(f"{kind} unet max abs diff {diff:.2e} (output scale {float(want.abs().max()):.2f})")
  assert diff <= TOL


def test_sd15_text_encoder_parity(sd15, torch_sd15):
  ids = conditioning.tokenize(sd15.tokenizer, PROMPTS)
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  eos = sd15.tokenizer.eos_token_id
  assert ids[2, -1] == eos  # Truncated at 77 with end-of-text kept last.
  with torch.no_grad():
    want, _ = torch_sd15.encode_prompt(PROMPTS, "cpu", 1, False)
    want_pooled = torch_sd15.text_encoder(torch.from_numpy(ids).long()).pooler_output
  got, pooled = conditioning.make_prompt_encoder(sd15)(PROMPTS)
  diff = _max_diff(got, want)
  print(f"sd15 text encoder max abs diff {diff:.2e}")
  assert got.shape == (3, 77, 32)
  assert diff <= TOL
  # The pooled output (Diffusion-RPO's text embedding) is CLIP's pooler_output.
  assert pooled.shape == (3, 32) and _max_diff(pooled, want_pooled) <= TOL


def test_sdxl_text_encoders_parity(sdxl, torch_sdxl):
  with torch.no_grad():
    want_context, _, want_pooled, _ = torch_sdxl.encode_prompt(
      PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
  context, pooled = conditioning.make_prompt_encoder(sdxl)(PROMPTS)
  assert context.shape == (3, 77, 32 + 48) and pooled.shape == (3, 48)
  diffs = (_max_diff(context, want_context), _max_diff(pooled, want_pooled))
  print(f"sdxl text encoders max abs diff context {diffs[0]:.2e} pooled {diffs[1]:.2e}")
  assert max(diffs) <= TOL
  # tokenizer_2 pads with "!" (id 0), tokenizer with end-of-text.
  ids_2 = conditioning.tokenize(sdxl.tokenizer_2, ["a cat"])
  assert ids_2[0, -1] == 0 and conditioning.tokenize(sdxl.tokenizer, ["a cat"])[0, -1] != 0


def test_sdxl_add_time_ids(sdxl, torch_sdxl):
  got = conditioning.add_time_ids((1024, 768), (16, 0), (1024, 1024))
  np.testing.assert_array_equal(got, [1024, 768, 16, 0, 1024, 1024])
  want = torch_sdxl._get_add_time_ids(
    (1024, 768), (16, 0), (1024, 1024), dtype=torch.float32, text_encoder_projection_dim=48
  )
  np.testing.assert_array_equal(got[None], want.numpy())
  # Per-sample sizes (Pick-a-Pic images differ) with a shared target size.
  per_sample = conditioning.add_time_ids(
    jnp.array([[512, 512], [768, 1024]]), jnp.array([[0, 0], [3, 5]]), (1024, 1024)
  )
  np.testing.assert_array_equal(
    per_sample, [[512, 512, 0, 0, 1024, 1024], [768, 1024, 3, 5, 1024, 1024]]
  )
  _, pooled = conditioning.make_prompt_encoder(sdxl)(["x", "y"])
  added = conditioning.sdxl_added_cond(pooled, got)
  assert added["text_embeds"].shape == (2, 48) and added["time_ids"].shape == (2, 6)


def test_vae_parity(sd15, torch_sd15):
  torch.manual_seed(0)
  images = torch.rand(2, 3, 32, 32) * 2 - 1
  scale = sd15.vae_scaling_factor
  with torch.no_grad():
    want = torch_sd15.vae.encode(images).latent_dist.mean * scale
    want_decoded = torch_sd15.vae.decode(want / scale).sample
  encode = jax.jit(conditioning.vae_encode, static_argnums=(0, 3))
  got = encode(sd15.vae, sd15.vae_params, jnp.asarray(images.numpy()), scale)
  decoded = jax.jit(conditioning.vae_decode, static_argnums=(0, 3))(
    sd15.vae, sd15.vae_params, jnp.asarray(want.numpy()), scale
  )
  diffs = (_max_diff(got, want), _max_diff(decoded, want_decoded))
  print(f"vae max abs diff latents(mean) {diffs[0]:.2e} decoded {diffs[1]:.2e}")
  assert got.shape == (2, 4, 16, 16)
  assert max(diffs) <= TOL
  sampled = encode(sd15.vae, sd15.vae_params, jnp.asarray(images.numpy()), scale, jax.random.key(0))
  assert sampled.shape == got.shape and not np.allclose(sampled, got)


def _copy_component(src: str, dst: str) -> str:
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  return dst


def test_missing_files_name_the_path(sd15_dir, tmp_path):
  unet_dir = _copy_component(os.path.join(sd15_dir, "unet"), str(tmp_path / "unet"))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors") as e:
    loader.load_unet(unet_dir)
  assert unet_dir in str(e.value)
  with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.fp16\.safetensors"):
    loader.load_unet(os.path.join(sd15_dir, "unet"), variant="fp16")
  os.remove(os.path.join(unet_dir, "config.json"))
  with pytest.raises(FileNotFoundError, match=os.path.join(unet_dir, "config.json")):
    loader.load_unet(unet_dir)
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    loader.load_pipeline(str(tmp_path))


def test_pipeline_without_unet_weights_reads_none(sd15, sd15_dir, tmp_path):
  """unet_weights=False (sampling with params being trained): the UNet file is never read."""
  copy = str(tmp_path / "pipe")
  shutil.copytree(sd15_dir, copy)
  os.remove(os.path.join(copy, "unet", "diffusion_pytorch_model.safetensors"))
  pipe = loader.load_pipeline(copy, unet_weights=False)
  assert pipe.unet_params is None and pipe.unet == sd15.unet
  assert (
    _max_diff(
      pipe.vae_params["encoder"]["conv_in"]["kernel"],
      sd15.vae_params["encoder"]["conv_in"]["kernel"],
    )
    == 0
  )
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
    loader.load_pipeline(copy)


@pytest.mark.parametrize(
  "key,bad_shape",
  [
    ("encoder.conv_in.weight", (32, 3, 3, 1)),  # conv: [O, I, H, W] -> [H, W, I, O]
    ("encoder.mid_block.attentions.0.to_q.weight", (64, 32)),  # attention projection
  ],
)
def test_wrong_shape_names_key_and_shapes(sd15_dir, tmp_path, key, bad_shape):
  src = os.path.join(sd15_dir, "vae")
  vae_dir = _copy_component(src, str(tmp_path / "vae"))
  state = safetensors.numpy.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  good_shape = state[key].shape
  state[key] = np.zeros(bad_shape, np.float32)
  safetensors.numpy.save_file(state, os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError) as e:
    loader.load_vae(vae_dir)
  msg = str(e.value)
  assert key in msg and str(bad_shape) in msg and vae_dir in msg, msg
  # The expected shape is given in Flax layout.
  flax_shape = good_shape[::-1] if len(good_shape) == 2 else (3, 3, 3, 32)
  assert str(flax_shape) in msg, msg


def test_missing_and_unexpected_tensors(sd15_dir, tmp_path):
  src = os.path.join(sd15_dir, "vae")
  vae_dir = _copy_component(src, str(tmp_path / "vae"))
  path = os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")
  state = safetensors.numpy.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  del state["decoder.conv_out.bias"]
  safetensors.numpy.save_file(state, path)
  with pytest.raises(ValueError, match="lacks 1 parameter.*decoder/conv_out/bias"):
    loader.load_vae(vae_dir)
  state["decoder.conv_out.bias"] = np.zeros(3, np.float32)
  state["decoder.extra.weight"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(state, path)
  with pytest.raises(ValueError, match="does not use.*decoder.extra.weight"):
    loader.load_vae(vae_dir)


def test_unsupported_config_is_rejected(sd15_dir, tmp_path):
  unet_dir = _copy_component(os.path.join(sd15_dir, "unet"), str(tmp_path / "unet"))
  config_path = os.path.join(unet_dir, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["resnet_time_scale_shift"] = "scale_shift"
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="resnet_time_scale_shift"):
    loader.load_unet(unet_dir)


def _assert_trees_equal(a, b):
  flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg="/".join(k))


def test_msgpack_roundtrip(sd15, sd15_dir, tmp_path):
  unet_dir = _copy_component(os.path.join(sd15_dir, "unet"), str(tmp_path / "unet"))
  with open(os.path.join(unet_dir, "diffusion_flax_model.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(sd15.unet_params))
  _, params = loader.load_unet(unet_dir)
  _assert_trees_equal(params, sd15.unet_params)
  # A msgpack with diffusers-Flax's other attention names (its VAE's
  # query/key/value/proj_attn) maps to ours too.
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
  flat = flax.traverse_util.flatten_dict(sd15.unet_params)
  legacy = {tuple(old.get(p, p) for p in k): v for k, v in flat.items()}
  assert any("proj_attn" in k for k in legacy)
  with open(os.path.join(unet_dir, "diffusion_flax_model.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(flax.traverse_util.unflatten_dict(legacy)))
  _, params = loader.load_unet(unet_dir)
  _assert_trees_equal(params, sd15.unet_params)


def test_variant_dtype_and_bin(sd15, sd15_dir, torch_sd15, tmp_path):
  # fp16 variant file, loaded into float32 and bfloat16 parameters.
  src = os.path.join(sd15_dir, "vae")
  vae_dir = _copy_component(src, str(tmp_path / "vae"))
  state = safetensors.numpy.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  state16 = {k: v.astype(np.float16) for k, v in state.items()}
  safetensors.numpy.save_file(
    state16, os.path.join(vae_dir, "diffusion_pytorch_model.fp16.safetensors")
  )
  _, params = loader.load_vae(vae_dir, variant="fp16")
  leaves, ref = jax.tree.leaves(params), jax.tree.leaves(sd15.vae_params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert max(_max_diff(a, b) for a, b in zip(leaves, ref)) < 1e-2
  _, params_bf16 = loader.load_vae(vae_dir, variant="fp16", param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params_bf16))
  # A torch pickle (`.bin`) gives the same parameters as the safetensors file.
  te_dir = _copy_component(os.path.join(sd15_dir, "text_encoder"), str(tmp_path / "te"))
  torch.save(torch_sd15.text_encoder.state_dict(), os.path.join(te_dir, "pytorch_model.bin"))
  _, te_params = loader.load_text_encoder(te_dir)
  _assert_trees_equal(te_params, sd15.text_encoder_params)


def test_sharded_and_legacy_attention_names(sd15, sd15_dir, tmp_path):
  """A sharded safetensors VAE with pre-0.14 attention names (hub SD1.5 VAEs have them)."""
  src = os.path.join(sd15_dir, "vae")
  vae_dir = _copy_component(src, str(tmp_path / "vae"))
  state = safetensors.numpy.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  for new, old in legacy.items():
    state = {k.replace(f".{new}.", f".{old}."): v for k, v in state.items()}
  assert any(".proj_attn." in k for k in state)
  keys = sorted(state)
  shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
  for name, shard_keys in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in shard_keys}, os.path.join(vae_dir, name))
  index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
  with open(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  _, params = loader.load_vae(vae_dir)
  _assert_trees_equal(params, sd15.vae_params)


def test_flax_written_pipeline_loads(tmp_path):
  """The no-torch writer (msgpack weights everywhere) round-trips through the loader."""
  path = make_tiny_pipeline(
    "sdxl", str(tmp_path), seed=3, prediction_type="v_prediction", backend="flax"
  )
  pipe = loader.load_pipeline(path)
  assert pipe.kind == "sdxl" and pipe.scheduler_config["prediction_type"] == "v_prediction"
  context, pooled = conditioning.make_prompt_encoder(pipe)(["a cat", "a dog"])
  assert context.shape == (2, 77, 80) and pooled.shape == (2, 48)
  assert np.isfinite(context).all() and np.isfinite(pooled).all()


def test_scheduler_prediction_type(sd15_dir, tmp_path):
  with open(os.path.join(sd15_dir, "scheduler", "scheduler_config.json")) as f:
    config = json.load(f)
  path = tmp_path / "scheduler_config.json"
  for value, want in ((None, "epsilon"), ("v_prediction", "v_prediction"), ("sample", None)):
    edited = {k: v for k, v in config.items() if k != "prediction_type"}
    if value is not None:
      edited["prediction_type"] = value
    path.write_text(json.dumps(edited))
    if want is None:
      with pytest.raises(ValueError, match="prediction_type"):
        loader.load_scheduler_config(str(tmp_path))
    else:
      loaded = loader.load_scheduler_config(str(tmp_path))
      assert loaded["prediction_type"] == want and "_class_name" not in loaded


def _half(tree):
  """float32 params -> float16 and back, as numpy (the values an fp16 file holds)."""
  return jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), tree)


@pytest.fixture(scope="module")
def sd15_fp16_dir(sd15_dir, torch_sd15, tmp_path_factory):
  """The tiny SD1.5 pipeline as the hub's fp16 branches ship it: only `*.fp16.*` weights."""
  out = str(tmp_path_factory.mktemp("sd15_fp16"))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd15_dir).to(torch.float16)
  pipe.save_pretrained(out, variant="fp16", safe_serialization=True)
  names = sorted(os.listdir(os.path.join(out, "unet")))
  assert names == ["config.json", "diffusion_pytorch_model.fp16.safetensors"], names
  return out


def test_fp16_variant_folder_loads_only_with_the_variant(sd15, sd15_fp16_dir):
  with pytest.raises(FileNotFoundError) as e:
    loader.load_pipeline(sd15_fp16_dir)
  msg = str(e.value)
  assert os.path.join(sd15_fp16_dir, "unet") in msg and "\n" not in msg
  assert "Variants found: 'fp16'" in msg and "--config.pretrained_variant=fp16" in msg
  pipe = loader.load_pipeline(sd15_fp16_dir, variant="fp16")
  # float16 values widened to the float32 master copy, bit for bit.
  for got, full in [
    (pipe.unet_params, sd15.unet_params),
    (pipe.vae_params, sd15.vae_params),
    (pipe.text_encoder_params, sd15.text_encoder_params),
  ]:
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
    _assert_trees_equal(got, _half(full))


def test_config_pretrained_variant_reaches_every_loader(sd15, sd15_fp16_dir):
  from configs import sd15 as sd15_config
  from dpo_jax.models import build

  c = sd15_config.get_config()
  c.unlock()
  c.pretrained_path = sd15_fp16_dir
  c.precision.compute_dtype = "float32"
  with pytest.raises(FileNotFoundError, match="Variants found: 'fp16'"):
    build.build_models(c)
  c.pretrained_variant = "fp16"
  full = build.build_models(c)  # pickapic: the whole pipeline.
  _assert_trees_equal(full.pretrained_params, _half(sd15.unet_params))
  _assert_trees_equal(full.pipeline.text_encoder_params, _half(sd15.text_encoder_params))
  c.data.source = "cache"  # The UNet alone.
  unet_only = build.build_models(c)
  assert unet_only.pipeline is None
  _assert_trees_equal(unet_only.pretrained_params, _half(sd15.unet_params))


def test_export_from_a_variant_base_writes_the_variant(sd15, sd15_fp16_dir, tmp_path):
  from dpo_jax import export

  base_unet = os.path.join(sd15_fp16_dir, "unet")
  with pytest.raises(FileNotFoundError, match="--pretrained_variant=fp16"):
    export.write_unet(sd15.unet_params, base_unet, str(tmp_path / "plain"), "float32", "params")
  out = str(tmp_path / "unet")
  path = export.write_unet(sd15.unet_params, base_unet, out, "float32", "params", "fp16")
  assert os.path.basename(path) == "diffusion_pytorch_model.fp16.safetensors"
  _, params = loader.load_unet(out, variant="fp16")
  _assert_trees_equal(params, sd15.unet_params)  # float32 export: lossless.
