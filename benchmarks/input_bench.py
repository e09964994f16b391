"""Decoded image pairs per second of the Pick-a-Pic input pipeline at 512 px.

Synthesises Pick-a-Pic-format parquet shards in a temp dir (JPEG pairs of
512-768 px a side with smooth content plus grain, so they compress like
photos rather than flat colour), builds the checked TFDS array_record set
(timed: rows/s of the build checks) and then times `PairBatchIterator`
(decode, resize, crop, flip, normalise, batch) after a warm-up batch, in wall
time and in process CPU time per pair (the per-core cost, robust to other
processes on shared cores). Also times `preprocess_pair` alone in one thread.

Then the parallel build (`dpo_jax.data.build`) of the same shard with 1 and 2
processes (`--build_processes`; plain processes given their index, as the
CLI's are by jax.distributed): rows/s of each process's share (its TFDS build,
without interpreter start-up), and the wall time of the whole build.

  python benchmarks/input_bench.py --out=benchmarks/results/input_bench.json
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import results_io  # noqa: E402
from dpo_jax.data import build, pickapic, pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILD_SHARE = (
  "import sys; from dpo_jax.data import build; a = sys.argv[1:]; "
  "build.build_parallel(a[0], a[1], int(a[2]), int(a[3]), num_workers=int(a[4]))"
)


def parallel_build(pq_dir: str, tfds_dir: str, processes: int, threads: int) -> dict:
  """Builds with `processes` processes at once; -> per-process rows/s and wall seconds."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _BUILD_SHARE, pq_dir, tfds_dir, str(p), str(processes), str(threads)],
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in range(processes)
  ]
  errors = [p.communicate()[1] for p in procs]
  wall = time.perf_counter() - t0
  for p, err in zip(procs, errors):
    if p.returncode:
      raise RuntimeError(f"Build process failed:\n{err[-3000:]}")
  root, _ = build.build_root(pq_dir, tfds_dir)
  report = pickapic.load_data_report(root)
  return {
    "processes": processes,
    "threads_per_process": threads,
    "rows": report["splits"]["train"]["rows"],
    "rows_per_s_per_process": report["build"]["rows_per_s"],
    "wall_s": wall,
    "rows_per_s_wall": report["splits"]["train"]["rows"] / wall,
  }


def synth_jpeg(rng: np.random.Generator, min_side: int, max_side: int) -> bytes:
  w, h = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
  # Low-frequency colour field (upsampled 6x6 noise) plus pixel grain.
  base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
    (w, h), Image.BICUBIC
  )
  arr = np.asarray(base, np.float32) + rng.normal(0, 6, (h, w, 3))
  img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=90)
  return buf.getvalue()


def write_shard(path: str, pairs: int, min_side: int, max_side: int, seed: int) -> float:
  """Writes one Pick-a-Pic-format shard; returns the mean JPEG size in KB."""
  rng = np.random.default_rng(seed)
  rows, sizes = [], []
  for i in range(pairs):
    a, b = synth_jpeg(rng, min_side, max_side), synth_jpeg(rng, min_side, max_side)
    sizes += [len(a), len(b)]
    label_0 = float(i % 2)
    rows.append(
      dict(
        caption=f"a synthetic photo number {i}",
        jpg_0=a,
        jpg_1=b,
        label_0=label_0,
        label_1=1.0 - label_0,
        model_0="m0",
        model_1="m1",
        image_0_uid=f"{i}a",
        image_1_uid=f"{i}b",
        best_image_uid=f"{i}a" if label_0 else f"{i}b",
        ranking_id=i,
        user_id=0,
        has_label=True,
        are_different=True,
        created_at="2023-05-01",
      )
    )
  pq.write_table(pa.Table.from_pylist(rows), path)
  return float(np.mean(sizes)) / 1024


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", type=int, default=96, help="Distinct pairs in the shard.")
  ap.add_argument("--resolution", type=int, default=512)
  ap.add_argument("--min_side", type=int, default=512)
  ap.add_argument("--max_side", type=int, default=768)
  ap.add_argument("--batch", type=int, default=8, help="Global (= local) batch size.")
  ap.add_argument("--batches", type=int, default=24, help="Timed batches after warm-up.")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  ap.add_argument(
    "--build_processes", default="1,2", help="Parallel builds to time (process counts)."
  )
  ap.add_argument("--out", default="benchmarks/results/input_bench.json")
  args = ap.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    pq_dir = os.path.join(tmp, "parquet")
    os.makedirs(pq_dir)
    t0 = time.perf_counter()
    kb = write_shard(
      os.path.join(pq_dir, "train-00000-of-00001.parquet"),
      args.pairs,
      args.min_side,
      args.max_side,
      seed=0,
    )
    synth_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    builder = pickapic.build_pickapic(pq_dir, os.path.join(tmp, "tfds"), num_workers=args.threads)
    build_s = time.perf_counter() - t0
    source = pickapic.open_split(builder.data_dir, "train")

    # One thread, no grain: the per-core cost of a pair.
    rng = np.random.default_rng(0)
    n_single = min(16, len(source))
    t0 = time.perf_counter()
    for i in range(n_single):
      ex = source[i]
      pipeline.preprocess_pair(ex["jpg_0"], ex["jpg_1"], rng, args.resolution)
    single_pairs_s = n_single / (time.perf_counter() - t0)

    it = pipeline.PairBatchIterator(
      source,
      global_batch_size=args.batch,
      resolution=args.resolution,
      seed=0,
      process_index=0,
      process_count=1,
      num_threads=args.threads,
    )
    next(it)  # Warm-up: thread start, first permutation.
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      batch = next(it)
    pipe_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    it.close()
    assert batch["pixels_w"].shape == (args.batch, args.resolution, args.resolution, 3)

    parallel = []
    for count in (int(c) for c in args.build_processes.split(",") if c):
      threads = max(1, args.threads // count)  # The same cores, split between processes.
      parallel.append(parallel_build(pq_dir, os.path.join(tmp, f"par{count}"), count, threads))

  pairs = args.batches * args.batch
  pairs_s = pairs / pipe_s
  # CPU time of all threads per pair: unlike wall time, barely moved by other
  # processes sharing the cores, and 1000 / it bounds pairs/s per core.
  cpu_ms = 1000 * cpu_s / pairs
  print(
    f"input pipeline: {pairs_s:.1f} decoded pairs/s at {args.resolution} px "
    f"({args.threads} threads, batch {args.batch}; {cpu_ms:.1f} CPU ms/pair); one thread, "
    f"no grain: {single_pairs_s:.1f} pairs/s"
  )
  print(
    f"build checks: {args.pairs / build_s:.1f} rows/s ({build_s:.2f} s for {args.pairs} rows; "
    f"mean JPEG {kb:.0f} KB, synthesis {synth_s:.1f} s)"
  )
  for r in parallel:
    per = ", ".join(f"{x:.1f}" for x in r["rows_per_s_per_process"])
    print(
      f"parallel build, {r['processes']} process(es) x {r['threads_per_process']} threads: "
      f"[{per}] rows/s per process; {r['rows_per_s_wall']:.1f} rows/s over "
      f"{r['wall_s']:.1f} s wall (with interpreter start-up)"
    )
  out = {
    "processor": platform.processor(),
    "threads": args.threads,
    "resolution": args.resolution,
    "source_sides": [args.min_side, args.max_side],
    "mean_jpeg_kb": kb,
    "batch": args.batch,
    "timed_batches": args.batches,
    "pairs_per_s": pairs_s,
    "cpu_ms_per_pair": cpu_ms,
    "single_thread_pairs_per_s": single_pairs_s,
    "build_rows_per_s": args.pairs / build_s,
    "parallel_build": parallel,
  }
  results_io.write_results(out, args.out)


if __name__ == "__main__":
  main()
