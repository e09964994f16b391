"""`dpo_jax.evaluate` (scores -> win rates, CIs, report, plots) and `dpo_jax.data.relabel`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is local.

import json  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from dpo_jax import evaluate, scorers  # noqa: E402
from dpo_jax.data import relabel  # noqa: E402
from tests.fixtures import RED, encode_image, good_rows, jpeg, pickapic_row, write_parquet  # noqa: E402
from tests.test_scorers import random_images, write_aesthetic_folder, write_tiny_clip  # noqa: E402

P = ["p0", "p0", "p1", "p1", "p2", "p2"]  # 3 prompts x 2 seeds.


def test_evaluate_scores_hand_computed():
  base = np.ones(6)
  model = np.array([2.0, 3.0, 2.0, 1.0, 0.0, 0.5])
  res = evaluate.evaluate_scores({"base": base, "dpo": model}, P, "base", strict_margin=0.6)
  assert (res["n"], res["num_prompts"], res["baseline"]) == (6, 3, "base")
  assert res["models"]["base"]["vs_baseline"] is None
  row = res["models"]["dpo"]
  vs = row["vs_baseline"]
  # Differences 1, 2, 1, 0, -1, -0.5 -> outcomes 1, 1, 1, 1/2, 0, 0: per prompt 1, 3/4, 0.
  assert vs["win_rate"] == pytest.approx(3.5 / 6)
  # Strict (margin 0.6): -0.5 becomes a tie -> 1, 1, 1, 1/2, 0, 1/2: per prompt 1, 3/4, 1/4.
  assert vs["strict_win_rate"] == pytest.approx(4 / 6)
  assert vs["mean_diff"] == pytest.approx(2.5 / 6)
  assert row["mean"] == pytest.approx(8.5 / 6)
  # With 3 equal-size prompt clusters, each "same prompt 3 times" resample has
  # probability 1/27 = 3.7 % > 2.5 %, so the 95 % percentile interval is exactly
  # [min, max] of the per-prompt means (an image-level bootstrap would be narrower).
  assert (vs["win_rate_ci_low"], vs["win_rate_ci_high"]) == pytest.approx((0.0, 1.0))
  assert (vs["strict_win_rate_ci_low"], vs["strict_win_rate_ci_high"]) == pytest.approx((0.25, 1))
  assert (vs["mean_diff_ci_low"], vs["mean_diff_ci_high"]) == pytest.approx((-0.75, 1.5))
  assert row["mean_ci"] == pytest.approx([0.25, 2.5])  # Per prompt 2.5, 1.5, 0.25.
  assert res["models"]["base"]["mean_ci"] == pytest.approx([1.0, 1.0])


def test_evaluate_scores_errors():
  with pytest.raises(ValueError, match="Baseline 'sft' is not one of"):
    evaluate.evaluate_scores({"base": np.ones(6)}, P, "sft")
  with pytest.raises(ValueError, match=r"'dpo' have shape \(5,\), expected \(6,\)"):
    evaluate.evaluate_scores({"base": np.ones(6), "dpo": np.ones(5)}, P, "base")


def _rows(pairs):
  return [{"prompt": p, "seed": s, "path": f"{p}_{s}.png"} for p, s in pairs]


def test_match_samples_aligns_by_prompt_and_seed():
  a = _rows([("x", 0), ("x", 1), ("y", 0)])
  b = _rows([("y", 0), ("x", 1), ("x", 0)])  # Same set, other order.
  b = [{**r, "path": "b/" + r["path"]} for r in b]
  keys, files = evaluate.match_samples({"a": a, "b": b})
  assert keys == [("x", 0), ("x", 1), ("y", 0)]
  assert files["b"] == ["b/x_0.png", "b/x_1.png", "b/y_0.png"]


def test_match_samples_names_what_is_missing():
  a = _rows([("x", 0), ("x", 1), ("y", 0)])
  b = _rows([("x", 0), ("y", 0), ("z", 3)])
  with pytest.raises(ValueError) as e:
    evaluate.match_samples({"a": a, "b": b})
  msg = str(e.value)
  assert "'a' lacks 1 (prompt, seed) pair(s), e.g. [('z', 3)]" in msg
  assert "'b' lacks 1 (prompt, seed) pair(s), e.g. [('x', 1)]" in msg
  with pytest.raises(ValueError, match=r"two images for \(prompt, seed\) \('x', 0\)"):
    evaluate.match_samples({"a": a + a[:1], "b": b})


def write_samples(folder: str, images, prompts, seeds, shuffle_seed=None) -> None:
  """A folder like `python -m dpo_jax.sample` writes: PNGs + metadata.jsonl."""
  os.makedirs(folder, exist_ok=True)
  rows = []
  for i, (img, p, s) in enumerate(zip(images, prompts, seeds)):
    name = f"{i // 2:05d}_{s}.png"
    Image.fromarray(img).save(os.path.join(folder, name))
    rows.append({"file": name, "prompt": p, "seed": s, "model": "x", "scheduler": "ddim"})
  if shuffle_seed is not None:
    random.Random(shuffle_seed).shuffle(rows)
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def mean_red(images, prompts):
  """A stand-in scorer: mean red channel / 255."""
  return np.array([img[..., 0].mean() / 255 for img in images])


@pytest.fixture
def two_models(tmp_path):
  """base: grey images; dpo: red ones except on prompt p2; dpo's metadata in another order."""
  seeds = [0, 1] * 3
  grey = [np.full((16, 16, 3), 100, np.uint8) for _ in P]
  red = [np.full((16, 16, 3), (200 if p != "p2" else 50, 0, 0), np.uint8) for p in P]
  write_samples(str(tmp_path / "base"), grey, P, seeds)
  write_samples(str(tmp_path / "dpo"), red, P, seeds, shuffle_seed=1)
  return str(tmp_path / "base"), str(tmp_path / "dpo")


def test_run_matches_and_writes_everything(tmp_path, two_models):
  out = str(tmp_path / "out")
  res = evaluate.run(list(two_models), "base", {"red": mean_red}, out, num_resamples=500)
  vs = res["metrics"]["red"]["models"]["dpo"]["vs_baseline"]
  # dpo wins p0 and p1 (200 > 100) and loses p2 (50 < 100): matched by (prompt, seed)
  # although its metadata lists the images in another order.
  assert vs["win_rate"] == pytest.approx(4 / 6)
  assert vs["mean_diff"] == pytest.approx((100 * 4 - 50 * 2) / 6 / 255)
  with open(os.path.join(out, "scores.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 12
  for line in lines:
    want = 100 if line["model"] == "base" else (50 if line["prompt"] == "p2" else 200)
    assert line["red"] == pytest.approx(want / 255)
    want_file = f"{int(line['prompt'][1]):05d}_{line['seed']}.png"  # As write_samples names it.
    assert os.path.basename(line["file"]) == want_file


def test_cli_end_to_end(tmp_path):
  clip_dir = write_tiny_clip(str(tmp_path / "clip"))
  aesthetic_dir = str(tmp_path / "aesthetic")
  write_aesthetic_folder(aesthetic_dir, clip_dir)
  seeds = [0, 1] * 3
  write_samples(str(tmp_path / "base"), random_images(0, [(24, 24)] * 6), P, seeds)
  write_samples(str(tmp_path / "dpo"), random_images(1, [(24, 24)] * 6), P, seeds, shuffle_seed=3)
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in range(1, 6):
      row = {"step": step, "train/loss": 0.7 - 0.01 * step, "train/implicit_acc": 0.5}
      row["train/grad_norm"] = "nan" if step == 3 else 1.0  # How JsonlWriter logs NaN.
      f.write(json.dumps(row) + "\n")
    f.write(json.dumps({"step": 5, "eval/loss": 0.66}) + "\n")
  out = str(tmp_path / "eval")
  spec = f"clip_score={clip_dir},pickscore={clip_dir},aesthetic={aesthetic_dir}"
  argv = ["evaluate", f"--samples={tmp_path / 'base'},{tmp_path / 'dpo'}", "--baseline=base"]
  argv += [f"--scorers={spec}", f"--output={out}", f"--workdir={workdir}", "--num_resamples=300"]
  argv += ["--strict_margins=clip_score=0.5"]
  evaluate.main(argv)

  for name in ("results.json", "report.md", "scores.jsonl"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  for name in ("score_distributions.png", "win_rates.png", "training_curves.png"):
    with Image.open(os.path.join(out, name)) as img:
      assert img.format == "PNG" and min(img.size) > 100
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert set(results["metrics"]) == {"clip_score", "pickscore", "aesthetic"}
  assert results["scorers"]["aesthetic"] == aesthetic_dir
  assert results["metrics"]["clip_score"]["strict_margin"] == 0.5
  assert results["metrics"]["pickscore"]["strict_margin"] == evaluate.DEFAULT_STRICT_MARGIN
  # The numbers are evaluate_scores of the per-image scores in scores.jsonl ...
  with open(os.path.join(out, "scores.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  by_key = {(r["model"], r["prompt"], r["seed"]): r for r in lines}
  keys = sorted({(r["prompt"], r["seed"]) for r in lines})
  for metric, res in results["metrics"].items():
    per_model = {m: np.array([by_key[(m, *k)][metric] for k in keys]) for m in ("base", "dpo")}
    want = evaluate.evaluate_scores(
      per_model, [k[0] for k in keys], "base", res["strict_margin"], num_resamples=300
    )
    assert res["models"]["dpo"]["vs_baseline"]["win_rate"] == pytest.approx(
      want["models"]["dpo"]["vs_baseline"]["win_rate"]
    )
    assert res["models"]["dpo"]["mean"] == pytest.approx(want["models"]["dpo"]["mean"])
  # ... and those are the scorer's scores of the right image files.
  scorer = scorers.make_scorer("pickscore", clip_dir)
  for r in lines[:3] + lines[-3:]:
    img = evaluate.load_image(r["file"])
    assert r["pickscore"] == pytest.approx(scorer([img], [r["prompt"]])[0], abs=1e-4)
  report = open(os.path.join(out, "report.md")).read()
  win = results["metrics"]["aesthetic"]["models"]["dpo"]["vs_baseline"]["win_rate"]
  assert "## aesthetic" in report and "| dpo | " in report and f"{win:.3f} [" in report
  assert "![training_curves](training_curves.png)" in report


def test_cli_mismatched_samples(tmp_path):
  write_samples(str(tmp_path / "base"), random_images(0, [(8, 8)] * 6), P, [0, 1] * 3)
  write_samples(str(tmp_path / "dpo"), random_images(0, [(8, 8)] * 4), P[:4], [0, 1] * 2)
  with pytest.raises(
    ValueError, match=r"'dpo' lacks 2 \(prompt, seed\) pair\(s\), e.g. \[\('p2', 0\)"
  ):
    evaluate.run([str(tmp_path / "base"), str(tmp_path / "dpo")], "base", {"r": mean_red}, "x")
  with pytest.raises(ValueError, match="--baseline='sft' is not one of"):
    evaluate.run([str(tmp_path / "base")], "sft", {"r": mean_red}, "x")


# ---------------------------------------------------------------------------
# Relabelling.


def redness(images, prompts):
  """Stand-in scorer: mean (red - blue) / 255, prompt ignored."""
  return np.array([(img[..., 0].astype(float) - img[..., 2]).mean() / 255 for img in images])


def relabel_input(folder: str) -> dict[int, str]:
  """Two parquet files; returns the expected outcome per ranking_id."""
  os.makedirs(folder)
  rows, _ = good_rows(4)  # Red winner: the scorer agrees.
  expect = {r["ranking_id"]: "agree" for r in rows}
  flipped, _ = good_rows(2, first_id=2000)  # Human label says blue wins: flipped.
  for r in flipped:
    r["label_0"], r["label_1"] = r["label_1"], r["label_0"]
    r["best_image_uid"] = r["image_0_uid"] if r["label_0"] == 1 else r["image_1_uid"]
    expect[r["ranking_id"]] = "flip"
  dark_red = jpeg((200, 20, 20))
  extra = [
    # Near-equal reds: |diff| ~ 0.1 < tie_margin 0.2 -> tie.
    pickapic_row(3000, "near tie", jpeg(RED), dark_red, 1.0, 0.0),
    # An original tie that the scorer decides: red wins.
    pickapic_row(3001, "was a tie", jpeg((20, 20, 230)), jpeg(RED), 0.5, 0.5),
    pickapic_row(3002, None, jpeg(RED), b"not an image", 1.0, 0.0),  # Undecodable; null caption.
    pickapic_row(
      3003, "cut", jpeg(RED), jpeg(RED)[: len(jpeg(RED)) // 2], 1.0, 0.0
    ),  # Truncated JPEG.
    pickapic_row(3004, "none", None, jpeg(RED), 0.0, 1.0),  # Missing image.
  ]
  expect.update({3000: "strict_to_tie", 3001: "tie_to_strict"})
  write_parquet(os.path.join(folder, "train-00000-of-00002.parquet"), rows + flipped[:1])
  write_parquet(os.path.join(folder, "train-00001-of-00002.parquet"), flipped[1:] + extra)
  return expect


def test_relabel_labels_ties_and_corrupt_rows(tmp_path):
  expect = relabel_input(str(tmp_path / "in"))
  out = str(tmp_path / "out")
  # batch_rows=3: batches end mid-file, so row numbers must carry over.
  report = relabel.relabel(str(tmp_path / "in"), out, redness, tie_margin=0.2, batch_rows=3)
  assert (report["rows"], report["rows_written"], report["undecodable_rows"]) == (11, 8, 3)
  assert report["undecodable_by_reason"] == {
    "non_image": 1,
    "truncated_image": 1,
    "missing_image": 1,
  }
  listed = {(u["file"], u["row"], u["id"], u["reason"]) for u in report["undecodable"]}
  f1 = "train-00001-of-00002.parquet"
  assert listed == {
    (f1, 3, 3002, "non_image"),
    (f1, 4, 3003, "truncated_image"),
    (f1, 5, 3004, "missing_image"),
  }
  assert (report["flips"], report["ties"]) == (2, 1)
  assert report["label_changes"] == {
    "agree": 4,
    "flip": 2,
    "strict_to_tie": 1,
    "tie_to_strict": 1,
    "tie_to_tie": 0,
    "original_unlabeled": 0,
  }
  with open(os.path.join(out, relabel.REPORT)) as f:
    assert json.load(f)["flips"] == 2

  inputs = {
    r["ranking_id"]: r
    for f in sorted(os.listdir(tmp_path / "in"))
    for r in pq.read_table(tmp_path / "in" / f).to_pylist()
  }
  outputs = [
    r
    for f in sorted(os.listdir(out))
    if f.endswith(".parquet")
    for r in pq.read_table(os.path.join(out, f)).to_pylist()
  ]
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "in") + [relabel.REPORT])
  assert len(outputs) == 8
  for row in outputs:
    old = inputs[row["ranking_id"]]
    outcome = expect[row["ranking_id"]]
    red_first = row["ai_score_0"] > row["ai_score_1"]
    if outcome == "strict_to_tie":
      assert (row["label_0"], row["label_1"], row["best_image_uid"]) == (0.5, 0.5, None)
      assert abs(row["ai_score_0"] - row["ai_score_1"]) <= 0.2
    else:
      assert row["label_0"] == (1.0 if red_first else 0.0) and row["label_1"] == 1 - row["label_0"]
      assert row["best_image_uid"] == (row["image_0_uid"] if red_first else row["image_1_uid"])
    if outcome == "agree":
      assert row["label_0"] == old["label_0"]
    if outcome == "flip":
      assert row["label_0"] == 1 - old["label_0"]
    # Every other column is untouched.
    for key in set(old) - {"label_0", "label_1", "best_image_uid"}:
      assert row[key] == old[key], key


def test_relabel_cli_with_pickscore(tmp_path):
  clip_dir = write_tiny_clip(str(tmp_path / "clip"))
  folder = tmp_path / "in"
  folder.mkdir()
  imgs = random_images(5, [(24, 24), (20, 28), (28, 20), (24, 24)])
  rows = [
    pickapic_row(
      i,
      f"caption {i}",
      encode_image(Image.fromarray(a), "PNG"),
      encode_image(Image.fromarray(b), "PNG"),
      1.0,
      0.0,
    )
    for i, (a, b) in enumerate([(imgs[0], imgs[1]), (imgs[2], imgs[3]), (imgs[1], imgs[2])])
  ]
  rows.append(pickapic_row(9, "bad", b"\x00" * 10, rows[0]["jpg_1"], 1.0, 0.0))
  write_parquet(str(folder / "validation_unique-00000-of-00001.parquet"), rows)
  out = str(tmp_path / "out")
  report = relabel.main(
    ["relabel", f"--input={folder}", f"--output={out}", f"--scorer=pickscore={clip_dir}"]
  )
  assert (report["scorer"], report["rows"], report["rows_written"]) == ("pickscore", 4, 3)
  assert report["undecodable_by_reason"] == {"non_image": 1}
  table = pq.read_table(os.path.join(out, "validation_unique-00000-of-00001.parquet")).to_pylist()
  scorer = scorers.make_scorer("pickscore", clip_dir)
  pairs = [(imgs[0], imgs[1]), (imgs[2], imgs[3]), (imgs[1], imgs[2])]
  for row, (a, b) in zip(table, pairs):
    want = scorer([a, b], [row["caption"]] * 2)
    assert [row["ai_score_0"], row["ai_score_1"]] == pytest.approx(want, abs=1e-4)
    assert row["label_0"] == (1.0 if want[0] > want[1] else 0.0)
  assert report["flips"] == sum(r["label_0"] == 0.0 for r in table)
