"""Style alignment data and metric (`data.style`) and the RPO pair embeddings of the data path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dpo_jax.data import decode, encode, pickapic, sources, style
from dpo_jax.models import conditioning, loader
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline
from tests.fixtures import encode_image, make_train_config, write_parquet

AMBER_UNIT = np.asarray(style.AMBER) / np.linalg.norm(style.AMBER)


def _solid(rgb, size=8) -> np.ndarray:
  """Black image whose top quarter has colour `rgb`."""
  img = np.zeros((size, size, 3), np.uint8)
  img[: size // 4] = rgb
  return img


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_palette_score_hand_values(channel):
  # A pure primary colour c = e_k on black: off-palette share = |e_k - (e_k.u)u| = sqrt(1 - u_k^2).
  rgb = [0, 0, 0]
  rgb[channel] = 255
  want = 1.0 - np.sqrt(1.0 - AMBER_UNIT[channel] ** 2)
  got = style.palette_score(_solid(rgb)[None])[0]
  assert got == pytest.approx(want, abs=1e-9)
  amber = np.round(np.asarray(style.AMBER) * 255).astype(np.uint8)
  assert style.palette_score(_solid(amber)[None])[0] == pytest.approx(1.0, abs=1e-3)
  # Blank images have nothing off the palette.
  assert style.palette_score(np.zeros((1, 4, 4, 3), np.uint8))[0] == 1.0


def test_duotone_keeps_brightness_and_lands_on_the_palette():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(3, 12, 12, 3), dtype=np.uint8)
  out = np.stack([style.duotone(im) for im in img])
  # Amber's red channel is 1: it carries the HSV value unchanged.
  np.testing.assert_array_equal(out[..., 0], img.max(axis=-1))
  scores = style.palette_score(out)
  assert np.all(scores > 0.99), scores  # Only uint8 rounding is off the line.
  assert np.all(style.palette_score(img) < 0.8)


def test_build_style_pairs_counts_duplicates_and_corrupt_images(tmp_path):
  imgs = [np.full((6, 6, 3), c, np.uint8) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
  png = [encode_image(Image.fromarray(im), "PNG") for im in imgs]
  rows = [
    {"caption": "a", "jpg_0": png[0], "jpg_1": png[1]},
    {"caption": "a", "jpg_0": png[0], "jpg_1": png[2]},  # png[0] again: a duplicate.
    {"caption": "b", "jpg_0": b"not an image", "jpg_1": png[0]},  # Same bytes, other caption.
    {"caption": "c", "jpg_0": b"", "jpg_1": png[1]},  # Zero bytes; png[1] again.
  ]
  src = tmp_path / "src"
  src.mkdir()
  write_parquet(
    str(src / "train-00000-of-00001.parquet"), [_full_row(i, r) for i, r in enumerate(rows)]
  )
  report = style.build_style_pairs(str(src), str(tmp_path / "out"), "amber_duotone")
  r = report["splits"]["train"]
  # Distinct by content: png[0..2], the non-image and the empty image; the
  # empty one carries the data build's name for it.
  assert r == {
    "input_rows": 4,
    "distinct_images": 5,
    "duplicate_images": 3,
    "pairs_written": 3,
    "undecodable": {"non_image": 1, "zero_byte_image": 1},
  }
  table = pq.read_table(str(tmp_path / "out" / "train-00000-of-00001.parquet")).to_pylist()
  assert [t["caption"] for t in table] == ["a", "a", "a"]
  assert [t["label_0"] for t in table] == [1.0, 0.0, 1.0]  # The winner's column alternates.
  originals = []
  for t in table:
    win, lose = (t["jpg_0"], t["jpg_1"]) if t["label_0"] == 1.0 else (t["jpg_1"], t["jpg_0"])
    lose_img = np.asarray(decode.decode_rgb(lose)[0])
    np.testing.assert_array_equal(np.asarray(decode.decode_rgb(win)[0]), style.duotone(lose_img))
    originals.append(lose_img)
  np.testing.assert_array_equal(np.stack(originals), np.stack(imgs))  # Each image once.
  # The set goes through the real checked build (all rows are strict preferences).
  built = pickapic.build_pickapic(str(tmp_path / "out"), str(tmp_path / "tfds"), extra_columns={})
  assert pickapic.load_data_report(built.data_dir)["splits"]["train"]["kept"] == 3


def test_one_name_for_each_bad_image():
  """The data build's row check and the decoder (style sets, relabelling) agree."""
  for data, reason in ((None, "missing_image"), (b"", "zero_byte_image")):
    with pytest.raises(decode.ImageRejected) as e:
      decode.decode_rgb(data)
    assert e.value.reason == reason
    row = {"label_0": 1.0, "label_1": 0.0, "caption": "x", "jpg_0": data, "jpg_1": b"\x01"}
    assert decode.check_row(row).reason == reason


def _full_row(i, r):
  return {**r, "ranking_id": i, "label_0": 1.0, "label_1": 0.0}


def test_unknown_style_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown style 'oil'.*amber_duotone"):
    style.get_style("oil")


# ---------------------------------------------------------------- RPO embeddings


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rpo_pair_embedding_cross_modal_cosine_is_the_mean():
  rng = np.random.default_rng(0)
  t, w, lo = (rng.normal(size=(5, 7)).astype(np.float32) for _ in range(3))
  e = np.asarray(encode.rpo_pair_embedding(jnp.asarray(t), jnp.asarray(w), jnp.asarray(lo)))
  img = _unit(_unit(w) + _unit(lo))
  cos = lambda a: _unit(a) @ _unit(a).T  # noqa: E731
  np.testing.assert_allclose(cos(e), (cos(t) + cos(img)) / 2, atol=1e-5)
  # The image part does not depend on which image won.
  swapped = encode.rpo_pair_embedding(None, jnp.asarray(lo), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(swapped), img, atol=1e-6)
  with pytest.raises(ValueError, match="needs text and/or image"):
    encode.rpo_pair_embedding(None, None, None)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  return loader.load_pipeline(make_tiny_pipeline("sd15", str(tmp_path_factory.mktemp("p")), seed=0))


def test_encode_batch_adds_rpo_embeds_from_the_pooled_prompt(sd15):
  captions = ["a red cube", "a red cube on a table", "a blue sphere"]
  ids = conditioning.make_tokenize_fn(sd15)(captions)
  rng = np.random.default_rng(0)
  pixels = rng.uniform(-1, 1, size=(2, 3, 32, 32, 3)).astype(np.float32)
  raw = {"pixels_w": pixels[0], "pixels_l": pixels[1], "input_ids": ids}
  frozen = conditioning.frozen_params(sd15)

  def embeds(embedding, params, embedder=None):
    feats = encode.encode_batch(sd15, params, raw, 32, encode.rpo_feature_keys(embedding), embedder)
    return encode.with_rpo_embeds(feats, embedding)["rpo_embeds"]

  out = {"rpo_embeds": embeds("text", frozen)}
  _, pooled = conditioning.make_prompt_encoder(sd15)(captions)
  np.testing.assert_allclose(np.asarray(out["rpo_embeds"]), _unit(pooled), atol=1e-5)
  plain = encode.encode_batch(sd15, frozen, raw, 32)
  assert not set(plain) & {"rpo_embeds", *encode.RPO_FEATURE_KEYS}

  # text+image with a stand-in image tower: mean colour per image.
  def colour(params, px):
    return params["scale"] * px.mean(axis=(1, 2))

  frozen_img = {**frozen, "rpo_clip": {"scale": jnp.float32(2.0)}}
  both = embeds("text+image", frozen_img, colour)
  want_img = _unit(_unit(pixels[0].mean((1, 2))) + _unit(pixels[1].mean((1, 2))))
  np.testing.assert_allclose(
    np.asarray(both), np.concatenate([_unit(pooled), want_img], -1), atol=1e-5
  )
  with pytest.raises(ValueError, match="need an image embedder"):
    embeds("image", frozen)
  with pytest.raises(KeyError, match="rpo_image_w"):
    encode.with_rpo_embeds(plain, "text+image")


def test_synthetic_source_supplies_rpo_embeddings(tmp_path):
  config = make_train_config(objective="rpo")
  data = sources.make_data(config, None, str(tmp_path))
  batch = next(iter(data.train))
  np.testing.assert_allclose(batch["rpo_embeds"], batch["context"].mean(axis=1), atol=1e-6)
  assert "rpo_embeds" in data.eval_batch
  config.unlock()
  config.rpo.embedding = "image"
  with pytest.raises(ValueError, match="needs rpo.clip_path"):
    sources.rpo_image_embedder(config)
