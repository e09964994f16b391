"""`dpo_jax.export`: trained tiny SD1.5 / SDXL UNets -> PyTorch diffusers folders and back.

A 3-step DPO run of the real trainer on each tiny pipeline (SD1.5 on 8 data
devices, SDXL FSDP-sharded over 2 x 4), from Pick-a-Pic parquet, gives a
checkpoint whose UNet differs from the base; the runs themselves are checked
first (#5: a few DPO steps end to end). The export must then load in PyTorch
diffusers with no missing or unexpected key, compute what the Flax UNet
computes, and load back into dpo_jax bit for bit.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is local.

import dataclasses  # noqa: E402
import filecmp  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402

from dpo_jax import checkpoint, export, trainer  # noqa: E402
from dpo_jax import step as step_lib  # noqa: E402
from dpo_jax.data import sources  # noqa: E402
from dpo_jax.models import loader  # noqa: E402
from dpo_jax.models.unet import make_unet_apply  # noqa: E402
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline  # noqa: E402
from tests.fixtures import (  # noqa: E402
  REPO,
  library_warnings,
  tiny_pipeline_train_config,
  torch_unet_inputs,
  write_pickapic_splits,
)

# float32 PyTorch vs XLA on the same weights: differences are summation order.
TOL = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _train(kind: str, root) -> tuple[str, str, dict]:
  """(base pipeline dir, workdir, result) of a 3-step DPO run on a tiny `kind` pipeline."""
  pipe = make_tiny_pipeline(kind, str(root / "pipe"), seed=0 if kind == "sd15" else 1)
  # The eval loss reads only the held-out split (validation_unique).
  parquet = write_pickapic_splits(root / "parquet", 20)
  workdir = str(root / "run")
  rows_per_encode: list[int] = []
  make_data = sources.make_data

  def counting_make_data(*args, **kwargs):
    # Records, at run time, how many pairs each call of the frozen encoders sees.
    data = make_data(*args, **kwargs)
    encoder = data.encoder

    def counted(frozen, raw):
      jax.debug.callback(lambda n: rows_per_encode.append(int(n)), raw["pixels_w"].shape[0])
      return encoder(frozen, raw)

    return dataclasses.replace(data, encoder=counted)

  sources.make_data = counting_make_data
  try:
    config = tiny_pipeline_train_config(kind, pipe, str(parquet))
    result = trainer.train_and_evaluate(config, workdir)
  finally:
    sources.make_data = make_data
  result["rows_per_encode"] = rows_per_encode
  return pipe, workdir, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{kind: (base dir, workdir, checkpoint params, meta, full float32 export dir, result)}."""
  out = {}
  for kind in ("sd15", "sdxl"):
    root = tmp_path_factory.mktemp(kind)
    pipe, workdir, result = _train(kind, root)
    params, meta = checkpoint.load_params_for_inference(workdir)
    exported = export.export(workdir, str(root / "export"))
    out[kind] = (pipe, workdir, params, meta, exported, result)
  return out


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_dpo_steps_on_tiny_pipeline(kind, runs):
  _, workdir, _, meta, _, result = runs[kind]
  losses = [h["loss"] for h in result["history"]]
  assert len(losses) == 3 and all(np.isfinite(losses))
  # Step 1: policy == reference -> log 2. float32 compute traces the policy
  # and reference forwards separately (precision.reference_forward "auto"),
  # which differ by rounding (logits ~1e-3 here with chunked attention), so
  # log 2 up to that, within what `check_reference_match` accepts.
  assert abs(result["history"][0]["max_abs_logit"]) < step_lib.REFERENCE_MATCH_TOL
  assert losses[0] == pytest.approx(np.log(2.0), abs=step_lib.REFERENCE_MATCH_TOL)
  assert result["history"][-1]["grad_norm"] > 0
  assert np.isfinite(result["eval"]["loss"])
  report = json.load(open(os.path.join(workdir, "data_report.json")))
  assert report["splits"]["train"]["kept"] == 20
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"] and meta["step"] == 3
  # 16 pairs per step in 2 micro-batches: the VAE and text encoders run on 8
  # pairs at a time (3 steps x 2, plus the 8-pair eval batch), never on 16.
  assert result["rows_per_encode"] == [8] * 7


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree)


# What diffusers / transformers log for a partial or mismatched load.
BAD_LOAD = ("missing", "unexpected", "not used", "newly initialized", "not initialized")


def _bad_load_messages(messages: list[str]) -> list[str]:
  return [m for m in messages if any(b in m.lower() for b in BAD_LOAD)]


def _load_pipeline_logged(cls, path):
  """Loads a PyTorch pipeline; returns (pipeline, warnings logged by diffusers/transformers)."""
  with library_warnings(("diffusers", "transformers")) as messages:
    pipe = cls.from_pretrained(path)
  return pipe, messages


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_pytorch_loads_export_and_matches_flax(kind, runs):
  import diffusers

  base, _, params, _, exported, _ = runs[kind]
  unet, info = diffusers.UNet2DConditionModel.from_pretrained(
    os.path.join(exported, "unet"), output_loading_info=True
  )
  assert info == {
    "missing_keys": [],
    "unexpected_keys": [],
    "mismatched_keys": [],
    "error_msgs": [],
  }
  # Exactly the key set of the model diffusers builds from the config.
  with safetensors.safe_open(os.path.join(exported, "unet", WEIGHTS), "numpy") as f:
    assert set(f.keys()) == set(unet.state_dict()) and f.metadata() == {"format": "pt"}
  cls = diffusers.StableDiffusionPipeline if kind == "sd15" else diffusers.StableDiffusionXLPipeline
  pipe, messages = _load_pipeline_logged(cls, exported)
  assert not _bad_load_messages(messages), messages
  for name, value in pipe.unet.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), unet.state_dict()[name].numpy(), err_msg=name)

  x, t, context, added = torch_unet_inputs(kind, pipe.unet.config.cross_attention_dim)
  with torch.no_grad():
    want = pipe.unet(x, t, context, added_cond_kwargs=added).sample.numpy()
  flax_unet, _ = loader.load_unet(os.path.join(base, "unet"))
  got = jax.jit(make_unet_apply(flax_unet))(
    params,
    jnp.asarray(x.numpy()),
    jnp.asarray(t.numpy()),
    jnp.asarray(context.numpy()),
    None if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()},
  )
  diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  print(f"{kind}: PyTorch(export) vs Flax(checkpoint) UNet max abs diff {diff:.2e}")
  assert diff <= TOL


def test_log_capture_sees_key_warnings(runs, tmp_path):
  """The no-warning check above is live: a broken copy of the export trips it."""
  import diffusers

  broken = tmp_path / "broken"
  shutil.copytree(runs["sd15"][4], broken)
  path = str(broken / "unet" / WEIGHTS)
  state = safetensors.numpy.load_file(path)
  state["extra.weight"] = state.pop("conv_in.bias")
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
  _, messages = _load_pipeline_logged(diffusers.StableDiffusionPipeline, str(broken))
  found = " ".join(_bad_load_messages(messages))
  assert "conv_in.bias" in found and "extra.weight" in found, messages


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_export_reloads_bit_identical_and_is_not_the_base(kind, runs):
  base, _, params, _, exported, _ = runs[kind]
  pipe = loader.load_pipeline(exported)
  got, want = _flat(pipe.unet_params), _flat(params)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg="/".join(k))
  # Training moved the UNet: an export of the base weights would fail here.
  _, base_params = loader.load_unet(os.path.join(base, "unet"))
  base_flat = _flat(base_params)
  changed = sum(not np.array_equal(np.asarray(want[k]), np.asarray(base_flat[k])) for k in want)
  assert changed > 0.9 * len(want), (changed, len(want))
  # Every other component is the base's, file for file.
  for name in ("vae", "text_encoder", "tokenizer", "scheduler") + (
    ("text_encoder_2", "tokenizer_2") if kind == "sdxl" else ()
  ):
    cmp = filecmp.dircmp(os.path.join(base, name), os.path.join(exported, name))
    assert cmp.left_only == cmp.right_only == cmp.diff_files == [] and cmp.common_files, name
  config = ("unet", "config.json")
  assert filecmp.cmp(os.path.join(base, *config), os.path.join(exported, *config), shallow=False)
  assert json.load(open(os.path.join(exported, "model_index.json"))) == json.load(
    open(os.path.join(base, "model_index.json"))
  )


def test_model_card(runs):
  base, workdir, _, meta, exported, _ = runs["sd15"]
  card = open(os.path.join(exported, "README.md")).read()
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  last_train = [r for r in rows if "train/loss" in r][-1]
  last_eval = [r for r in rows if "eval/loss" in r][-1]
  assert meta["step"] == 3 and "**3 steps**" in card and base in card
  assert f"| 3 | train/loss | {last_train['train/loss']:.6g} |" in card
  assert f"| 3 | eval/loss | {last_eval['eval/loss']:.6g} |" in card
  assert "StableDiffusionPipeline.from_pretrained" in card and '"beta": 5000.0' in card
  card_xl = open(os.path.join(runs["sdxl"][4], "README.md")).read()
  assert "StableDiffusionXLPipeline.from_pretrained" in card_xl and '"objective": "dpo"' in card_xl


def test_cli_float16_unet_only(runs, tmp_path):
  _, workdir, _, _, exported, _ = runs["sd15"]
  out = tmp_path / "fp16"
  cmd = [sys.executable, "-m", "dpo_jax.export", f"--checkpoint={workdir}", f"--output={out}"]
  cmd += ["--dtype=float16", "--unet_only"]  # --base: the run's pretrained_path.
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
  subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
  assert sorted(os.listdir(out)) == ["unet"]
  assert sorted(os.listdir(out / "unet")) == ["config.json", WEIGHTS]
  fp16 = safetensors.numpy.load_file(str(out / "unet" / WEIGHTS))
  fp32 = safetensors.numpy.load_file(os.path.join(exported, "unet", WEIGHTS))
  assert fp16.keys() == fp32.keys()
  for k in fp32:
    assert fp16[k].dtype == np.float16, k
    np.testing.assert_array_equal(fp16[k], fp32[k].astype(np.float16), err_msg=k)


def test_bfloat16_and_explicit_base(runs, tmp_path):
  base, workdir, _, _, exported, _ = runs["sd15"]
  out = export.export(workdir, str(tmp_path / "bf16"), base=base, dtype="bfloat16")
  with safetensors.safe_open(os.path.join(out, "unet", WEIGHTS), "numpy") as f:
    dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
  assert dtypes == {"BF16"}
  bf16 = safetensors.numpy.load_file(os.path.join(out, "unet", WEIGHTS))
  fp32 = safetensors.numpy.load_file(os.path.join(exported, "unet", WEIGHTS))
  for k in fp32:
    np.testing.assert_array_equal(bf16[k], fp32[k].astype(ml_dtypes.bfloat16), err_msg=k)


def test_flax_msgpack_base_gives_the_same_export(runs, tmp_path):
  """A base whose UNet is Flax msgpack: PyTorch keys from torch's model on the meta device."""
  base, workdir, _, _, exported, _ = runs["sdxl"]
  flax_base = tmp_path / "flax_base"
  shutil.copytree(base, flax_base)
  os.remove(flax_base / "unet" / WEIGHTS)
  _, base_params = loader.load_unet(os.path.join(base, "unet"))
  (flax_base / "unet" / "diffusion_flax_model.msgpack").write_bytes(
    flax.serialization.to_bytes(base_params)
  )
  assert export.pytorch_unet_shapes(str(flax_base / "unet")) == export.pytorch_unet_shapes(
    os.path.join(base, "unet")
  )
  out = export.export(workdir, str(tmp_path / "out"), base=str(flax_base), unet_only=True)
  got = safetensors.numpy.load_file(os.path.join(out, "unet", WEIGHTS))
  want = safetensors.numpy.load_file(os.path.join(exported, "unet", WEIGHTS))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_errors_name_the_path(runs, tmp_path):
  sd15_base, workdir, _, _, _, _ = runs["sd15"]
  sdxl_base = runs["sdxl"][0]
  missing = tmp_path / "no_run"
  with pytest.raises(FileNotFoundError, match=f"No checkpoint at {missing}"):
    export.export(str(missing), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match=f"No base pipeline folder at {tmp_path}/nope"):
    export.export(workdir, str(tmp_path / "b"), base=str(tmp_path / "nope"))
  no_weights = tmp_path / "no_weights"
  shutil.copytree(sd15_base, no_weights)
  os.remove(no_weights / "unet" / WEIGHTS)
  with pytest.raises(FileNotFoundError, match=f"No weights in {no_weights}/unet"):
    export.export(workdir, str(tmp_path / "c"), base=str(no_weights))
  # A base of another architecture is refused, not half converted.
  with pytest.raises(ValueError, match="lacks|does not use|shape"):
    export.export(workdir, str(tmp_path / "d"), base=sdxl_base, unet_only=True)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(FileExistsError, match=f"{tmp_path}/full is not empty"):
    export.export(workdir, str(tmp_path / "full"))
