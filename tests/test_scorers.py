"""Reward models in Flax vs PyTorch on the same tiny random CLIP weights.

A tiny `transformers.CLIPModel` (2-layer towers, 32 px images, a real CLIP BPE
tokenizer with a small vocabulary) is saved in the hub format
(`save_pretrained(safe_serialization=True)` + a `preprocessor_config.json`),
loaded by `dpo_jax.scorers` without torch, and every score is compared with
the same formula computed by PyTorch on the pixels of transformers'
`CLIPImageProcessor` and the tokens of `CLIPTokenizer`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is local.

import shutil  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from dpo_jax import scorers  # noqa: E402
from dpo_jax.tools.make_tiny_pipeline import write_tokenizer  # noqa: E402

# float32 PyTorch vs XLA on the same weights and (up to ~1e-7) the same pixels.
TOL = 1e-4
# Preprocessing is the same PIL resize and the same float32 arithmetic as
# CLIPImageProcessor, so it should agree to float32 rounding.
PIXEL_TOL = 1e-6
PROMPTS = [
  "a photo of a red cat",
  "",  # Caption dropout / a null caption.
  " ".join(["a painting of a blue dog in the style of van gogh"] * 12),  # > 77 tokens.
  "a green circle at the top left",
  "a cat",
  "a photo of a dog on the grass",
]
# (H, W): portrait, landscape, square, smaller than the crop, very elongated, exact size.
SIZES = [(40, 56), (64, 48), (33, 33), (20, 24), (17, 90), (32, 32)]


def write_tiny_clip(directory: str, seed: int = 2, logit_scale: float = 3.1) -> str:
  """A tiny random CLIPModel folder in the hub format (weights, configs, tokenizer)."""
  os.makedirs(directory, exist_ok=True)
  tok = write_tokenizer(directory)
  ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
  text = dict(
    vocab_size=len(tok),
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    pad_token_id=tok.pad_token_id,
    **ids,
  )
  vision = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
  )
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # Not the config's init value, so it must come from the file.
    model.logit_scale.fill_(logit_scale)
  model.save_pretrained(directory, safe_serialization=True)
  processor = transformers.CLIPImageProcessor(
    size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
  )
  processor.save_pretrained(directory)
  return directory


class AestheticHead(torch.nn.Module):
  """The LAION predictor's MLP layout (`layers.{0,2,4,6,7}` Linear, Dropouts between)."""

  def __init__(self, dims=(16, 24, 12, 8, 4, 1)):
    super().__init__()
    d = dims
    self.layers = torch.nn.Sequential(
      torch.nn.Linear(d[0], d[1]),
      torch.nn.Dropout(0.2),
      torch.nn.Linear(d[1], d[2]),
      torch.nn.Dropout(0.2),
      torch.nn.Linear(d[2], d[3]),
      torch.nn.Dropout(0.1),
      torch.nn.Linear(d[3], d[4]),
      torch.nn.Linear(d[4], d[5]),
    )

  def forward(self, x):
    return self.layers(x)


def write_aesthetic_folder(directory: str, clip_dir: str, seed: int = 0) -> AestheticHead:
  """`clip_dir`'s files + `aesthetic_mlp.safetensors` from a random head; returns the head."""
  shutil.copytree(clip_dir, directory, dirs_exist_ok=True)
  torch.manual_seed(seed)
  head = AestheticHead().eval()
  with torch.no_grad():  # Default init shrinks the input's influence ~50x; undo that.
    for p in head.parameters():
      p.mul_(3.0)
  state = {k: v.contiguous() for k, v in head.state_dict().items()}
  safetensors.torch.save_file(state, os.path.join(directory, scorers.AESTHETIC_MLP_FILE))
  return head


def random_images(seed: int = 0, sizes=SIZES) -> list[np.ndarray]:
  """Smooth-ish random images (a gradient plus noise) so resizing has something to do."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    out.append(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


def _max_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  # Seed 2: cosines of both signs on IMAGES x PROMPTS (most seeds give one sign only).
  return write_tiny_clip(str(tmp_path_factory.mktemp("clip")), seed=2)


@pytest.fixture(scope="module")
def torch_clip(clip_dir):
  return transformers.CLIPModel.from_pretrained(clip_dir).eval()


@pytest.fixture(scope="module")
def images():
  return random_images()


def _features(out):
  """transformers 4 returns the projected features, 5 an output object holding them."""
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def torch_embeds(model, clip_dir, images, prompts):
  """Unnormalised (image, text) embeddings by PyTorch, inputs by transformers' processors."""
  processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_dir)
  pixels = processor(images, return_tensors="pt")["pixel_values"]
  # As PickScore's example: pad to the longest prompt (not to 77 like the scorers).
  tok = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
  with torch.no_grad():
    img = _features(model.get_image_features(pixel_values=pixels))
    txt = _features(
      model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    )
  return img, txt


def torch_cos(img, txt):
  img = img / img.norm(dim=-1, keepdim=True)
  txt = txt / txt.norm(dim=-1, keepdim=True)
  return (img * txt).sum(-1)


@pytest.mark.parametrize(
  "size, crop",
  [
    ({"shortest_edge": 32}, {"height": 32, "width": 32}),  # The tiny model's.
    ({"shortest_edge": 28}, {"height": 32, "width": 32}),  # Crop larger: zero padding.
    ({"shortest_edge": 40}, {"height": 36, "width": 30}),  # Non-square crop.
  ],
)
def test_preprocessing_matches_clip_image_processor(tmp_path, images, size, crop):
  processor = transformers.CLIPImageProcessor(size=size, crop_size=crop)
  processor.save_pretrained(str(tmp_path))
  spec = scorers.read_preprocessing(str(tmp_path))
  assert spec.shortest_edge == size["shortest_edge"]
  assert spec.crop_size == (crop["height"], crop["width"])
  ours = scorers.preprocess_images(images, spec)
  theirs = processor(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  assert ours.dtype == np.float32
  assert _max_diff(ours, theirs) <= PIXEL_TOL


def test_clip_score_and_pickscore_match_torch(clip_dir, torch_clip, images):
  # batch_size 4 on 6 images: one full batch and one padded one.
  clip_score = scorers.make_scorer("clip_score", clip_dir, batch_size=4)
  pickscore = scorers.make_scorer("pickscore", clip_dir, batch_size=4)
  img, txt = torch_embeds(torch_clip, clip_dir, images, PROMPTS)
  cos = torch_cos(img, txt)
  # Both signs occur, so the clamp at 0 of CLIPScore is exercised.
  assert (cos < 0).any() and (cos > 0).any(), cos
  want_clip = 100 * torch.clamp(cos, min=0)  # torchmetrics CLIPScore per pair.
  want_pick = torch_clip.logit_scale.detach().exp() * cos  # PickScore's example, per pair.
  got_clip = clip_score(images, PROMPTS)
  got_pick = pickscore(images, PROMPTS)
  assert got_clip.shape == got_pick.shape == (len(images),)
  assert _max_diff(got_clip, want_clip.numpy()) <= TOL
  assert _max_diff(got_pick, want_pick.numpy()) <= TOL
  # The learned scale, not the config's init value, multiplies the cosine.
  np.testing.assert_allclose(got_pick / cos.numpy(), np.exp(3.1), rtol=1e-4)
  # A stacked uint8 [N,H,W,3] array is accepted too.
  stacked = clip_score(np.stack([images[5]] * 2), [PROMPTS[5]] * 2)
  assert _max_diff(stacked, got_clip[[5, 5]]) <= TOL


def test_aesthetic_matches_torch(tmp_path, clip_dir, torch_clip, images):
  folder = str(tmp_path / "aesthetic")
  head = write_aesthetic_folder(folder, clip_dir)
  scorer = scorers.make_scorer("aesthetic", folder, batch_size=4)
  img, _ = torch_embeds(torch_clip, clip_dir, images, PROMPTS)
  with torch.no_grad():
    want = head(img / img.norm(dim=-1, keepdim=True))[:, 0].numpy()
  got = scorer(images, PROMPTS)
  assert np.ptp(want) > 100 * TOL  # The scores differ by image far more than the tolerance.
  assert _max_diff(got, want) <= TOL
  # The prompt plays no part.
  np.testing.assert_array_equal(scorer(images, ["x"] * len(images)), got)


def test_aesthetic_mlp_matches_torch_sequential(tmp_path):
  head = AestheticHead(dims=(768, 1024, 128, 64, 16, 1)).eval()  # The original's widths.
  path = str(tmp_path / "mlp.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in head.state_dict().items()}, path)
  layers = scorers.load_aesthetic_mlp(path)
  assert [k.shape for k, _ in layers] == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
  x = np.random.default_rng(0).normal(size=(5, 768)).astype(np.float32)
  with torch.no_grad():
    want = head(torch.from_numpy(x))[:, 0].numpy()
  got = np.asarray(scorers.aesthetic_mlp(layers, x))
  assert _max_diff(got, want) <= TOL


def test_aesthetic_mlp_rejects_other_layouts(tmp_path):
  path = str(tmp_path / "bad.safetensors")
  w = lambda *s: torch.zeros(*s)
  safetensors.torch.save_file({"0.weight": w(4, 8), "0.bias": w(4)}, path)
  with pytest.raises(ValueError, match=r"unexpected tensor '0\.bias'"):
    scorers.load_aesthetic_mlp(path)
  chain = {"layers.0.weight": w(4, 8), "layers.0.bias": w(4), "layers.2.weight": w(1, 5)}
  safetensors.torch.save_file({**chain, "layers.2.bias": w(1)}, path)
  with pytest.raises(ValueError, match="does not continue width 4"):
    scorers.load_aesthetic_mlp(path)


def test_msgpack_weights_load_the_same_params(tmp_path, clip_dir):
  from_safetensors = scorers.load_clip(clip_dir, with_tokenizer=False)
  folder = tmp_path / "msgpack"
  shutil.copytree(clip_dir, folder)
  os.remove(folder / "model.safetensors")
  (folder / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(from_safetensors.params))
  from_msgpack = scorers.load_clip(str(folder), with_tokenizer=False)
  leaves_a, tree_a = jax.tree_util.tree_flatten(from_safetensors.params)
  leaves_b, tree_b = jax.tree_util.tree_flatten(from_msgpack.params)
  assert tree_a == tree_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


def test_clip_folder_errors(tmp_path, clip_dir):
  folder = tmp_path / "noproc"
  shutil.copytree(clip_dir, folder)
  os.remove(folder / scorers.PREPROCESSOR_FILE)
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    scorers.load_clip(str(folder))
  with pytest.raises(FileNotFoundError, match="not a folder"):
    scorers.make_scorer("clip_score", str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="Unknown scorer 'clipscore'"):
    scorers.make_scorer("clipscore", clip_dir)


@pytest.mark.parametrize(
  "name, package, pip",
  [("hpsv2", "hpsv2", "hpsv2"), ("image_reward", "ImageReward", "image-reward")],
)
def test_unavailable_scorers_say_what_they_need(tmp_path, name, package, pip):
  with pytest.raises(NotImplementedError) as e:
    scorers.make_scorer(name, str(tmp_path))
  assert f"`{package}` package" in str(e.value)
  assert f"pip install {pip}" in str(e.value)
  assert ".pt" in str(e.value)  # Names the weights file.


def test_parse_scorer_specs():
  assert scorers.parse_scorer_specs("clip_score=/a,pickscore=/b/c") == {
    "clip_score": "/a",
    "pickscore": "/b/c",
  }
  with pytest.raises(ValueError, match="not NAME=PATH"):
    scorers.parse_scorer_specs("clip_score")
  with pytest.raises(ValueError, match="given twice"):
    scorers.parse_scorer_specs("a=/x,a=/y")
  assert scorers.parse_scorer_specs("style_amber_duotone,toy_reward") == {
    "style_amber_duotone": "",
    "toy_reward": "",
  }


def test_model_free_scorers_match_their_functions():
  from dpo_jax.data import style
  from dpo_jax.toy import reward, world

  specs = [
    world.PromptSpec("red", "circle", "top left"),
    world.PromptSpec("blue", "square", "top right"),
  ]
  images = world.render_batch(specs, seed=0)
  texts = [s.text for s in specs]
  got = scorers.make_scorer("toy_reward", "")(list(images), texts)
  np.testing.assert_array_equal(got, reward.reward(images, specs))
  got = scorers.make_scorer("style_amber_duotone", "")(images, texts)
  np.testing.assert_array_equal(got, style.palette_score(images))
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    scorers.make_scorer("toy_reward", "")(images, texts[:1])


def test_rpo_clip_image_embedder_matches_torch(clip_dir, torch_clip):
  """RPO's image embeddings (training pixels in [-1, 1] at the crop size) = CLIP image features."""
  rng = np.random.default_rng(3)
  pixels = rng.uniform(-1, 1, size=(3, 32, 32, 3)).astype(np.float32)
  embed, params = scorers.clip_image_embedder(clip_dir)
  assert "text_model" not in params
  got = jax.jit(embed)(params, pixels)
  spec = scorers.read_preprocessing(clip_dir)
  normalised = ((pixels + 1) / 2 - np.asarray(spec.mean)) / np.asarray(spec.std)
  with torch.no_grad():
    want = _features(
      torch_clip.get_image_features(
        pixel_values=torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32))
      )
    )
  assert _max_diff(got, want) <= TOL
  # The trainer's data side gets the same embedder from config.rpo.clip_path.
  from dpo_jax.data import sources
  from tests.fixtures import make_train_config

  config = make_train_config(**{"objective": "rpo", "rpo.embedding": "image"})
  config.rpo.clip_path = clip_dir
  fn, p = sources.rpo_image_embedder(config)
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(p, pixels)), np.asarray(got))
  # Other resolutions are resized on device to the crop size.
  assert embed(params, np.zeros((2, 48, 48, 3), np.float32)).shape == got[:2].shape
