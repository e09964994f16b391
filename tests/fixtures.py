"""Helpers shared by several test modules (not a test module itself).

- Pick-a-Pic-format parquet rows with real encoded images (`good_rows`,
  `write_parquet`): winners are red, losers blue or grey.
- The tiny training config of the end-to-end runs (`make_train_config`).
- Launchers for 2-process jax.distributed runs: `tests/multihost_worker.py`,
  or the training CLI through launch/multinode.sh.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import json
import logging
import os
import subprocess
import sys
import warnings

import portpicker
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTIHOST_WORKER = os.path.join(REPO, "tests", "multihost_worker.py")

RED, BLUE = (230, 20, 20), (20, 20, 230)


def encode_image(img: Image.Image, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, quality=95) if fmt == "JPEG" else img.save(buf, fmt)
  return buf.getvalue()


def jpeg(color, w=24, h=20) -> bytes:
  return encode_image(Image.new("RGB", (w, h), color))


def pickapic_row(rid, caption, jpg_0, jpg_1, label_0, label_1):
  """One row with every Pick-a-Pic column."""
  return dict(
    caption=caption,
    jpg_0=jpg_0,
    jpg_1=jpg_1,
    label_0=label_0,
    label_1=label_1,
    model_0="sd15",
    model_1="sdxl",
    image_0_uid=f"u{rid}a",
    image_1_uid=f"u{rid}b",
    best_image_uid=None,
    ranking_id=rid,
    user_id=7,
    has_label=True,
    are_different=jpg_0 != jpg_1,
    created_at=datetime.datetime(2023, 5, 1, 12, 0, rid % 60),
  )


def good_rows(n: int, first_id: int = 1000):
  """-> (rows, {id: winner (h, w)}). Winner alternates between jpg_0 and jpg_1."""
  rows, sizes = [], {}
  for i in range(n):
    w, h = 24 + 8 * (i % 3), 20 + 4 * (i % 4)
    win, lose = jpeg(RED, w, h), jpeg(BLUE, w, h)
    if i == 3:  # CMYK JPEG winner.
      win = encode_image(Image.new("RGB", (w, h), RED).convert("CMYK"))
    if i == 4:  # Palette PNG loser.
      lose = encode_image(Image.new("RGB", (w, h), BLUE).convert("P"), "PNG")
    if i == 5:  # Grey + alpha PNG loser.
      lose = encode_image(Image.new("LA", (w, h), (60, 255)), "PNG")
    if i == 6:  # Opaque RGBA PNG loser of another size.
      lose = encode_image(Image.new("RGBA", (w + 10, h + 6), BLUE + (255,)), "PNG")
    rid = first_id + i
    sizes[rid] = (h, w)
    pair = (win, lose, 1.0, 0.0) if i % 2 == 0 else (lose, win, 0.0, 1.0)
    rows.append(pickapic_row(rid, f"a red thing number {i}", *pair))
  return rows, sizes


def write_parquet(path: str, rows, drop: tuple[str, ...] = (), rename: dict | None = None) -> None:
  table = pa.Table.from_pylist(rows)
  table = table.drop_columns(list(drop))
  if rename:
    table = table.rename_columns([rename.get(c, c) for c in table.column_names])
  pq.write_table(table, path)


def write_pickapic_splits(folder, train_pairs: int, eval_pairs: int = 8) -> str:
  """`folder` (created) with Pick-a-Pic train and validation_unique parquet shards of good rows.

  Train ids start at 1000, validation ids at 5000 (disjoint). Returns the folder as a str.
  """
  os.makedirs(folder)
  write_parquet(os.path.join(folder, "train-00000-of-00001.parquet"), good_rows(train_pairs)[0])
  write_parquet(
    os.path.join(folder, "validation_unique-00000-of-00001.parquet"),
    good_rows(eval_pairs, first_id=5000)[0],
  )
  return str(folder)


# Small enough to compile in seconds, big enough to shard: 48 examples / 8 per
# batch = 6 batches per epoch, so an 8-step run crosses an epoch boundary.
TRAIN_OVERRIDES = {
  "model.sample_size": 8,
  "max_steps": 8,
  "checkpoint_every": 2,
  "keep_checkpoints": 3,
  "data.num_examples": 48,
  "data.eval_batch_size": 8,
  "fsdp_min_size": 0,
}


def make_train_config(**extra):
  """configs/tiny.py with `TRAIN_OVERRIDES`, then `extra` (dotted keys)."""
  from configs import tiny

  c = tiny.get_config()
  c.unlock()
  return _override(c, {**TRAIN_OVERRIDES, **extra})


def _override(c, values):
  """Sets dotted keys ("data.path") of an unlocked ConfigDict; -> c."""
  for key, value in values.items():
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def train_cli(workdir: str, devices: int, **extra) -> tuple[list[str], dict[str, str]]:
  """Command line and environment of a `python -m dpo_jax.train` subprocess.

  The config is configs/tiny.py with `TRAIN_OVERRIDES` and `extra` as
  `--config.*` flags (the same config as `make_train_config(**extra)`), on
  `devices` forced CPU devices.
  """
  config = os.path.join(REPO, "configs", "tiny.py")
  args = [sys.executable, "-m", "dpo_jax.train", f"--config={config}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in {**TRAIN_OVERRIDES, **extra}.items()]
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return args, env


def _run_pair(command, timeout: float, while_running=None) -> list[str]:
  """Runs command(pid, port) -> (args, env) for pids 0 and 1; -> their outputs.

  `while_running(procs)`, if given, is called once both have started (e.g. to
  signal them). Fails the test unless both exit 0; after a timeout no process
  is left waiting on its peer.
  """
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(2):
    args, env = command(pid, port)
    procs.append(
      subprocess.Popen(
        args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  outs = None
  try:
    if while_running is not None:
      while_running(procs)
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    if outs is None:  # Failed or timed out: the test's report shows what each printed.
      for pid, p in enumerate(procs):
        print(f"--- process {pid}, exit {p.returncode} ---\n{p.communicate()[0][-6000:]}")
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  return outs


def slow_compile_env(env: dict[str, str], seconds: float) -> dict[str, str]:
  """`env` whose process returns from its first ahead-of-time compile `seconds`
  late (tests/slow_compile), as a host that compiles slower than its peers."""
  hook = os.path.join(REPO, "tests", "slow_compile")
  return dict(
    env,
    PYTHONPATH=hook + os.pathsep + env.get("PYTHONPATH", ""),
    DPO_JAX_TEST_SLOW_COMPILE_S=str(seconds),
  )


def run_two_processes(*worker_args: str, timeout: float, slow_compile_s: float = 0) -> list[str]:
  """Runs `tests/multihost_worker.py` as processes 0 and 1 of one jax.distributed job.

  Each process owns 4 CPU devices; gloo provides the collectives (see the
  worker). Returns each process's stdout and stderr, in process order.
  `slow_compile_s`: process 1 compiles that much slower (`slow_compile_env`).
  """
  env = dict(os.environ, PYTHONPATH=REPO)

  def command(pid, port):
    run_env = slow_compile_env(env, slow_compile_s) if pid == 1 and slow_compile_s else env
    return [sys.executable, MULTIHOST_WORKER, str(pid), str(port), *worker_args], run_env

  return _run_pair(command, timeout)


def run_train_cli_two_processes(
  workdir: str, timeout: float, while_running=None, slow_compile_s: float = 0, **extra
) -> list[str]:
  """`train_cli` as processes 0 and 1 of one job (4 CPU devices each), started through
  launch/multinode.sh as a user would; -> each process's output.

  `slow_compile_s`: process 1 compiles the train step that much slower
  (`slow_compile_env`).
  """

  def command(pid, port):
    args, env = train_cli(workdir, devices=4, **extra)
    if pid == 1 and slow_compile_s:
      env = slow_compile_env(env, slow_compile_s)
    assert args[1:3] == ["-m", "dpo_jax.train"]
    script = os.path.join(REPO, "launch", "multinode.sh")
    env.update(COORDINATOR=f"127.0.0.1:{port}", NUM_NODES="2", NODE_RANK=str(pid))
    env["JAX_PLATFORMS"] = "cpu"  # -> gloo collectives (dpo_jax.distributed).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return ["bash", script, *args[3:]], env

  return _run_pair(command, timeout, while_running)


def read_jsonl(workdir: str) -> dict:
  """{step: row} of the `train/*` rows of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows if "train/loss" in r}


def load_params(workdir: str, step: int):
  """A checkpoint's UNet params as numpy, whatever mesh or process count saved them."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  # Restore onto one local device whatever topology saved it (e.g. 2 processes).
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
    ckptr.metadata(path).item_metadata,
  )
  restored = ckptr.restore(path, abstract)
  return jax.tree.map(np.asarray, restored["train_state"]["params"])


def tiny_pipeline_train_config(kind: str, pipeline_dir: str, parquet_dir: str, **extra):
  """configs/sd15.py or sdxl.py sized for a tiny pipeline (32 px, float32); `extra` overrides."""
  from configs import sd15, sdxl

  c = (sd15 if kind == "sd15" else sdxl).get_config()
  c.unlock()
  c.pretrained_path = pipeline_dir
  c.data.path = parquet_dir
  c.data.resolution = 32  # Tiny VAE: 32 px -> 16 x 16 latents.
  c.data.global_batch_size = 16
  c.data.eval_batch_size = 8
  c.data.num_threads = 2
  c.optim.grad_accum = 2
  c.optim.lr = 1e-4
  c.max_steps = 3
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 3
  # float32 compute and reference so that step 1 is exactly log 2.
  c.precision.compute_dtype = "float32"
  c.precision.ref_dtype = "float32"
  c.mesh.data = 2 if kind == "sdxl" else 8
  c.mesh.fsdp = 4 if kind == "sdxl" else 1
  c.fsdp_min_size = 0
  return _override(c, extra)


def torch_unet_inputs(kind: str, cross_attention_dim: int):
  """Seeded PyTorch UNet inputs (x, t, context, added or None) for the tiny pipelines."""
  import torch

  torch.manual_seed(0)
  x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
  context = torch.randn(2, 77, cross_attention_dim)
  added = None
  if kind == "sdxl":
    added = {
      "text_embeds": torch.randn(2, 48),
      "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32], [64.0, 48, 4, 8, 32, 32]]),
    }
  return x, t, context, added


@contextlib.contextmanager
def fake_gcs():
  """`gs://` paths through etils.epath land in an in-memory filesystem (a fake bucket).

  epath sends gs:// to TensorFlow's GCS client when TF is installed; here it
  takes its fsspec backend instead, with fsspec's "gs"/"gcs" protocols bound
  to a MemoryFileSystem. Yields that filesystem (its `store` maps paths to
  files), emptied on exit. orbax's arrays go through TensorStore's own GCS
  client, which this does not fake: whole runs use `gcs_emulator`.
  """
  import fsspec
  from etils.epath import backend as epath_backend
  from etils.epath import gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}  # noqa: RUF012 - one store per fake bucket.
    pseudo_dirs = [""]  # noqa: RUF012

  registry = importlib.import_module("fsspec.registry")._registry
  saved = {name: registry.get(name) for name in ("gs", "gcs")}
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  # epath caches one filesystem per protocol: drop any from before the fake.
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  tf_installed = gpath._is_tf_installed
  gpath._is_tf_installed = lambda: False
  try:
    yield FakeGCS()
  finally:
    gpath._is_tf_installed = tf_installed
    for name, cls in saved.items():
      registry.pop(name, None)
      if cls is not None:
        registry[name] = cls
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()


@contextlib.contextmanager
def gcs_emulator(bucket: str = "bucket"):
  """A local GCS server behind every gs:// client of a training run; -> its gcsfs filesystem.

  gcp-storage-emulator (pure Python, in memory) serves the GCS JSON API on a
  free port, with `bucket` created. Each client is pointed at it the way it
  documents:
  - etils.epath (our files, orbax's directories and metadata): its fsspec
    backend (`EPATH_USE_TF=false`, else gs:// goes to TensorFlow's GCS
    client, which has no endpoint setting), i.e. gcsfs at the emulator's URL;
  - TensorStore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL`; without
    credentials it sends anonymous requests.
  Nothing else reaches the network: TensorBoard events go through epath too
  (`metrics.EventFileWriter`).
  """
  import fsspec
  import gcsfs.core
  from etils.epath import backend as epath_backend
  from etils.epath import gpath
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.server import create_server

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    # Real GCS names an object's generation in a download's `x-goog-generation`
    # header; TensorStore's OCDBT reads it there ("Malformed StorageGeneration"
    # without it), and the emulator leaves it out.
    download(request, response, storage, *args, **kwargs)
    if response.status == 200:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  # Every probe for an absent object (orbax, TensorStore) is an ERROR line there.
  emulator_log = logging.getLogger("gcp_storage_emulator")
  log_level = emulator_log.level
  emulator_log.setLevel(logging.CRITICAL)
  port = portpicker.pick_unused_port()
  server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
  server.start()
  url = f"http://localhost:{port}"

  class EmulatedGCS(gcsfs.core.GCSFileSystem):
    # The plain client: gcsfs's default subclass first asks a gRPC control
    # API (which the emulator lacks) for the bucket type, with a 60 s timeout.
    # No listings cache: TensorStore writes objects that gcsfs does not see.
    def __init__(self, *args, **kwargs):
      kwargs.update(token="anon", endpoint_url=url, use_listings_cache=False)
      super().__init__(*args, **kwargs)

  env = {"EPATH_USE_TF": "false", "TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url}
  saved_env = {k: os.environ.get(k) for k in env}
  registry = importlib.import_module("fsspec.registry")._registry
  saved = {name: registry.get(name) for name in ("gs", "gcs")}
  os.environ.update(env)
  objects.download = download_with_generation  # What objects.get (alt=media) calls.
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, EmulatedGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  # etils decides "TensorFlow or fsspec" once per process (a cached function): an
  # earlier test in this worker may already have decided for TensorFlow.
  gpath._is_tf_installed.cache_clear()
  try:
    yield EmulatedGCS()
  finally:
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    for name, cls in saved.items():
      registry.pop(name, None)
      if cls is not None:
        registry[name] = cls
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    gpath._is_tf_installed.cache_clear()
    EmulatedGCS.clear_instance_cache()
    objects.download = download
    server.stop()
    emulator_log.setLevel(log_level)


def run_sample_cli(*args: str) -> None:
  """`python -m dpo_jax.sample ARGS`, in this process (`sample.cli_main` on parsed absl flags).

  A subprocess would spend ~30 s importing diffusers on this machine.
  """
  from absl import flags

  from dpo_jax import sample

  if "prompts" not in flags.FLAGS:
    sample._define_flags()
  flags.FLAGS.unparse_flags()
  # Parsing the global flags applies absl's --verbosity (default: WARNING) to
  # the "absl" logger; later tests in this process must still see INFO records.
  absl_level = logging.getLogger("absl").level
  try:
    sample.cli_main(flags.FLAGS(["sample", *args]))
  finally:
    flags.FLAGS.unparse_flags()
    logging.getLogger("absl").setLevel(absl_level)


class _WarningRecords(logging.Handler):
  """Collects the messages of WARNING and above logged to the loggers it is added to."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def library_warnings(names=("diffusers", "peft", "transformers")):
  """Yields a list that receives every warning the named libraries log or warn.

  Independent of process-wide logging state: an in-process CLI main() before
  (`logs.quiet_libraries` sets diffusers to ERROR) or a disabled logger would
  otherwise hide the very warnings a test looks for. Levels, `disabled` flags
  and warning filters are restored on exit.
  """
  handler = _WarningRecords()
  roots = [logging.getLogger(n) for n in names]
  # Their existing descendants too: a module logger's own level or `disabled`
  # flag would stop a record before it reaches the handler on the root.
  children = [
    lg
    for n, lg in logging.root.manager.loggerDict.items()
    if isinstance(lg, logging.Logger) and any(n.startswith(r + ".") for r in names)
  ]
  saved = [(lg, lg.level, lg.disabled) for lg in roots + children]
  messages: list[str] = []
  for lg in roots + children:
    lg.setLevel(logging.WARNING if lg in roots else logging.NOTSET)
    lg.disabled = False
  for lg in roots:
    lg.addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      yield messages
  finally:
    for lg in roots:
      lg.removeHandler(handler)
    for lg, level, disabled in saved:
      lg.setLevel(level)
      lg.disabled = disabled
    messages.extend(handler.messages + [str(w.message) for w in caught])
