"""One process of a 2-process CPU run.

  python tests/multihost_worker.py PID PORT pickapic DATA_DIR B N   # read N batches
  python tests/multihost_worker.py PID PORT sample PIPELINE_DIR OUT  # sample on a 2x4 mesh

Each process owns 4 CPU devices; gloo provides the cross-process collectives.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def read_pickapic_epoch(data_dir: str, global_batch: int, num_batches: int) -> None:
  """Prints this process's example ids per batch; sharding comes from jax itself."""
  import json

  from dpo_jax.data import pipeline

  it = pipeline.make_pickapic_iterator(
    data_dir, "train", global_batch_size=global_batch, resolution=8, seed=0, num_threads=2
  )
  ids = [[int(i) for i in next(it)["example_id"]] for _ in range(num_batches)]
  it.close()
  print("IDS", json.dumps({"process": jax.process_index(), "ids": ids}), flush=True)


# The sampling job of `sample` mode; tests/test_sample_eval.py repeats it on one process.
SAMPLE_PROMPTS = ["a red cube", "two blue spheres", "", "a cat on a mat", "a green cone"]
SAMPLE_SEEDS = [3, 1, 4, 1, 5]
SAMPLE_SETTINGS = dict(num_inference_steps=3, guidance_scale=3.0, batch_size=8, scheduler="dpmpp")


def sample_on_global_mesh(pipeline_dir: str, out: str) -> None:
  """Samples with FSDP-sharded UNet params over both processes' devices; saves the images."""
  import numpy as np

  from dpo_jax import sample, sharding
  from dpo_jax.models import loader

  pipe = loader.load_pipeline(pipeline_dir)
  mesh = sharding.make_mesh(2, 4)
  shardings = sharding.tree_shardings(pipe.unet_params, mesh, [(".*", "fsdp")], min_size=64)
  params = jax.device_put(pipe.unet_params, shardings)
  assert not all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  settings = sample.SampleSettings(**SAMPLE_SETTINGS)
  fn = sample.make_sample_fn(
    pipe, settings, "float", mesh=mesh, unet_sharding=sample.unet_shardings(params, mesh)
  )
  images = sample.generate(
    pipe, params, SAMPLE_PROMPTS, SAMPLE_SEEDS, settings, mesh=mesh, sample_fn=fn
  )
  np.save(f"{out}.{jax.process_index()}.npy", images)


def main() -> None:
  pid, port = int(sys.argv[1]), sys.argv[2]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if sys.argv[3] == "pickapic":
    read_pickapic_epoch(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    return
  if sys.argv[3] == "sample":
    sample_on_global_mesh(sys.argv[4], sys.argv[5])
    return
  raise SystemExit(f"Unknown mode {sys.argv[3]!r}; expected pickapic or sample.")


if __name__ == "__main__":
  main()
