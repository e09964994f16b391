"""User mistakes on the command line: one `error: ...` line, exit status 2, nothing created.

The CLI cases run `python -m dpo_jax.train` (and the cache writer) as a user
would; they fail before JAX is imported, so each takes about a second. The
input checks themselves (`preflight.preflight`) are exercised in-process on
folders holding only the file names the checks look at.
"""

import json
import os
import subprocess
import sys

import pytest

from configs import sd15, tiny
from dpo_jax import preflight
from tests.fixtures import REPO


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _only_error_line(proc: subprocess.CompletedProcess) -> str:
  """The single stderr line of a failed CLI run; fails unless that is all it printed."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize(
  "args,expected",
  [
    # Default config (the toy world): ml_collections applies overrides while the
    # flag is defined, before absl parses anything.
    (["--config.max_step=5"], "error: unknown config field 'max_step'; did you mean: max_steps?"),
    (
      ["--config=configs/tiny.py", "--config.optim.lrr=1e-3"],
      "error: unknown config field 'optim.lrr'; did you mean: optim.lr?",
    ),
    # A field given at the wrong level.
    (["--config=configs/tiny.py", "--config.lr=1e-3"], "error: unknown config field 'lr'; "),
  ],
)
def test_misspelt_config_field_is_one_line_naming_the_closest_field(tmp_path, args, expected):
  workdir = tmp_path / "run"
  line = _only_error_line(_run("dpo_jax.train", *args, f"--workdir={workdir}"))
  assert line.startswith(expected), line
  if "'lr'" in expected:
    assert line.endswith("did you mean: optim.lr?"), line
  assert not workdir.exists()


def test_bad_config_file_argument_and_value_are_one_line(tmp_path):
  workdir = f"--workdir={tmp_path / 'run'}"
  line = _only_error_line(_run("dpo_jax.train", "--config=configs/tiny.pyy", workdir))
  assert "no such config file" in line and "configs/tiny.py" in line
  line = _only_error_line(_run("dpo_jax.train", "--config=configs/tiny.py:fast", workdir))
  assert (
    line
    == "error: --config=configs/tiny.py:fast: Unknown tiny variant 'fast'; expected '' or 'sft'."
  )
  line = _only_error_line(
    _run("dpo_jax.train", "--config=configs/tiny.py", "--config.max_steps=ten", workdir)
  )
  assert "--config.max_steps=ten" in line and "int()" in line
  line = _only_error_line(_run("dpo_jax.train", "--config=configs/tiny.py", "--wrkdir=x"))
  assert "Unknown command line flag 'wrkdir'" in line and "workdir" in line
  assert not (tmp_path / "run").exists()


def test_sd15_without_data_path_names_the_missing_field(tmp_path):
  workdir = tmp_path / "run"
  line = _only_error_line(
    _run(
      "dpo_jax.train",
      "--config=configs/sd15.py",
      "--config.pretrained_path=/models/sd15",
      f"--workdir={workdir}",
    )
  )
  assert line.startswith("error: missing input: set --config.data.path=DIR"), line
  assert "pretrained_path" not in line  # It was given.
  assert not workdir.exists()


def test_wrong_pretrained_path_fails_before_the_workdir_exists(tmp_path):
  parquet = tmp_path / "pairs"
  parquet.mkdir()
  (parquet / "train-00000-of-00001.parquet").write_bytes(b"")
  workdir = tmp_path / "run"
  missing = tmp_path / "no_such_pipeline"
  line = _only_error_line(
    _run(
      "dpo_jax.train",
      "--config=configs/sd15.py",
      f"--config.pretrained_path={missing}",
      f"--config.data.path={parquet}",
      f"--workdir={workdir}",
    )
  )
  assert line.startswith(f"error: config.pretrained_path={missing}: no such folder"), line
  # Without the check the trainer creates the workdir, config.json and the
  # events / metrics files before it loads the pipeline.
  assert not workdir.exists()


def test_cache_writer_misspelt_field_is_one_error_line(tmp_path):
  out = tmp_path / "cache"
  proc = _run(
    "dpo_jax.data.cache", "--config=configs/sd15.py", "--config.data.pth=x", f"--output={out}"
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # Importing the module prints TensorFlow / diffusers notices; one of the lines is the error.
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert errors == ["error: unknown config field 'data.pth'; did you mean: data.path?"]
  assert not out.exists()


# --- preflight() in-process ----------------------------------------------------


def _fake_pipeline(root, variant: str = "", sdxl: bool = False) -> str:
  """A folder with a pipeline's file names (empty weights files: the checks read names only)."""
  index = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
  }
  v = f".{variant}" if variant else ""
  files = {
    "unet": f"diffusion_pytorch_model{v}.safetensors",
    "vae": f"diffusion_pytorch_model{v}.safetensors",
    "text_encoder": f"model{v}.safetensors",
  }
  if sdxl:
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    files["text_encoder_2"] = f"model{v}.safetensors"
  os.makedirs(root)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump(index, f)
  for component, name in files.items():
    os.makedirs(os.path.join(root, component))
    for fname in ("config.json", name):
      open(os.path.join(root, component, fname), "w").close()
  return str(root)


def _sd15_config(pipeline: str, data_path: str, **fields):
  c = sd15.get_config()
  c.unlock()
  c.pretrained_path, c.data.path = pipeline, data_path
  for k, v in fields.items():
    c[k] = v
  return c


@pytest.fixture
def parquet_dir(tmp_path):
  d = tmp_path / "pairs"
  d.mkdir()
  (d / "train-00000-of-00001.parquet").write_bytes(b"")
  return str(d)


def test_variant_only_pipeline_names_the_variant_and_the_flag(tmp_path, parquet_dir):
  pipe = _fake_pipeline(tmp_path / "sd15_fp16", variant="fp16")
  preflight.preflight(_sd15_config(pipe, parquet_dir, pretrained_variant="fp16"))  # Passes.
  with pytest.raises(preflight.UserInputError) as e:
    preflight.preflight(_sd15_config(pipe, parquet_dir))
  msg = str(e.value)
  assert "\n" not in msg and os.path.join(pipe, "unet") in msg
  assert "Variants found: 'fp16'" in msg and "--config.pretrained_variant=fp16" in msg
  # The other way round: plain files, a variant asked for.
  plain = _fake_pipeline(tmp_path / "sd15", variant="")
  with pytest.raises(preflight.UserInputError, match=r"--config\.pretrained_variant=''"):
    preflight.preflight(_sd15_config(plain, parquet_dir, pretrained_variant="fp16"))


def test_encoder_weights_are_checked_only_when_the_run_loads_them(tmp_path, parquet_dir):
  pipe = _fake_pipeline(tmp_path / "sdxl", sdxl=True)
  os.remove(os.path.join(pipe, "text_encoder_2", "model.safetensors"))
  with pytest.raises(preflight.UserInputError, match="text_encoder_2"):
    preflight.preflight(_sd15_config(pipe, parquet_dir))
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "meta.json").write_text("{}")
  # A latent-cache run reads only the UNet (build_models(with_encoders=False)).
  c = _sd15_config(pipe, "")
  c.data.source, c.data.cache_dir = "cache", str(cache)
  preflight.preflight(c)


def test_pipeline_folder_mistakes_say_which_folder_was_meant(tmp_path, parquet_dir):
  pipe = _fake_pipeline(tmp_path / "hub" / "sd15")
  with pytest.raises(preflight.UserInputError, match=f"Did you mean {pipe}"):
    preflight.preflight(_sd15_config(str(tmp_path / "hub"), parquet_dir))
  with pytest.raises(preflight.UserInputError, match="one component of a pipeline"):
    preflight.preflight(_sd15_config(os.path.join(pipe, "unet"), parquet_dir))
  os.remove(os.path.join(pipe, "unet", "config.json"))
  with pytest.raises(preflight.UserInputError, match="no unet/config.json"):
    preflight.preflight(_sd15_config(pipe, parquet_dir))


def test_data_inputs(tmp_path, parquet_dir):
  pipe = _fake_pipeline(tmp_path / "sd15")
  # The hub's pickapic_v2 layout: shards under data/.
  with pytest.raises(preflight.UserInputError, match=f"Did you mean {parquet_dir}"):
    preflight.preflight(_sd15_config(pipe, os.path.dirname(parquet_dir)))
  with pytest.raises(preflight.UserInputError, match="config.data.path=/no/such: no such folder"):
    preflight.preflight(_sd15_config(pipe, "/no/such"))
  c = tiny.get_config()
  c.unlock()
  c.data.source, c.data.cache_dir = "cache", str(tmp_path)
  with pytest.raises(preflight.UserInputError, match="no meta.json.*python -m dpo_jax.data.cache"):
    preflight.preflight(c)
  (tmp_path / "meta.npz").write_bytes(b"")  # A cache of an older dpo_jax.
  with pytest.raises(preflight.UserInputError, match="older dpo_jax.*rewrite it"):
    preflight.preflight(c)
  c.data.source = "pickapik"
  with pytest.raises(preflight.UserInputError, match="did you mean 'pickapic'"):
    preflight.preflight(c)
  c.data.source = "synthetic"
  preflight.preflight(c)  # configs/tiny.py as it is needs no input.


def test_closest_fields():
  fields = preflight.config_fields(tiny.get_config())
  assert "optim.lr" in fields and "optim" in fields
  assert preflight.closest_fields("seeds", fields) == ["seed", "sample_eval.seed"]
  assert preflight.closest_fields("mesh.fspd", fields) == ["mesh.fsdp"]
  assert preflight.closest_fields("qqq", fields) == []


def test_preflight_knows_the_cache_layout():
  from dpo_jax.data import cache

  assert preflight.CACHE_META == cache.META


def test_quiet_libraries_filters_orbax_info_once_per_process():
  import logging as std_logging

  from absl import logging as absl_logging

  from dpo_jax import logs

  handler = absl_logging.get_absl_handler()
  saved = list(handler.filters)
  try:
    for _ in range(3):  # Each in-process CLI main() calls it.
      logs.quiet_libraries()
    quiet = [f for f in handler.filters if isinstance(f, logs._QuietLibraries)]
    assert len(quiet) == 1, handler.filters

    def record(level, path):
      return std_logging.LogRecord("x", level, path, 1, "msg", None, None)

    assert not quiet[0].filter(record(std_logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
    assert quiet[0].filter(record(std_logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))
    assert quiet[0].filter(record(std_logging.INFO, "/repo/dpo_jax/trainer.py"))
  finally:
    handler.filters[:] = saved
