"""`python -m dpo_jax.tools.parity` on the tiny SD1.5, SD2-style and SDXL pipelines.

Passing rows on the real folders, a failing row (exit status 1) when dpo_jax's
weights differ from PyTorch's, and one-line usage errors (exit status 2).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest

from dpo_jax.models import loader
from dpo_jax.tools import make_tiny_pipeline, parity


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
  return make_tiny_pipeline.make_tiny_pipeline(
    "sd15", str(tmp_path_factory.mktemp("sd15")), seed=0, backend="torch"
  )


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  return make_tiny_pipeline.make_tiny_pipeline(
    "sdxl", str(tmp_path_factory.mktemp("sdxl")), seed=1, backend="torch"
  )


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
  return make_tiny_pipeline.make_tiny_pipeline(
    "sd2", str(tmp_path_factory.mktemp("sd2")), seed=2, backend="torch"
  )


def _by_output(rows):
  return {(r.component, r.output): r for r in rows}


def test_sd15_all_components_pass(sd15_dir, capsys):
  assert parity.main(["parity", f"--pretrained_path={sd15_dir}"]) == 0
  table = capsys.readouterr().out
  print(table)
  lines = table.splitlines()
  assert lines[-1] == "5 of 5 outputs within tolerance."
  # One row per output, each with its measured difference and "pass".
  for component, output in [
    ("unet", "sample"),
    ("vae", "encode.mean"),
    ("vae", "decode"),
    ("text_encoder", "last_hidden_state"),
    ("text_encoder", "pooler_output"),
  ]:
    row = next(line for line in lines if line.split()[:2] == [component, output])
    diff, ref = float(row.split()[2]), float(row.split()[3])
    assert row.endswith("pass") and diff <= 1e-4 and ref > 0.1


def test_sdxl_unet_and_both_text_encoders_pass(sdxl_dir):
  rows = parity.check(sdxl_dir, ["unet", "text_encoder", "text_encoder_2"])
  got = _by_output(rows)
  assert set(got) == {
    ("unet", "sample"),
    ("text_encoder", "penultimate"),  # SDXL's context is built from it.
    ("text_encoder", "last_hidden_state"),
    ("text_encoder", "pooler_output"),
    ("text_encoder_2", "penultimate"),
    ("text_encoder_2", "text_embeds"),
  }
  for row in rows:
    assert row.passed and row.max_abs_diff <= 1e-4 and row.max_abs_ref > 0.1, row


def test_sd2_unet_and_text_encoder_pass(sd2_dir):
  """SD2-style: linear projections, per-block heads, upcast attention, 16 norm groups."""
  rows = parity.check(sd2_dir, ["unet", "text_encoder"])
  assert [(r.component, r.output) for r in rows] == [
    ("unet", "sample"),
    ("text_encoder", "last_hidden_state"),
    ("text_encoder", "pooler_output"),
  ]
  for row in rows:
    assert row.passed and row.max_abs_diff <= 1e-4 and row.max_abs_ref > 0.1, row


def test_a_weight_difference_fails_with_exit_status_1(sd15_dir, monkeypatch, capsys):
  real = loader.load_text_encoder

  def off_by_a_little(*args, **kwargs):
    module, params = real(*args, **kwargs)
    # 1e-3 on one bias of the last layer: far beyond 1e-4 in the outputs.
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    path = next(p for p, _ in flat if "final_layer_norm" in jax.tree_util.keystr(p))
    params = jax.tree_util.tree_map_with_path(lambda p, x: x + 1e-3 if p == path else x, params)
    return module, params

  monkeypatch.setattr(loader, "load_text_encoder", off_by_a_little)
  argv = ["parity", f"--pretrained_path={sd15_dir}", "--components=text_encoder"]
  assert parity.main(argv) == 1
  out = capsys.readouterr().out
  assert out.splitlines()[-1] == "0 of 2 outputs within tolerance."
  row = next(line for line in out.splitlines() if line.startswith("text_encoder"))
  assert row.endswith("FAIL") and 9e-4 < float(row.split()[2]) < 1e-2


def test_usage_errors_are_one_line_with_exit_status_2(sd15_dir, monkeypatch, capsys):
  cases = [
    ([f"--pretrained_path={sd15_dir}", "--components=text_encoder_2"], "has no 'text_encoder_2'"),
    ([f"--pretrained_path={sd15_dir}", "--components=unet,clip"], "unknown component 'clip'"),
    (["--pretrained_path=/nonexistent/pipe"], "No pipeline folder at /nonexistent/pipe"),
    ([], "--pretrained_path is required"),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit) as e:
      parity.main(["parity", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
  # Without torch (a run-time install): how to get it.
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(SystemExit) as e:
    parity.main(["parity", f"--pretrained_path={sd15_dir}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "pip install 'dpo_jax[torch]'" in err and "Traceback" not in err


def test_token_ids_pool_at_the_end_token():
  ids = parity._token_ids({"vocab_size": 610, "eos_token_id": 2}, np.random.default_rng(0))
  assert ids.shape == (2, 77) and (ids[:, 0] == 608).all()
  # The first end token is the argmax (legacy pooling) and sits after the random tokens.
  assert list(ids.argmax(-1)) == [6, 21] and (ids[:, 1:6] < 608).all()
