"""Our Flax encoders (models.vae / clip / tokenizer) vs PyTorch diffusers / transformers.

Tiny random models built by the PyTorch classes, saved in the hub format, loaded
by `dpo_jax.models.loader` and run on the same inputs: float32, max abs diff
<= 1e-4 per output. The tokenizer is compared with transformers' slow
`CLIPTokenizer` (ftfy installed) on a vocabulary learned from tricky captions.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is local.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpo_jax.models import clip, conditioning, loader, naming  # noqa: E402
from dpo_jax.models import tokenizer as tokenizer_lib  # noqa: E402
from dpo_jax.models import vae as vae_lib  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _max_diff(a, b) -> float:
  a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# --- VAE ----------------------------------------------------------------------

VAE_CONFIGS = {
  # SD-style: mid-block attention, quant convs, two levels.
  "sd": dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.18215,
  ),
  # SD3/FLUX-style switches: no quant convs, no mid attention, a shift factor, 3 levels.
  "flux_like": dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=6,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
  ),
}


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_parity(name, tmp_path):
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(**VAE_CONFIGS[name]).eval()
  with torch.no_grad():  # Random (not zero-init) norms and biases, so every parameter counts.
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(tmp_path, safe_serialization=True)
  vae, params = loader.load_vae(str(tmp_path))
  images = torch.rand(2, 3, 24, 16) * 2 - 1
  scale, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
  with torch.no_grad():
    post = ref.encode(images).latent_dist
    latents = (post.mean - shift) * scale  # What diffusers' training scripts feed the UNet.
    decoded = ref.decode(latents / scale + shift).sample
  got = vae.apply({"params": params}, jnp.asarray(images.numpy()), method="encode")
  got_latents = jax.jit(conditioning.vae_encode, static_argnums=(0, 3))(
    vae, params, jnp.asarray(images.numpy()), scale
  )
  got_decoded = jax.jit(conditioning.vae_decode, static_argnums=(0, 3))(
    vae, params, jnp.asarray(latents.numpy()), scale
  )
  diffs = {
    "mean": _max_diff(got.mode(), post.mean),
    "logvar": _max_diff(got.logvar, post.logvar),
    "latents": _max_diff(got_latents, latents),
    "decoded": _max_diff(got_decoded, decoded),
  }
  print(f"vae[{name}] max abs diff " + " ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= TOL, diffs
  # A posterior sample is mean + std * N(0, 1) with the key's normal draw.
  rng = jax.random.key(1)
  eps = jax.random.normal(rng, got.mean.shape)
  np.testing.assert_allclose(got.sample(rng), got.mean + post.std.numpy() * eps, atol=1e-5)
  sampled = conditioning.vae_encode(vae, params, jnp.asarray(images.numpy()), scale, rng)
  np.testing.assert_allclose(sampled, (got.sample(rng) - shift) * scale, atol=1e-6)


@pytest.mark.parametrize(
  "field, value",
  [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("act_fn", "gelu"),
    ("latents_mean", [0.0] * 4),
  ],
)
def test_vae_unimplemented_values_are_refused_by_name(tmp_path, field, value):
  config = {**VAE_CONFIGS["sd"], field: value}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=f"{field}=.*not supported") as e:
    loader.load_vae(str(tmp_path))
  assert str(path) in str(e.value)


def test_vae_force_upcast_computes_float16_in_float32():
  config = vae_lib.AutoencoderKLConfig.from_dict(VAE_CONFIGS["sd"])
  images = jnp.zeros((1, 3, 8, 8))
  for force, want in ((True, jnp.float32), (False, jnp.float16)):
    module = vae_lib.AutoencoderKL(
      vae_lib.AutoencoderKLConfig(**{**config.__dict__, "force_upcast": force}), dtype=jnp.float16
    )
    params = jax.tree.map(jnp.zeros_like, module.init_abstract())
    assert module.apply({"params": params}, images, method="encode").mean.dtype == want


# --- CLIP text ----------------------------------------------------------------

VOCAB = 64


def _text_config(eos_token_id: int, act: str) -> dict:
  return dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    projection_dim=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=12,
    hidden_act=act,
    layer_norm_eps=1e-5,
    bos_token_id=VOCAB - 2,
    eos_token_id=eos_token_id,
    pad_token_id=1,
  )


def _text_ids(eos: int) -> np.ndarray:
  """[3, 12] ids with ids above `eos` after it, so argmax(ids) != the first eos position."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB - 3, size=(3, 12))
  ids[:, 0] = VOCAB - 2  # bos (not the largest id: "eos" is VOCAB - 1 for the legacy rule).
  for row, pos in enumerate((4, 11, 7)):
    ids[row, pos] = eos
    ids[row, pos + 1 :] = eos  # Padded with eos (pad == eos), as SD1.5's tokenizer does.
  ids[0, 7] = VOCAB - 3  # Padding that is not eos (e.g. SDXL's "!"), larger than eos.
  return ids


@pytest.mark.parametrize(
  "eos_token_id, act", [(2, "quick_gelu"), (VOCAB - 5, "gelu")], ids=["legacy_eos2", "eos_id"]
)
@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_text_parity(tmp_path, eos_token_id, act, with_projection):
  """last / penultimate / pooled (/ text_embeds), under both of transformers' pooling rules."""
  cfg = transformers.CLIPTextConfig(**_text_config(eos_token_id, act))
  cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
  torch.manual_seed(1)
  ref = cls(cfg).eval()
  ref.save_pretrained(tmp_path, safe_serialization=True)
  module, params = loader.load_text_encoder(str(tmp_path), with_projection=with_projection)
  # Legacy rule: eos is the largest id present; new rule: the first eos_token_id.
  eos = VOCAB - 1 if eos_token_id == 2 else eos_token_id
  ids = _text_ids(eos)
  if eos_token_id != 2:  # The two rules must disagree here, or the test could not tell.
    assert (ids.argmax(-1) != (ids == eos).argmax(-1)).any()
  mask = (np.arange(12)[None] <= np.array([[4], [11], [7]])).astype(np.int64)
  for attention_mask in (None, mask):
    with torch.no_grad():
      want = ref(
        torch.from_numpy(ids),
        attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
        output_hidden_states=True,
      )
    got = jax.jit(module.apply, static_argnames="output_hidden_states")(
      {"params": params},
      jnp.asarray(ids),
      None if attention_mask is None else jnp.asarray(attention_mask),
      output_hidden_states=True,
    )
    diffs = {
      "last": _max_diff(got.last_hidden_state, want.last_hidden_state),
      "penultimate": _max_diff(got.penultimate_hidden_state, want.hidden_states[-2]),
      "hidden_states": max(map(_max_diff, got.hidden_states, want.hidden_states)),
    }
    if with_projection:
      diffs["text_embeds"] = _max_diff(got.text_embeds, want.text_embeds)
      # WithProjection has no pooler_output; pooled = last state at the rule's position.
      pos = ids.argmax(-1) if eos_token_id == 2 else (ids == eos).argmax(-1)
      want_pooled = want.last_hidden_state[np.arange(3), pos]
    else:
      want_pooled = want.pooler_output
    diffs["pooled"] = _max_diff(got.pooler_output, want_pooled)
    print(f"clip text (mask={attention_mask is not None}) " + str(diffs))
    assert max(diffs.values()) <= TOL, diffs


def test_clip_text_config_refusals():
  with pytest.raises(ValueError, match="hidden_act='swiglu' is not supported"):
    clip.CLIPTextModel.from_config(_text_config(2, "swiglu"))
  with pytest.raises(ValueError, match="dropout=0.1 is not supported"):
    clip.CLIPTextConfig.from_dict({**_text_config(2, "gelu"), "dropout": 0.1})


# --- CLIP vision --------------------------------------------------------------


def test_clip_vision_with_projection_parity():
  cfg = transformers.CLIPVisionConfig(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=40,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=4,
  )
  torch.manual_seed(2)
  ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
  module = clip.CLIPVisionModelWithProjection.from_config(cfg.to_dict())
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  flat = loader.convert_pt_state_dict(
    state, module.init_abstract(), naming.torch_to_flax, "vision state", "config"
  )
  params = loader.unflatten_dict(flat)
  assert ("vision_model", "embeddings", "class_embedding") in flat
  pixels = torch.randn(3, 3, 32, 32)
  with torch.no_grad():
    want = ref(pixel_values=pixels).image_embeds
  got = module.apply({"params": params}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
  diff = _max_diff(got, want)
  print(f"clip vision image_embeds max abs diff {diff:.1e}")
  assert diff <= TOL


# --- tokenizer ----------------------------------------------------------------

CAPTIONS = [
  "don’t panic",
  "ＦＵＬＬ width ＴＥＸＴ",
  "a cat 🐱 on a mat 🎉🎉",
  "東京の猫と犬",
  "café naïve résumé Ångström",
  "It's a DOG's life, isn't it?",
  "  lots   of \n\t whitespace ",
  "numbers 2024 and 3.14159",
  "",
  "a photo of a red cat",
  " ".join(["a painting of a blue dog in the style of van gogh"] * 12),  # > 77 tokens.
]


def _write_vocab(directory, pad_token: str):
  """A CLIP-layout vocabulary with merges learned from the captions (non-ASCII merges too)."""
  from dpo_jax.tools.make_tiny_pipeline import _train_bpe

  bytes_to_unicode = tokenizer_lib.bytes_to_unicode()
  corpus = " ".join(tokenizer_lib.clip_text_clean(c) for c in CAPTIONS * 3)
  merges = _train_bpe(corpus, 150)
  tokens = list(bytes_to_unicode.values())
  tokens += [t + "</w>" for t in tokens]
  tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  os.makedirs(directory, exist_ok=True)
  vocab_file, merges_file = (
    os.path.join(directory, "vocab.json"),
    os.path.join(directory, "merges.txt"),
  )
  with open(vocab_file, "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(merges_file, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 77, "pad_token": pad_token}, f)
  # Read and saved back by the installed transformers: its own file set (4: vocab.json +
  # merges.txt; 5: tokenizer.json), which our tokenizer must read either way.
  transformers.CLIPTokenizer.from_pretrained(directory).save_pretrained(directory)
  return transformers.CLIPTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(tmp_path, pad_token):
  ref = _write_vocab(str(tmp_path), pad_token)
  ours = loader.load_tokenizer(str(tmp_path))
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.model_max_length) == (
    ref.bos_token_id,
    ref.eos_token_id,
    ref.pad_token_id,
    77,
  )
  assert len(ours) == len(ref)
  got = ours(CAPTIONS)
  # transformers on the cleaned captions: transformers 4 cleans with ftfy as CLIP does,
  # transformers 5 only NFC-normalises and lower-cases (ftfy's output is NFC already).
  cleaned = [tokenizer_lib.clip_text_clean(c) for c in CAPTIONS]
  want = ref(cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
  assert got["input_ids"][-1, -1] == ref.eos_token_id  # Truncated, end-of-text kept last.
  # The pipelines' tokenize is this tokenizer.
  np.testing.assert_array_equal(conditioning.tokenize(ours, CAPTIONS), got["input_ids"])
  # Merges really apply to the non-ASCII captions (not byte by byte only).
  assert len(ours.text_ids("東京の猫と犬")) < len("東京の猫と犬".encode())
  # A shorter max_length truncates and pads the same way.
  short = ref(cleaned, padding="max_length", max_length=8, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ours(CAPTIONS, max_length=8)["input_ids"], short["input_ids"])


def test_tokenizer_html_and_the_bang_pad_quirk(tmp_path):
  """HTML entities are unescaped (openai/CLIP); "!" stays "!</w>" with a "!" pad token
  (transformers 4 split on its added pad token "!" and wrote the pad id instead)."""
  _write_vocab(str(tmp_path), "!")
  ours = loader.load_tokenizer(str(tmp_path))
  caption = "tom &amp; jerry!! wow!"
  assert tokenizer_lib.clip_text_clean(caption) == "tom & jerry!! wow!"
  got = ours([caption])["input_ids"][0]
  n = int(ours([caption])["attention_mask"][0].sum())
  assert ours.pad_token_id == 0 and (got[n:] == 0).all()
  assert ours.encoder["!</w>"] in got[:n]


def test_tokenizer_json_only_folder_reads_the_same(tmp_path):
  """transformers 5 saves only tokenizer.json: the same vocabulary and merges."""
  both = loader.load_tokenizer(make_tiny_pipeline_tokenizer(str(tmp_path / "a")))
  folder = str(tmp_path / "b")
  make_tiny_pipeline_tokenizer(folder)
  vocab = json.load(open(os.path.join(folder, "vocab.json"), encoding="utf-8"))
  with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
    merges = f.read().strip().split("\n")[1:]
  fast = {"model": {"type": "BPE", "vocab": vocab, "merges": [m.split() for m in merges]}}
  with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(fast, f, ensure_ascii=False)
  os.remove(os.path.join(folder, "vocab.json"))
  os.remove(os.path.join(folder, "merges.txt"))
  only_json = loader.load_tokenizer(folder)
  np.testing.assert_array_equal(only_json(CAPTIONS)["input_ids"], both(CAPTIONS)["input_ids"])


def make_tiny_pipeline_tokenizer(directory):
  from dpo_jax.tools.make_tiny_pipeline import write_tokenizer_files

  write_tokenizer_files(directory)
  return directory


def test_tokenizer_missing_files_name_the_path(tmp_path):
  make_tiny_pipeline_tokenizer(str(tmp_path))
  os.remove(tmp_path / "merges.txt")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "merges.txt")):
    loader.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_equals_openai_clip(tmp_path, pad_token):
  """The independent openai/CLIP transcription of test_pickapic, incl. HTML and "!" captions."""
  from tests.test_pickapic import TRICKY_CAPTIONS, _OpenAIClipTokenizer

  _write_vocab(str(tmp_path), pad_token)
  ours = loader.load_tokenizer(str(tmp_path))
  captions = TRICKY_CAPTIONS + CAPTIONS
  want = _OpenAIClipTokenizer(str(tmp_path)).tokenize(captions, pad_id=ours.pad_token_id)
  got = ours(captions)["input_ids"]
  for caption, g, w in zip(captions, got, want):
    assert g.tolist() == w.tolist(), caption
