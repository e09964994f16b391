"""Tests for the toy text-to-image world and its model-free reward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dpo_jax.toy import world
from dpo_jax.toy.reward import reward, reward_terms

SEEDS_PER_PROMPT = 20


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[world.PromptSpec], np.ndarray]:
  """Every prompt rendered SEEDS_PER_PROMPT times: (specs [N], images uint8 [N, 16, 16, 3])."""
  specs = world.all_specs() * SEEDS_PER_PROMPT
  return specs, world.render_batch(specs, seed=123)


def _swap(specs, field: str, values) -> list[world.PromptSpec]:
  """Each spec with `field` replaced by a different value, cycling through the others."""
  out = []
  for i, spec in enumerate(specs):
    others = [v for v in values if v != getattr(spec, field)]
    out.append(dataclasses.replace(spec, **{field: others[i % len(others)]}))
  return out


# ---------------------------------------------------------------- world


def test_vocabulary_and_prompt_text():
  specs = world.all_specs()
  assert len(specs) == 48 == len(set(specs))
  assert world.PromptSpec("red", "circle", "top left").text == "a red circle at the top left"


def test_parse_prompt_round_trips_all_prompts():
  for spec in world.all_specs():
    assert world.parse_prompt(spec.text) == spec
  assert world.parse_prompt("  A Blue Square at the Bottom Right ") == world.PromptSpec(
    "blue", "square", "bottom right"
  )


@pytest.mark.parametrize(
  "text",
  [
    "",
    "a red circle",
    "a purple circle at the top left",
    "a red hexagon at the top left",
    "a red circle at the middle left",
    "a red circle in the top left",
    "red circle at the top left please",
  ],
)
def test_parse_prompt_rejects_junk(text):
  with pytest.raises(ValueError, match="Cannot parse prompt"):
    world.parse_prompt(text)


def test_split_is_deterministic_disjoint_and_keeps_every_word_in_training():
  train, heldout = world.split_specs(num_heldout=8, seed=0)
  assert (train, heldout) == world.split_specs(num_heldout=8, seed=0)
  assert len(heldout) == 8 and len(train) == 40
  assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(world.all_specs())
  assert {s.colour for s in train} == set(world.COLOURS)
  assert {s.shape for s in train} == set(world.SHAPES)
  assert {s.quadrant for s in train} == set(world.QUADRANTS)
  assert world.split_specs(num_heldout=8, seed=1)[1] != heldout  # The seed matters.


def test_split_keeps_every_word_even_when_holding_out_many():
  # 36 of 48 is enough to exhaust a colour if prompts were taken blindly.
  train, _ = world.split_specs(num_heldout=36, seed=3)
  assert {s.colour for s in train} == set(world.COLOURS)
  assert {s.shape for s in train} == set(world.SHAPES)
  assert {s.quadrant for s in train} == set(world.QUADRANTS)
  with pytest.raises(ValueError):
    world.split_specs(num_heldout=46)  # 2 prompts cannot cover 4 colours.


def test_render_is_deterministic_for_a_seed_and_varies_across_seeds():
  specs = world.all_specs()
  a = world.render_batch(specs, seed=7)
  assert a.shape == (48, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, world.render_batch(specs, seed=7))
  assert not np.array_equal(a, world.render_batch(specs, seed=8))
  np.testing.assert_array_equal(
    world.render(specs[5], np.random.default_rng(1)),
    world.render(specs[5], np.random.default_rng(1)),
  )


def test_render_draws_the_right_colour_in_the_right_quadrant(ground_truth):
  specs, images = ground_truth
  for spec, img in zip(specs[:48], images[:48], strict=True):
    r0, r1, c0, c1 = world.quadrant_box(spec.quadrant, 16)
    ink = img.astype(float).sum(axis=-1)
    assert ink[r0:r1, c0:c1].sum() > 0.95 * ink.sum()  # Jitter may spill a sliver.
    brightest = img.reshape(-1, 3)[ink.argmax()]
    np.testing.assert_array_equal(brightest, world.COLOURS[spec.colour])
    assert img.max(axis=-1).max() == 255 and (img == 0).all(axis=-1).mean() > 0.75


def test_corrupt_caption_changes_exactly_colour_or_quadrant():
  rng = np.random.default_rng(0)
  changed = {"colour": 0, "quadrant": 0}
  for spec in world.all_specs() * 5:
    bad = world.corrupt_caption(spec, rng)
    diffs = [f for f in ("colour", "shape", "quadrant") if getattr(bad, f) != getattr(spec, f)]
    assert len(diffs) == 1 and diffs[0] in changed
    changed[diffs[0]] += 1
  assert min(changed.values()) > 60  # Both kinds happen, roughly half each (of 240).


# ---------------------------------------------------------------- reward


def test_ground_truth_scores_high(ground_truth):
  specs, images = ground_truth
  r = reward(images, specs)
  assert r.shape == (len(specs),) and r.dtype == np.float64
  assert 0.7 <= r.mean() <= 1.0, r.mean()
  assert r.min() > 0.5, r.min()


def test_ideal_rendering_scores_one():
  # The reward is normalised by the score of the un-jittered template.
  specs = world.all_specs()
  ideal = np.stack(
    [
      world.shape_coverage(s.shape, s.quadrant, 16)[..., None] * np.asarray(world.COLOURS[s.colour])
      for s in specs
    ]
  )
  np.testing.assert_allclose(reward(ideal / 255.0, specs), 1.0, atol=1e-5)
  # uint8 rounding of anti-aliased edges barely matters.
  np.testing.assert_allclose(reward(np.round(ideal).astype(np.uint8), specs), 1.0, atol=0.02)


def test_wrong_colour_and_wrong_quadrant_always_score_lower(ground_truth):
  specs, images = ground_truth
  right = reward(images, specs)
  wrong_colour = reward(images, _swap(specs, "colour", world.COLOURS))
  wrong_quadrant = reward(images, _swap(specs, "quadrant", world.QUADRANTS))
  assert (right > wrong_colour + 0.5).all()
  assert (right > wrong_quadrant + 1.0).all()
  # No target colour anywhere: like a black image (minus any jitter spill outside).
  assert wrong_colour.max() < 0.01
  assert wrong_quadrant.mean() < -0.7  # A whole object of stray ink outside the quadrant.


def test_wrong_shape_scores_lower_on_average(ground_truth):
  specs, images = ground_truth
  right = reward(images, specs)
  wrong = reward(images, _swap(specs, "shape", world.SHAPES))
  assert right.mean() > wrong.mean() + 0.2
  assert (right > wrong).mean() > 0.9  # The shape term is weak at 16 px, but not noise.
  # The shape term alone prefers the right shape for (nearly) every image.
  assert (reward_terms(images, specs)["shape"] > 0).mean() > 0.98


def test_blank_and_near_blank_score_below_every_wrong_place_drawing(ground_truth):
  """A blank or near-blank image never beats the right colour and shape in a wrong quadrant.

  Without the missing-ink term a blank image scored 0, far above a mislocated
  drawing (~-0.9), so drawing nothing paid.
  """
  specs, images = ground_truth
  # Every prompt's colour and shape drawn (jittered) in each of its three wrong quadrants.
  rng_specs = [
    dataclasses.replace(s, quadrant=q) for s in specs for q in world.QUADRANTS if q != s.quadrant
  ]
  wrong_place = world.render_batch(rng_specs, seed=5)
  prompt_of = [s for s in specs for _ in range(3)]
  worst = reward(wrong_place, prompt_of).reshape(len(specs), 3).min(axis=1)  # [N]
  assert worst.max() < -0.5  # Sanity: these really are bad drawings.
  x = images.astype(np.float64) / 255.0
  dot = np.zeros_like(x)
  for i, s in enumerate(specs):  # One fully lit pixel of the right colour, right quadrant.
    r0, _, c0, _ = world.quadrant_box(s.quadrant, 16)
    dot[i, r0 + 4, c0 + 4] = np.asarray(world.COLOURS[s.colour]) / 255.0
  near_blank = {
    "blank": np.zeros_like(x),
    "faint right drawing (10 % ink)": 0.1 * x,
    "faint wrong-place drawing (10 % ink)": 0.1 * wrong_place[::3] / 255.0,
    "one pixel": dot,
  }
  for name, img in near_blank.items():
    r = reward(img, specs)
    assert (r <= worst).all(), (name, (r - worst).max())
  # A drawing with at least half an object of ink is not penalised: the ideal still scores 1
  # (test_ideal_rendering_scores_one) and so is every ground-truth rendering.
  assert (reward_terms(images, specs)["blank_penalty"] == 0).all()
  assert (reward_terms(0.3 * x, specs)["blank_penalty"] > 0).all()


def test_colour_cast_background_lowers_reward(ground_truth):
  specs, images = ground_truth
  cast = np.clip(images.astype(np.int32) + 40, 0, 255).astype(np.uint8)
  right, with_cast = reward(images, specs), reward(cast, specs)
  assert (with_cast < right - 0.3).all()


def test_float_and_uint8_inputs_agree(ground_truth):
  specs, images = ground_truth
  np.testing.assert_allclose(reward(images / 255.0, specs), reward(images, specs), atol=1e-9)
  # Floats outside [0, 1] (e.g. raw model outputs) are clipped, not rejected.
  np.testing.assert_allclose(
    reward(images / 255.0 * 1.5 - 0.25, specs),
    reward(np.clip(images / 255.0 * 1.5 - 0.25, 0, 1), specs),
  )


def test_batched_equals_one_by_one(ground_truth):
  specs, images = ground_truth
  idx = np.random.default_rng(0).choice(len(specs), size=40, replace=False)
  batched = reward(images[idx], [specs[i] for i in idx])
  single = np.array([reward(images[i : i + 1], [specs[i]])[0] for i in idx])
  np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-9)


def test_reward_rejects_mismatched_inputs(ground_truth):
  specs, images = ground_truth
  with pytest.raises(ValueError):
    reward(images[:3], specs[:2])
  with pytest.raises(ValueError):
    reward(images[:2, :, :, 0], specs[:2])
