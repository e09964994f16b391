"""`python -m dpo_jax.sample` command-line behaviour: a diffusers folder as --checkpoint, errors.

User mistakes print one line on stderr and exit with status 2, no traceback.
The entry point runs in this process (`sample.cli_main` on parsed absl flags):
a subprocess would spend ~30 s importing diffusers on this machine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dpo_jax.toy import base
from tests.fixtures import run_sample_cli

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> str:
  return base.write_random_pipeline(str(tmp_path_factory.mktemp("toy_random")))


@pytest.fixture
def run_cli(tmp_path):
  """`run_cli(*flags)`: `python -m dpo_jax.sample` with a one-prompt file and tiny settings."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(PROMPT + "\n")

  def run(*extra: str) -> None:
    argv = [f"--prompts={prompts}", f"--output={tmp_path / 'out'}"]
    argv += ["--num_images_per_prompt=1", "--seed=3", "--num_inference_steps=2"]
    run_sample_cli(*argv, "--guidance_scale=2", "--mesh=1", *extra)

  return run


def assert_one_line_error(run, capsys, flag_list, *fragments: str) -> None:
  with pytest.raises(SystemExit) as exit_info:
    run(*flag_list)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert err.startswith("dpo_jax.sample: error: ")
  for fragment in fragments:
    assert fragment in err


def test_diffusers_folder_as_checkpoint_is_sampled_as_pipeline(toy_folder, tmp_path, run_cli):
  run_cli(f"--checkpoint={toy_folder}")
  (row,) = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
  # Sampled as --pipeline: the folder's own (base) UNet, no training checkpoint read.
  assert (row["model"], row["pipeline"], row["seed"]) == ("base", toy_folder, 3)
  image = np.asarray(Image.open(tmp_path / "out" / row["file"]))
  assert image.shape == (16, 16, 3) and image.std() > 0


def test_cli_user_errors_are_one_line(toy_folder, tmp_path, run_cli, capsys):
  other = tmp_path / "other"
  other.mkdir()
  assert_one_line_error(
    run_cli,
    capsys,
    [f"--checkpoint={toy_folder}", f"--pipeline={other}"],
    f"--checkpoint={toy_folder} is a diffusers pipeline folder",
    "pass it as --pipeline",
  )
  missing = tmp_path / "missing"
  assert_one_line_error(run_cli, capsys, [f"--checkpoint={missing}"], f"No checkpoint at {missing}")
  assert_one_line_error(run_cli, capsys, [], "Pass --checkpoint=WORKDIR_OR_STEP_DIR")
  assert_one_line_error(run_cli, capsys, ["stray"], "Unexpected arguments: ['stray']")
  assert not (tmp_path / "out").exists()
