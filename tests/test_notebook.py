"""notebooks/sample.ipynb end to end: executed headless on a tiny SD1.5 run's checkpoint.

The parameters cell (tagged `parameters`) is replaced by this test's values,
as papermill would inject them, and the notebook runs in a fresh python3
kernel on one CPU device.
"""

import os

import nbformat
import numpy as np
from nbclient import NotebookClient
from PIL import Image

from dpo_jax import trainer
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline
from tests.fixtures import REPO, good_rows, write_parquet

NOTEBOOK = os.path.join(REPO, "notebooks", "sample.ipynb")
PARAMETERS = ("CHECKPOINT", "PIPELINE", "PROMPTS", "SEEDS", "GUIDANCE_SCALE", "STEPS", "OUTPUT")


def _train_one_step(root) -> str:
  """Workdir of a 1-step SFT run on a tiny SD1.5 pipeline (SFT: no reference, quicker compile)."""
  from configs import sd15

  pipe = make_tiny_pipeline("sd15", str(root / "pipe"), seed=0)
  parquet = root / "parquet"
  parquet.mkdir()
  write_parquet(str(parquet / "train-00000-of-00001.parquet"), good_rows(8)[0])
  c = sd15.get_config()
  c.unlock()
  c.objective = "sft"
  c.pretrained_path = pipe
  c.data.path = str(parquet)
  c.data.resolution = 32  # Tiny VAE: 32 px images <-> 16 x 16 latents.
  c.data.global_batch_size = 8
  c.data.eval_batch_size = 8
  c.data.num_threads = 1
  c.optim.grad_accum = 1
  c.optim.warmup_frac = 0.0
  c.optim.lr = 1e-3  # One step that visibly changes the samples.
  c.max_steps = c.checkpoint_every = c.log_every = 1
  c.eval_every = 0
  c.precision.compute_dtype = c.precision.ref_dtype = "float32"
  c.mesh.data, c.mesh.fsdp = 8, 1
  workdir = str(root / "run")
  trainer.train_and_evaluate(c, workdir)
  return workdir


def test_notebook_is_stored_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs == [] and c.execution_count is None for c in code)
  tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  assert all(f"{name} = " in tagged[0].source for name in PARAMETERS)


def test_notebook_samples_base_vs_aligned_grid(tmp_path, monkeypatch):
  workdir = _train_one_step(tmp_path)
  out = tmp_path / "samples"
  prompts, seeds = ["a red cat", "a blue dog on the moon"], [0, 1, 2]
  nb = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  # PIPELINE "" exercises the default: the run's pretrained_path from the checkpoint.
  cell.source = "\n".join(
    [
      f"CHECKPOINT = {workdir!r}",
      'PIPELINE = ""',
      f"PROMPTS = {prompts!r}",
      f"SEEDS = {seeds!r}",
      "GUIDANCE_SCALE = 3.0",
      "STEPS = 2",
      f"OUTPUT = {str(out)!r}",
    ]
  )
  # The kernel inherits this environment: one CPU device, this checkout, no network.
  for key, value in {
    "XLA_FLAGS": "",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO,
    "HF_HUB_OFFLINE": "1",
  }.items():
    monkeypatch.setenv(key, value)
  client = NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # Raises CellExecutionError, with the traceback, if any cell fails.

  install = [c for c in nb.cells if c.get("id") == "install"][0]
  assert install.outputs == []  # Not Colab: nothing installed, nothing printed.
  grid = np.asarray(Image.open(out / "base_vs_aligned.png"))
  # Rows: prompts; columns: 3 base then 3 aligned images of 32 px, 1 px white gutters.
  assert grid.shape == (len(prompts) * 34, 2 * len(seeds) * 34, 3) and grid.dtype == np.uint8
  tiles = grid.reshape(len(prompts), 34, 2 * len(seeds), 34, 3)[:, 1:-1, :, 1:-1]
  assert (tiles != 255).any(axis=(1, 3, 4)).all()  # Every tile holds an image.
  # The right half is the trained UNet, not the base sampled twice (sampling is deterministic).
  base, aligned = tiles[:, :, : len(seeds)], tiles[:, :, len(seeds) :]
  assert np.abs(base.astype(int) - aligned.astype(int)).max() > 0
  (grid_cell,) = [c for c in nb.cells if c.get("id") == "grid"]
  assert any("image/png" in o.get("data", {}) for o in grid_cell.outputs)  # Displayed inline.
  printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert f"Saved {out / 'base_vs_aligned.png'}" in printed and "at step 1" in printed
