"""Tests for the toy world's attribute judge (`toy.judge`) and its scorers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dpo_jax.toy import judge, world


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[world.PromptSpec], np.ndarray]:
  """Every prompt rendered 20 times with jitter: (specs [960], uint8 [960, 16, 16, 3])."""
  specs = world.all_specs() * 20
  return specs, world.render_batch(specs, seed=321)


def _ideal(specs) -> np.ndarray:
  cov = [world.shape_coverage(s.shape, s.quadrant, 16)[..., None] for s in specs]
  rgb = [c * np.asarray(world.COLOURS[s.colour]) for c, s in zip(cov, specs)]
  return np.round(np.stack(rgb)).astype(np.uint8)


def test_judge_reads_ground_truth(ground_truth):
  specs, images = ground_truth
  acc = judge.accuracy(images, specs)
  assert set(acc) == set(judge.METRICS)
  assert acc["colour"].mean() == 1.0 and acc["quadrant"].mean() == 1.0
  assert acc["blank"].sum() == 0
  assert acc["all_three"].mean() >= 0.98, acc["all_three"].mean()
  np.testing.assert_array_equal(acc["all_three"], acc["colour"] * acc["quadrant"] * acc["shape"])
  # The un-jittered renderings: every attribute of every prompt.
  assert judge.accuracy(_ideal(world.all_specs()), world.all_specs())["all_three"].min() == 1.0


def test_judge_never_sees_the_prompt(ground_truth):
  """Judged against a prompt that differs in one word, exactly that attribute is wrong."""
  specs, images = ground_truth
  specs, images = specs[:96], images[:96]
  truth = judge.accuracy(images, specs)
  for field, values in (
    ("colour", world.COLOURS),
    ("shape", world.SHAPES),
    ("quadrant", world.QUADRANTS),
  ):
    lies = [
      dataclasses.replace(s, **{field: [v for v in values if v != getattr(s, field)][i % 2]})
      for i, s in enumerate(specs)
    ]
    acc = judge.accuracy(images, lies)
    assert acc[field].sum() == 0 and acc["all_three"].sum() == 0
    for other in {"colour", "shape", "quadrant"} - {field}:
      np.testing.assert_array_equal(acc[other], truth[other])


def test_dominant_blob_decides_colour_quadrant_and_shape():
  # A red square at the top left (36 px) plus a smaller green triangle at the bottom right.
  big = world.PromptSpec("red", "square", "top left")
  small = world.PromptSpec("green", "triangle", "bottom right")
  img = np.maximum(_ideal([big]), _ideal([small]))
  got = judge.attributes(img)
  assert (got["colour"][0], got["quadrant"][0], got["shape"][0]) == (0, 0, 1)
  assert judge.describe(img) == ["red square TL"]
  # Shape: the triangle alone is read as a triangle, the circle as a circle.
  assert judge.describe(_ideal([small, dataclasses.replace(small, shape="circle")])) == [
    "green triangle BR",
    "green circle BR",
  ]


def test_blank_and_faint_images_are_blank_and_wrong(ground_truth):
  specs, images = ground_truth
  specs, images = specs[:48], images[:48]
  for img in (np.zeros_like(images), (images * 0.05).astype(np.uint8)):
    acc = judge.accuracy(img, specs)
    assert acc["blank"].min() == 1.0
    assert acc["colour"].max() == acc["quadrant"].max() == acc["all_three"].max() == 0.0
  assert judge.describe(np.zeros_like(images[:1])) == ["blank"]
  # Half the ink is still a drawing.
  assert judge.accuracy(images // 2, specs)["blank"].max() == 0.0


def test_float_inputs_and_errors(ground_truth):
  specs, images = ground_truth
  a = judge.accuracy(images[:48], specs[:48])
  b = judge.accuracy(images[:48] / 255.0, specs[:48])
  for k in judge.METRICS:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    judge.accuracy(images[:2], specs[:1])
  with pytest.raises(ValueError, match=r"Expected images \[N, H, H, 3\]"):
    judge.attributes(images[:2, :, :, 0])


def test_attribute_scorers_are_registered(ground_truth):
  """`dpo_jax.evaluate --scorers=toy_all_three,...` scores with the judge, by prompt text."""
  from dpo_jax import scorers

  specs, images = ground_truth
  images, specs = images[:48], specs[:48]
  lies = [dataclasses.replace(s, quadrant="top left") for s in specs]
  for metric in judge.METRICS:
    name = f"toy_{metric}"
    assert name in scorers.model_free_scorers()
    scorer = scorers.make_scorer(name, "")
    np.testing.assert_array_equal(
      scorer(list(images), [s.text for s in lies]), judge.accuracy(images, lies)[metric]
    )


def test_attribute_summary_table_and_grid(ground_truth):
  """A model drawing everything in the wrong quadrant vs one drawing it right: +100 points."""
  from dpo_jax.toy import grid, run

  specs, images = ground_truth
  specs, images = specs[:96], images[:96]  # 48 prompts x 2 seeds, seed-major
  order = np.argsort([world.all_specs().index(s) for s in specs], kind="stable")
  specs, images = [specs[i] for i in order], images[order]  # prompt-major, as the toy grid
  moved = [
    dataclasses.replace(s, quadrant=[q for q in world.QUADRANTS if q != s.quadrant][0])
    for s in specs
  ]
  wrong = world.render_batch(moved, seed=9)
  scored = {"base": (wrong, np.zeros(96)), "dpo": (images, np.ones(96))}
  out = run.summarize_attributes(scored, specs, "base")
  assert out["base"]["quadrant"]["rate"] == 0.0 and out["base"]["colour"]["rate"] == 1.0
  vs = out["dpo"]["all_three"]["vs_base"]
  assert out["dpo"]["all_three"]["rate"] == 1.0 and vs["mean_diff"] == 1.0
  assert vs["mean_diff_ci_low"] == 1.0 and "vs_base" not in out["base"]["all_three"]
  table = run.format_attribute_table({"heldout_prompts": out})
  assert "| heldout prompts | dpo | 100.0 % | 100.0 % | 100.0 % | 100.0 % [100.0, 100.0] " in table
  assert "| +100.0 [+100.0, +100.0] | 0.0 % |" in table
  picture = grid.annotated_grid(scored, specs, num_prompts=48, seeds_per_prompt=2, columns=2)
  assert picture.dtype == np.uint8 and picture.ndim == 3
  # The dpo block's first tile is the first image enlarged 4x, in place.
  block_x = grid._LABEL_W + 2 * (16 * grid.SCALE + grid._PAD) + grid._BLOCK_GAP
  tile = picture[grid._HEADER_H : grid._HEADER_H + 64, block_x : block_x + 64]
  np.testing.assert_array_equal(tile, images[0].repeat(4, axis=0).repeat(4, axis=1))
