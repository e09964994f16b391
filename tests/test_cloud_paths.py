"""gs:// workdirs: metrics, config, checkpoints, TensorBoard events and reports go to
the bucket, never to a local "gs:" folder.

Two kinds of bucket: an fsspec in-memory fake (`memory_gcs`) for etils.epath I/O
alone, and a local GCS server (`tests.fixtures.gcs_emulator`) that every client
of a training run reaches: gcsfs (epath, orbax's files) and TensorStore (orbax's
arrays). A test that writes to either leaves the local disk untouched or fails.
"""

import glob
import io
import json
import os
import tempfile

import jax
import numpy as np
import pytest
from tensorboard.util import tensor_util

from dpo_jax import checkpoint, evaluate, export, metrics, trainer
from dpo_jax.data import pickapic
from tests.fixtures import gcs_emulator, good_rows, make_train_config, write_parquet


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  return tmp_path


def test_metrics_jsonl_on_gs_is_read_back_by_evaluate(in_tmp_cwd, memory_gcs):
  writer = metrics.JsonlWriter("gs://bucket/run/metrics.jsonl")
  writer.write_scalars(1, {"train/loss": np.float32(0.69), "train/lr": 0.0})
  writer.flush()
  writer.write_scalars(2, {"train/loss": 0.5, "eval/loss": float("nan")})
  writer.close()
  curves = evaluate.read_metrics_jsonl("gs://bucket/run")
  (key,) = memory_gcs.store  # The one file, in the bucket.
  assert key.endswith("bucket/run/metrics.jsonl")
  rows = [json.loads(x) for x in memory_gcs.store[key].getvalue().splitlines()]
  assert curves["train/loss"] == {1: pytest.approx(0.69), 2: 0.5}
  assert "eval/loss" not in curves and rows[1]["eval/loss"] == "nan"
  assert os.listdir(in_tmp_cwd) == []


def test_missing_gs_metrics_is_a_clear_error(in_tmp_cwd, memory_gcs):
  with pytest.raises(FileNotFoundError, match="gs://bucket/none/metrics.jsonl"):
    evaluate.read_metrics_jsonl("gs://bucket/none")
  assert os.listdir(in_tmp_cwd) == []


def test_jsonl_on_a_bucket_keeps_the_rows_of_an_earlier_run(in_tmp_cwd):
  """Object stores cannot append (gcsfs warns and truncates): a resumed run's writer
  keeps the rows the first run wrote."""
  with gcs_emulator() as fs:
    for steps in ((1, 2), (3,)):
      writer = metrics.JsonlWriter("gs://bucket/run/metrics.jsonl")
      for step in steps:
        writer.write_scalars(step, {"train/loss": 1.0 / step})
      writer.close()
    rows = [json.loads(x) for x in fs.cat("bucket/run/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert [r["train/loss"] for r in rows] == [1.0, 0.5, pytest.approx(1 / 3)]
  assert os.listdir(in_tmp_cwd) == []


def test_event_file_writer_is_read_back_by_tensorboard(tmp_path):
  """Scalars, images and hparams written without TensorFlow, as TensorBoard loads them."""
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import metadata as hp_metadata

  writer = metrics.EventFileWriter(str(tmp_path))
  writer.write_hparams({"beta": 500.0, "objective": "dpo", "optim.lr": 2e-4})
  writer.write_scalars(1, {"train/loss": np.float32(0.693), "train/lr": 0.0})
  writer.write_scalars(2, {"train/loss": 0.5})
  grid = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
  writer.write_images(2, {"sample_eval/grid": grid[None]})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  acc.Reload()
  value = lambda e: float(tensor_util.make_ndarray(e.tensor_proto))  # noqa: E731
  loss = {e.step: value(e) for e in acc.Tensors("train/loss")}
  assert loss == {1: pytest.approx(0.693), 2: 0.5}
  (image,) = acc.Tensors("sample_eval/grid")
  width, height, png = tensor_util.make_ndarray(image.tensor_proto)
  assert (int(width), int(height), image.step) == (10, 6, 2)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid)
  assert acc.SummaryMetadata("sample_eval/grid").plugin_data.plugin_name == "images"
  hparams = hp_metadata.parse_session_start_info_plugin_data(
    acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG).plugin_data.content
  ).hparams
  assert hparams["beta"].number_value == 500.0 and hparams["objective"].string_value == "dpo"


def test_tfds_dir_on_gs_is_refused_before_decoding(tmp_path, memory_gcs):
  """array_record files (TFDS's writer, grain's reader) need local file I/O: a gs://
  tfds_dir (the default under a gs:// workdir) is a one-line error, not a failure after
  decoding a whole split."""
  from dpo_jax.data import build

  write_parquet(str(tmp_path / "train-00000-of-00001.parquet"), good_rows(4)[0])
  with pytest.raises(ValueError, match=r"data.tfds_dir=gs://bucket/run/tfds .*local"):
    build.build_parallel(str(tmp_path), "gs://bucket/run/tfds", max_skip_rate=1.0)
  assert memory_gcs.store == {}


# A name found nowhere else: a local copy of the run would carry it.
RUN = "dpo-e2e-7f3a"


def _local_copies(roots) -> list[str]:
  """Paths under `roots` (4 levels deep) whose name contains RUN or is a "gs:" folder."""
  found = []
  for root in roots:
    for depth in range(5):
      for pattern in (f"*{RUN}*", "gs:"):
        found += glob.glob(os.path.join(root, *["*"] * depth, pattern))
  return found


def _synthetic_cache(root: str, config) -> np.ndarray:
  """The tiny config's synthetic pairs as a latent cache at `root` (the writer's shard code)."""
  from dpo_jax.data import synthetic
  from tests.test_array_iterator import _write_cache

  d, m = config.data, config.model
  arrays = synthetic.make_synthetic_pairs(
    num_examples=d.num_examples,
    num_prompts=d.num_prompts,
    latent_shape=(m.in_channels, m.sample_size, m.sample_size),
    seq_len=d.seq_len,
    context_dim=m.cross_attention_dim,
    seed=3,
  )
  uncond = {"context": np.zeros((d.seq_len, m.cross_attention_dim), np.float32)}
  _write_cache(root, arrays, shard_size=16, uncond=uncond)
  return arrays


def _tensorboard_scalars(fs, workdir: str, scratch) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of a run's event files, read back by TensorBoard's own loader."""
  from tensorboard.backend.event_processing import event_accumulator

  events = [f for f in fs.ls(workdir) if "tfevents" in f]
  assert events, fs.ls(workdir)
  out = {}
  for i, name in enumerate(events):
    local = scratch / str(i)
    local.mkdir()
    (local / os.path.basename(name)).write_bytes(fs.cat(name))
    acc = event_accumulator.EventAccumulator(str(local))
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
        continue  # The hparams summary.
      for ev in acc.Tensors(tag):
        out.setdefault(tag, {})[ev.step] = float(tensor_util.make_ndarray(ev.tensor_proto))
  return out


def test_training_run_on_gcs_leaves_nothing_local(tmp_path, monkeypatch):
  """A run whose workdir and latent cache are in a GCS bucket (a local emulator that
  gcsfs, TensorStore and so orbax all talk to): checkpoints, metrics, TensorBoard events
  and the data report land in the bucket; a rerun restores from it; evaluate and export
  read the metrics there; nothing is written to the cwd, $HOME or the temp folder."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  roots = [str(cwd), os.path.expanduser("~"), tempfile.gettempdir()]
  assert _local_copies(roots) == []
  workdir = f"gs://bucket/{RUN}"
  with gcs_emulator() as fs:
    config = make_train_config(
      **{"max_steps": 2, "checkpoint_every": 2, "log_every": 1, "data.source": "cache"}
    )
    config.data.cache_dir = f"gs://bucket/{RUN}-latents"
    _synthetic_cache(config.data.cache_dir, config)
    result = trainer.train_and_evaluate(config, workdir)
    history = result["history"]
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)

    objects = set(fs.find(f"bucket/{RUN}"))
    for name in ("config.json", "metrics.jsonl", "checkpoints/2/commit_success.txt"):
      assert f"bucket/{RUN}/{name}" in objects, sorted(objects)
    # orbax's arrays: TensorStore's OCDBT files, written through its own GCS client.
    assert any(o.startswith(f"bucket/{RUN}/checkpoints/2/state/d/") for o in objects)

    curves = evaluate.read_metrics_jsonl(workdir)
    for key in ("loss", "grad_norm", "implicit_acc"):
      assert curves[f"train/{key}"] == {h["step"]: pytest.approx(h[key], rel=1e-6) for h in history}
    assert curves["eval/loss"] == {2: pytest.approx(result["eval"]["loss"], rel=1e-6)}
    # TensorBoard: the same numbers, in event files TensorBoard's loader reads.
    scratch = tmp_path / "tb"
    scratch.mkdir()
    board = _tensorboard_scalars(fs, f"bucket/{RUN}", scratch)
    for key, steps in curves.items():
      finite = {s: v for s, v in board[key].items() if np.isfinite(v)}  # As in curves.
      assert finite == pytest.approx(steps, rel=1e-6), key

    # Export's view of the run: the newest step, its UNet and the model card's metrics.
    step_dir = checkpoint.resolve_step_dir(workdir)
    assert step_dir == f"{workdir}/checkpoints/2"
    params, meta = checkpoint.load_params_for_inference(step_dir)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(result["state"].params)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    card = export.model_card(
      meta, step_dir, "BASE", "sd15", "float32", export.final_metrics(step_dir, meta["step"])
    )
    assert f"| 2 | train/loss | {history[1]['loss']:.6g} |" in card
    assert f"| 2 | eval/loss | {result['eval']['loss']:.6g} |" in card

    # A rerun restores step 2 from the bucket and keeps every metric row.
    again = trainer.train_and_evaluate(config, workdir)
    assert again["history"] == [] and int(again["state"].step) == 2
    for got, want in zip(jax.tree.leaves(again["state"]), jax.tree.leaves(result["state"])):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert evaluate.read_metrics_jsonl(workdir) == curves

    # The data report goes through the same path code (tmp object + rename).
    report = {"splits": {"train": {"rows": 48, "skipped": 0}}}
    pickapic.write_data_report(report, f"{workdir}/data_report.json")
    assert pickapic.load_data_report(workdir) == report
    assert not [o for o in fs.find(f"bucket/{RUN}") if "tmp" in os.path.basename(o)]
  assert os.listdir(cwd) == []
  assert _local_copies(roots) == []
