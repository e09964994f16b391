"""Pick-a-Pic parquet -> checked TFDS array_record -> grain pair batches.

Small Pick-a-Pic-format shards are written in tmp dirs with real encoded images:
winners are red, losers blue or grey, so "winner first" is visible in the
pixels. Bad rows cover every skip reason the brief names.
"""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageFile

from dpo_jax.data import decode, pickapic, pipeline
from tests.fixtures import (
  BLUE,
  RED,
  encode_image,
  good_rows,
  jpeg,
  pickapic_row,
  run_two_processes,
  write_parquet,
)

RES = 16
GLOBAL_BATCH = 6  # 20 clean rows -> 3 batches per epoch, 2 rows left over.


def _bomb_jpeg() -> bytes:
  """A few hundred bytes whose header declares 30000 x 30000 pixels."""
  data = bytearray(jpeg(RED, 8, 8))
  sof = data.index(b"\xff\xc0")
  data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2  # Height, width.
  return bytes(data)


def _bad_rows():
  """-> (rows, {id: reason})."""
  r, b = jpeg(RED), jpeg(BLUE)
  cases = [
    ("tie", dict(label_0=0.5, label_1=0.5)),
    ("tie", dict(label_0=0.5, label_1=0.5)),
    ("identical_images", dict(jpg_1=r)),
    ("truncated_image", dict(jpg_0=r[: len(r) // 2])),
    ("zero_byte_image", dict(jpg_1=b"")),
    ("non_image", dict(jpg_0=b"definitely not an image")),
    ("oversized_image", dict(jpg_1=_bomb_jpeg())),
    ("empty_caption", dict(caption="   ")),
    ("missing_caption", dict(caption=None)),
    ("null_label", dict(label_0=None)),
    ("bad_label", dict(label_0=0.7, label_1=0.3)),
    ("missing_image", dict(jpg_0=None)),
  ]
  rows, reasons = [], {}
  for k, (reason, change) in enumerate(cases):
    rid = 2000 + k
    row = pickapic_row(rid, "a bad row", r, b, 1.0, 0.0)
    row.update(change)
    rows.append(row)
    reasons[rid] = reason
  return rows, reasons


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Two train shards (20 clean + 12 bad rows, interleaved) and a validation shard."""
  root = tmp_path_factory.mktemp("pickapic")
  good, sizes = good_rows(20)
  bad, reasons = _bad_rows()
  rows = [x for pair in zip(good, bad + [None] * 8) for x in pair if x is not None]
  pq_dir = root / "parquet"
  pq_dir.mkdir()
  write_parquet(str(pq_dir / "train-00000-of-00002.parquet"), rows[:16])
  write_parquet(str(pq_dir / "train-00001-of-00002.parquet"), rows[16:])
  write_parquet(str(pq_dir / "validation_unique-00000-of-00001.parquet"), good_rows(3, 5000)[0])
  builder = pickapic.build_pickapic(
    str(pq_dir), str(root / "tfds"), max_skip_rate=0.5, num_workers=2
  )
  return dict(
    root=root, pq_dir=pq_dir, rows=rows, data_dir=builder.data_dir, sizes=sizes, reasons=reasons
  )


def _iterator(world, **kw):
  args = dict(global_batch_size=GLOBAL_BATCH, resolution=RES, seed=0, num_threads=2)
  args.update(process_index=0, process_count=1)
  args.update(kw)
  return pipeline.make_pickapic_iterator(os.fspath(world["data_dir"]), "train", **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _ids(batches):
  return [int(i) for b in batches for i in b["example_id"]]


def test_data_report_counts(world):
  report = pickapic.load_data_report(os.fspath(world["data_dir"]))
  train = report["splits"]["train"]
  assert (train["rows"], train["kept"], train["skipped"]) == (32, 20, 12)
  expected = {r: 0 for r in decode.SKIP_REASONS}
  for reason in world["reasons"].values():
    expected[reason] += 1
  assert train["skipped_by_reason"] == expected
  assert {e["id"]: e["reason"] for e in train["skipped_examples"]} == world["reasons"]
  assert train["defect_rate"] == pytest.approx(10 / 32)
  assert train["converted_to_rgb"] == {"CMYK": 1, "LA": 1, "P": 1, "RGBA": 1}
  assert train["size_mismatch_pairs"] == 1
  assert train["files"] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
  assert report["splits"]["validation_unique"]["kept"] == 3
  info = tfds.builder_from_directory(os.fspath(world["data_dir"])).info
  assert info.metadata["data_report"]["train"]["skipped_by_reason"] == expected
  src = pickapic.open_split(os.fspath(world["data_dir"]), "train")
  assert sorted(int(src[i]["example_id"]) for i in range(len(src))) == sorted(world["sizes"])
  assert src[0]["model_0"] == b"sd15" and src[0]["created_at"].startswith(b"2023-05-01")


def test_missing_column_names_column_and_file(tmp_path):
  write_parquet(str(tmp_path / "train-00000-of-00001.parquet"), good_rows(2)[0], drop=("label_1",))
  with pytest.raises(pickapic.MissingColumnError, match=r"'label_1'.*train-00000-of-00001"):
    pickapic.build_pickapic(str(tmp_path), str(tmp_path / "tfds"))


def test_column_mapping_and_row_index_ids(tmp_path):
  pq_dir = tmp_path / "pq"
  pq_dir.mkdir()
  write_parquet(str(pq_dir / "shard.parquet"), good_rows(4)[0], rename={"caption": "prompt"})
  columns = dict(pickapic.PICKAPIC_COLUMNS, caption="prompt", example_id=None)
  builder = pickapic.build_pickapic(
    str(pq_dir), str(tmp_path / "tfds"), columns=columns, extra_columns={}
  )
  src = pickapic.open_split(builder.data_dir, "train")
  assert [int(src[i]["example_id"]) for i in range(4)] == [0, 1, 2, 3]
  assert src[1]["caption"] == b"a red thing number 1"


def test_other_shards_never_reuse_a_build(tmp_path):
  """Same options, same TFDS dir, other (or rewritten) parquet files: a fresh build."""
  tfds_dir = str(tmp_path / "tfds")
  for name, n in (("a", 3), ("b", 5)):
    (tmp_path / name).mkdir()
    write_parquet(str(tmp_path / name / "train-0.parquet"), good_rows(n)[0])
  built = {k: pickapic.build_pickapic(str(tmp_path / k), tfds_dir).data_dir for k in "ab"}
  assert built["a"] != built["b"]
  assert [len(pickapic.open_split(built[k], "train")) for k in "ab"] == [3, 5]
  # Rewriting a shard in place (new size / mtime) also invalidates the build.
  write_parquet(str(tmp_path / "a" / "train-0.parquet"), good_rows(4)[0])
  rebuilt = pickapic.build_pickapic(str(tmp_path / "a"), tfds_dir).data_dir
  assert rebuilt != built["a"] and len(pickapic.open_split(rebuilt, "train")) == 4
  # Unchanged shards reuse the build.
  assert pickapic.build_pickapic(str(tmp_path / "b"), tfds_dir).data_dir == built["b"]


def test_skip_rate_threshold(world, tmp_path):
  with pytest.raises(pickapic.SkipRateError, match=r"31\.2% of 32 rows.*max_skip_rate=20\.0%"):
    pickapic.build_pickapic(str(world["pq_dir"]), str(tmp_path), max_skip_rate=0.2)
  (failed,) = list(tmp_path.glob("pick_a_pic_v2/*/data_report.failed.json"))
  assert json.loads(failed.read_text())["splits"]["train"]["skipped"] == 12
  assert not list(tmp_path.glob("pick_a_pic_v2/*/1.0.0"))  # Nothing half-built is left.
  # An existing build made under a looser threshold is held to the new one.
  with pytest.raises(pickapic.SkipRateError, match="existing build"):
    pickapic.build_pickapic(
      str(world["pq_dir"]), str(world["root"] / "tfds"), max_skip_rate=0.2, num_workers=2
    )


def test_keep_empty_captions(world, tmp_path):
  builder = pickapic.build_pickapic(
    str(world["pq_dir"]), str(tmp_path), keep_empty_captions=True, max_skip_rate=0.5
  )
  train = pickapic.load_data_report(builder.data_dir)["splits"]["train"]
  assert train["kept"] == 22 and train["empty_captions_kept"] == 2
  assert train["skipped_by_reason"]["empty_caption"] == 0


def test_max_examples_subset(world, tmp_path):
  builder = pickapic.build_pickapic(
    str(world["pq_dir"]), str(tmp_path), max_examples=10, max_skip_rate=1.0
  )
  assert builder.builder_config.name.startswith("max10_src")
  train = pickapic.load_data_report(builder.data_dir)["splits"]["train"]
  first = [r["ranking_id"] for r in world["rows"][:10]]
  assert train["rows"] == 10
  assert train["kept"] == len([i for i in first if i in world["sizes"]])
  assert {e["id"] for e in train["skipped_examples"]} == {i for i in first if i in world["reasons"]}


def test_batches_winner_first_and_clean(world):
  it = _iterator(world)
  spec = it.element_spec
  assert it.batches_per_epoch == 3 and it.epoch_remainder == 2
  for b in _take(it, 6):
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      k: (s.shape, s.dtype) for k, s in spec.items()
    }
    for i, eid in enumerate(b["example_id"]):
      assert int(eid) in world["sizes"]  # No tie or bad row ever reaches a batch.
      win, lose = b["pixels_w"][i], b["pixels_l"][i]
      assert win.min() >= -1 and win.max() <= 1
      assert (win[..., 0] - win[..., 2]).mean() > 1.0  # Red winner.
      assert (lose[..., 0] - lose[..., 2]).mean() < 0.1  # Blue or grey loser.
      h, wd = world["sizes"][int(eid)]
      assert tuple(b["original_size"][i]) == (h, wd)
      rh, rw = pipeline.resized_hw(h, wd, RES)
      top, left = b["crop_top_left"][i]
      assert 0 <= top <= rh - RES and 0 <= left <= rw - RES
    assert all(c.startswith("a red thing number") for c in b["caption"])
  it.close()


def test_deterministic_for_a_seed(world):
  a, b, c = (_iterator(world, seed=s) for s in (3, 3, 4))
  batches_a, batches_b, batches_c = _take(a, 4), _take(b, 4), _take(c, 4)
  for x, y in zip(batches_a, batches_b):
    for k in ("pixels_w", "pixels_l", "example_id", "crop_top_left"):
      np.testing.assert_array_equal(x[k], y[k])
  assert _ids(batches_a) != _ids(batches_c)
  for it in (a, b, c):
    it.close()


def test_processes_are_disjoint_and_cover_the_global_batches(world):
  single = _iterator(world)
  procs = [_iterator(world, process_index=p, process_count=2) for p in range(2)]
  ref = _take(single, 3)  # One epoch.
  per_proc = [_take(p, 3) for p in procs]
  for b in range(3):
    ids0, ids1 = _ids([per_proc[0][b]]), _ids([per_proc[1][b]])
    assert len(ids0) == len(ids1) == GLOBAL_BATCH // 2 and not set(ids0) & set(ids1)
    # Process blocks in process order assemble the single-process global batch.
    assert ids0 + ids1 == _ids([ref[b]])
  assert len(set(_ids(ref))) == 3 * GLOBAL_BATCH
  for it in [single, *procs]:
    it.close()


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_resume_at_every_position(world, process_index, process_count):
  kw = dict(process_index=process_index, process_count=process_count, seed=5)
  it = _iterator(world, **kw)
  n = 2 * it.batches_per_epoch  # Two epochs.
  states, ref = [], []
  for _ in range(n):
    states.append(json.loads(json.dumps(it.get_state())))
    ref.append(next(it))
  states.append(it.get_state())
  it.close()
  per_epoch = it.batches_per_epoch * it.local_batch
  for e in range(2):
    ids = _ids(ref[e * it.batches_per_epoch : (e + 1) * it.batches_per_epoch])
    assert len(ids) == len(set(ids)) == per_epoch  # 0 duplicated, 0 missing.
  for k in range(n + 1):
    resumed = _iterator(world, **kw)
    resumed.set_state(states[k])
    rest = _take(resumed, n - k)
    resumed.close()
    assert _ids(rest) == _ids(ref[k:]), f"resume at batch {k}"
    for x, y in zip(rest, ref[k:]):
      np.testing.assert_array_equal(x["pixels_w"], y["pixels_w"])
      np.testing.assert_array_equal(x["crop_top_left"], y["crop_top_left"])


def test_state_survives_a_change_of_process_count(world):
  single = _iterator(world, seed=9)
  _take(single, 2)
  state = single.get_state()
  ref = next(single)
  single.close()
  assembled = []
  for p in range(2):
    it = _iterator(world, seed=9, process_index=p, process_count=2)
    it.set_state(state)
    assembled += _ids([next(it)])
    it.close()
  assert assembled == _ids([ref])


def test_set_state_rejects_another_seed(world):
  it = _iterator(world, seed=1)
  with pytest.raises(ValueError, match="seed"):
    it.set_state(dict(it.get_state(), seed=2))
  it.close()


def test_tokenize_hook(world):
  def tokenize(captions):
    return np.array([[len(c)] + [0] * 7 for c in captions])

  it = _iterator(world, tokenize_fn=tokenize)
  b = next(it)
  assert "caption" not in b and b["input_ids"].dtype == np.int32
  assert b["input_ids"].shape == it.element_spec["input_ids"].shape == (GLOBAL_BATCH, 8)
  it.close()


def test_flip_policies():
  # Left half red, right half blue: a flip swaps which side is red.
  img = Image.new("RGB", (RES, RES), RED)
  img.paste(BLUE, (RES // 2, 0, RES, RES))
  data = encode_image(img, "PNG")

  def flips(policy, seed):
    out = pipeline.preprocess_pair(data, data, np.random.default_rng(seed), RES, flip=policy)
    return tuple(bool(out[k][0, 0, 0] < 0) for k in ("pixels_w", "pixels_l"))

  indep = {flips("independent", s) for s in range(32)}
  assert (True, False) in indep and (False, True) in indep
  assert all(fw == fl for fw, fl in (flips("shared", s) for s in range(32)))
  assert {flips("none", s) for s in range(32)} == {(False, False)}


def test_preprocess_sizes_and_loser_resized_to_winner():
  win, lose = jpeg(RED, w=40, h=20), jpeg(BLUE, w=30, h=30)
  out = pipeline.preprocess_pair(win, lose, np.random.default_rng(0), 10, random_crop=False)
  assert out["pixels_w"].shape == out["pixels_l"].shape == (10, 10, 3)
  assert tuple(out["original_size"]) == (20, 40)
  assert tuple(out["crop_top_left"]) == (0, 5)  # Resized to 10 x 20, centre crop.


def test_jpeg_draft_keeps_original_size_and_content():
  rng = np.random.default_rng(0)
  smooth = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 48))
  data = encode_image(smooth)
  fast, slow = (
    pipeline.preprocess_pair(data, data, np.random.default_rng(1), RES, jpeg_draft=d)
    for d in (True, False)
  )
  assert tuple(fast["original_size"]) == tuple(slow["original_size"]) == (48, 64)
  np.testing.assert_array_equal(fast["crop_top_left"], slow["crop_top_left"])
  assert np.abs(fast["pixels_w"] - slow["pixels_w"]).mean() < 0.05


def test_decode_refuses_bombs_and_truncation_switch(monkeypatch):
  with pytest.raises(decode.ImageRejected) as e:
    decode.decode_rgb(_bomb_jpeg())
  assert e.value.reason == "oversized_image"
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
    decode.decode_rgb(jpeg(RED))


def test_two_real_processes_split_each_global_batch(world):
  """jax.distributed with 2 processes x 4 CPU devices: disjoint halves of each global batch."""
  outs = run_two_processes(
    "pickapic", os.fspath(world["data_dir"]), str(GLOBAL_BATCH), "3", timeout=300
  )
  got = {}
  for out in outs:
    line = next(ln for ln in out.splitlines() if ln.startswith("IDS "))
    rec = json.loads(line[4:])
    got[rec["process"]] = rec["ids"]
  single = _iterator(world)
  ref = _take(single, 3)  # One whole epoch on one process.
  single.close()
  for b in range(3):
    assert not set(got[0][b]) & set(got[1][b])
    assert got[0][b] + got[1][b] == _ids([ref[b]])
  union = {i for p in (0, 1) for batch in got[p] for i in batch}
  assert len(union) == 3 * GLOBAL_BATCH  # No duplicates, nothing missing in the epoch.


# ---------------------------------------------------------------------------
# Caption tokenization: the reference is openai/CLIP's own tokenizer.


def _bytes_to_unicode():
  """openai/CLIP simple_tokenizer.bytes_to_unicode (byte -> printable character)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  bs += list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


class _OpenAIClipTokenizer:
  """openai/CLIP `simple_tokenizer.SimpleTokenizer` + `clip.tokenize`, over given vocab files.

  A transcription of the original (MIT), kept independent of transformers, so
  it is the yardstick: ftfy.fix_text, HTML unescaped twice, whitespace
  collapsed, lower case, CLIP's regex, byte-level BPE by merge rank.
  """

  def __init__(self, directory):
    import regex

    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
      self.encoder = json.load(f)
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
      merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges if m]
    self.bpe_ranks = dict(zip(merges, range(len(merges))))
    self.byte_encoder = _bytes_to_unicode()
    self.cache = {t: t for t in ("<|startoftext|>", "<|endoftext|>")}
    self.pat = regex.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
      regex.IGNORECASE,
    )

  def bpe(self, token):
    if token in self.cache:
      return self.cache[token]
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if bigram not in self.bpe_ranks:
        break
      new, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
          new.append(word[i] + word[i + 1])
          i += 2
        else:
          new.append(word[i])
          i += 1
      word = tuple(new)
    self.cache[token] = " ".join(word)
    return self.cache[token]

  def encode(self, text):
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = re.sub(r"\s+", " ", text).strip().lower()
    ids = []
    for token in self.pat.findall(text):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids += [self.encoder[t] for t in self.bpe(token).split(" ")]
    return ids

  def tokenize(self, texts, context_length=77, pad_id=0):
    """`clip.tokenize(texts, truncate=True)`, padded with `pad_id` (SD's tokenizers pad
    with end-of-text, SDXL's second with "!"; openai's own with 0)."""
    sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
    out = np.full((len(texts), context_length), pad_id, np.int32)
    for i, text in enumerate(texts):
      tokens = [sot] + self.encode(text) + [eot]
      if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = eot
      out[i, : len(tokens)] = tokens
    return out


# Captions where CLIP's cleaning matters (Pick-a-Pic has many non-English ones).
TRICKY_CAPTIONS = [
  "don’t panic",  # Curly quote: ftfy makes it ' so "'t" is one token.
  "ＦＵＬＬ width",  # Full-width letters: ftfy folds them to ASCII.
  "一只戴着帽子的猫",  # CJK: one word for CLIP, one word per character without ftfy.
  "a cat 🐱🎩 in   the rain",
  "Tom &amp; Jerry &lt;3",  # HTML entities.
  "<b>bold</b> &amp;amp; co",  # A tag stops ftfy's own unescaping; CLIP's still runs twice.
  "Ã©lan cafÃ©",  # Mojibake.
  "  A Photo\tof\nAN astronaut  ",
  "Привет, мир! Ünïcödé naïve façade",
  "wow!! so cool!",  # "!" is SDXL's second pad token.
  "",
  " ".join(f"word{i}" for i in range(60)),  # > 77 tokens: truncated, end token last.
]


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
  """SD's two CLIP BPE tokenizers (pad end-of-text, pad "!") written as real files."""
  from dpo_jax.tools import make_tiny_pipeline

  root = tmp_path_factory.mktemp("tokenizers")
  out = {}
  for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
    tok = make_tiny_pipeline.write_tokenizer_files(str(root / name), pad_token=pad)
    out[name] = (tok, _OpenAIClipTokenizer(str(root / name)))
  return out


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_tokenize_equals_openai_clip(clip_tokenizers, name):
  from dpo_jax.models import conditioning

  tok, ref = clip_tokenizers[name]
  got = conditioning.tokenize(tok, TRICKY_CAPTIONS)
  want = ref.tokenize(TRICKY_CAPTIONS, pad_id=tok.pad_token_id)
  assert got.dtype == np.int32 and got.shape == (len(TRICKY_CAPTIONS), 77)
  for caption, g, w in zip(TRICKY_CAPTIONS, got, want):
    assert g.tolist() == w.tolist(), caption
  assert len(ref.encode(TRICKY_CAPTIONS[-1])) > 75 and got[-1, -1] == tok.eos_token_id


def test_clip_text_clean():
  from dpo_jax.models import conditioning

  assert conditioning.clip_text_clean("  ＦＵＬＬ\twidth’s &amp;amp; ") == "full width's &"


def test_leftover_rows_logged_once_per_epoch(world, caplog):
  caplog.set_level("INFO", logger="absl")  # Our log lines go through absl.
  it = _iterator(world, seed=4)
  batches = _take(it, 2 * it.batches_per_epoch)
  it.close()
  logged = [r.getMessage() for r in caplog.records if "left over" in r.getMessage()]
  assert len(logged) == 2  # One line per epoch.
  src = pickapic.open_split(os.fspath(world["data_dir"]), "train")
  for epoch, line in enumerate(logged):
    used = _ids(batches[epoch * 3 : (epoch + 1) * 3])
    # Independently: the rows of the epoch no batch used.
    rest = sorted(r for r in range(len(src)) if int(src[r]["example_id"]) not in used)
    assert f"Data epoch {epoch}: 2 of 20 rows left over" in line and str(rest) in line
    assert it.leftover_rows(epoch).tolist() != [] and sorted(it.leftover_rows(epoch)) == rest
