"""Times the real Diffusion-DPO and SFT train steps on full-size Stable Diffusion 1.5.

The step is the one `dpo_jax.train` runs with `configs/sd15.py` (bf16 compute,
fp32 master weights, bf16 frozen reference, AdamW with clipping, caption
dropout 0.2), on the published SD1.5 UNet architecture
(`models.architectures.SD15_UNET`, 860M params) with random weights, 64x64x4
latents and 77x768 text context, one device, no gradient accumulation:
`--pairs` is the per-device micro-batch of preference pairs.

Each (objective, pairs) configuration runs in its own subprocess, so that the
device's peak-memory counter (`memory_stats()['peak_bytes_in_use']`) is that
configuration's alone and an out-of-memory one does not stop the rest. Per
configuration: compile seconds (lower + compile), median seconds per step
after warm-up (each step waited on with block_until_ready), pairs/s, images/s
(images through the trained UNet: 2 per pair for DPO, the winner only for
SFT), model FLOPs per step (XLA's cost analysis of the lowered HLO, without
remat: `step.lowered_flops`), achieved TFLOP/s and MFU against
`--peak_tflops`, and peak device memory; then the DPO/SFT step-time ratio per
pair count (ideal ~8/3: policy forward+backward on two images plus two
reference forwards, against forward+backward on one image).

  python benchmarks/sd_step_bench.py --pairs=8,16 --remat=blocks \
      --out=benchmarks/results/sd_step_bench_h200.json

XLA's cost analysis of the step compiled for a GPU misses most of its FLOPs
(the convolutions and matmuls go to cuDNN/cuBLAS: ~2-3 of ~50 TFLOP for DPO at
8 pairs), hence the lowered HLO's count, which any host does in seconds without
weights; `--recount` merges device result files (older ones counted the
compiled program) and recounts them here:

  python benchmarks/sd_step_bench.py --recount=run1.json,run2.json \
      --out=benchmarks/results/sd_step_bench_h200.json

`--arch=tiny` swaps in a small UNet of the same block structure, for checking
the script on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from dpo_jax.models.architectures import SD15_UNET  # noqa: E402

# A small stand-in with SD1.5's block structure, for CPU checks of this script.
TINY_UNET: dict[str, Any] = {
  **SD15_UNET,
  "sample_size": 16,
  "block_out_channels": (32, 32, 64, 64),
  "layers_per_block": 1,
  "cross_attention_dim": 32,
}


def _arch(name: str) -> tuple[dict[str, Any], int, int]:
  """(UNet config, latent side, text tokens)."""
  if name == "tiny":
    return TINY_UNET, 16, 8
  from dpo_jax.models import architectures

  unet_cfg, side, tokens, pooled = architectures.ARCHITECTURES[name]
  if pooled:
    raise ValueError(f"--arch={name}: only architectures without pooled text embeddings.")
  return unet_cfg, side, tokens


def sd15_step_config(
  objective: str, pairs: int, unet_cfg: dict[str, Any], mem_eff_attn: bool, remat: str = "none"
):
  """configs/sd15.py's DPO (or SFT) config on `unet_cfg`, one micro-step of `pairs` pairs."""
  from configs import sd15

  c = sd15.get_config("sft" if objective == "sft" else "")
  for k, v in unet_cfg.items():
    c.model[k] = v
  c.model.attention = "chunked" if mem_eff_attn else "xla"
  c.model.remat = remat
  c.data.global_batch_size = pairs
  c.optim.grad_accum = 1
  return c


def random_params(unet, rng_seed: int = 0):
  """Random float32 UNet params of the right shapes, cheaply.

  `unet.init_weights` under jit compiles for minutes on a GPU (it traces the
  whole forward pass), and so does one jitted program of ~700 per-leaf random
  draws; the step's cost does not depend on the values, so this draws kernels
  ~N(0, 1/fan_in) with numpy on the host, norm scales 1 and biases 0.
  """
  import jax
  import numpy as np

  abstract = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(rng_seed))
  gen = np.random.default_rng(rng_seed)

  def init(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if a.ndim >= 2:
      fan_in = max(1, a.size // a.shape[-1])
      x = gen.standard_normal(a.shape, dtype=np.float32)
      x *= np.float32(fan_in**-0.5)
    elif name == "scale":
      x = np.ones(a.shape, np.float32)
    else:
      x = np.zeros(a.shape, np.float32)
    return jax.device_put(x)

  import flax

  return flax.core.unfreeze(jax.tree_util.tree_map_with_path(init, abstract))


def hlo_flops(objective: str, pairs: int, arch: str, mem_eff_attn: bool = False) -> float:
  """Model FLOPs of the step's unoptimised HLO, from abstract shapes (no weights, no compile).

  XLA's GPU cost analysis of the compiled step misses most of the work (the
  convolutions and matmuls it hands to cuDNN/cuBLAS), so the FLOPs for MFU
  are counted here, on the lowered program (`step.lowered_flops`), on any
  host, and without remat: MFU counts the model's FLOPs, not recomputation.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dpo_jax import optim
  from dpo_jax import step as step_lib
  from dpo_jax.models import unet as unet_lib

  unet_cfg, side, tokens = _arch(arch)
  ctx_dim = unet_cfg["cross_attention_dim"]
  c = sd15_step_config(objective, pairs, unet_cfg, mem_eff_attn)
  unet = unet_lib.unet_from_config(c.model, c.precision.compute_dtype)
  tx, lr_fn = optim.make_optimizer(c.optim, c.max_steps)
  uncond = {"context": np.zeros((tokens, ctx_dim), np.float32)}
  spec = step_lib.build_step_spec(c, unet_lib.make_unet_apply(unet), tx, lr_fn, uncond)
  ref_dtype = unet_lib.parse_dtype(c.precision.ref_dtype)
  params = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
  state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), params)
  ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ref_dtype), params)
  lat = jax.ShapeDtypeStruct((pairs, 4, side, side), jnp.float32)
  batch = {
    "latents_w": lat,
    "latents_l": lat,
    "context": jax.ShapeDtypeStruct((pairs, tokens, ctx_dim), jnp.float32),
  }
  fn = jax.jit(functools.partial(step_lib.train_step, spec=spec), donate_argnums=0)
  return step_lib.lowered_flops(fn.lower(state, ref, batch, jax.random.PRNGKey(1)))


def recount(args) -> None:
  """Merges device result files and recounts each row's FLOPs with `hlo_flops` here."""
  rows: dict[tuple[str, int], dict[str, Any]] = {}
  first: dict[str, Any] = {}
  for path in args.recount.split(","):
    with open(path) as f:
      d = json.load(f)
    first = first or d
    for r in d["results"]:
      if "error" not in r or (r["objective"], r["pairs"]) not in rows:
        rows[(r["objective"], r["pairs"])] = {**r, "source_file": os.path.basename(path)}
  out_rows = []
  for (objective, pairs), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    if "error" not in r:
      t0 = time.perf_counter()
      flops = hlo_flops(objective, pairs, first.get("arch", "sd15"))
      print(
        f"{objective} pairs={pairs}: {flops / 1e12:.2f} TFLOP/step (HLO, "
        f"{time.perf_counter() - t0:.0f} s)",
        flush=True,
      )
      r["flops_per_step_hlo"] = flops
      r["flops_per_step"] = flops
      r["flops_source"] = "lowered HLO cost analysis (counted on the host, --recount)"
      r["tflops_per_s"] = flops / r["step_s_median"] / 1e12
      r["mfu"] = r["tflops_per_s"] / r["peak_tflops"]
    out_rows.append(r)
  print_table(out_rows)
  rat = ratios(out_rows)
  for p, x in rat.items():
    print(f"DPO/SFT step time ratio at {p} pairs: {x:.2f} (ideal ~{8 / 3:.2f})")
  meta = {k: v for k, v in first.items() if k not in ("results", "dpo_over_sft")}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({**meta, "results": out_rows, "dpo_over_sft": rat}, f, indent=2)
  print(f"wrote {args.out}", flush=True)


def run_one(args) -> dict[str, Any]:
  """Builds, compiles and times one (objective, pairs) step in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import results_io
  from dpo_jax import optim
  from dpo_jax import step as step_lib
  from dpo_jax.data import synthetic
  from dpo_jax.models import unet as unet_lib

  t_start = time.perf_counter()
  unet_cfg, side, tokens = _arch(args.arch)
  ctx_dim = unet_cfg["cross_attention_dim"]
  pairs = args.pairs[0]
  c = sd15_step_config(args.objective, pairs, unet_cfg, args.mem_efficient_attention, args.remat)
  unet = unet_lib.unet_from_config(c.model, c.precision.compute_dtype)
  tx, lr_fn = optim.make_optimizer(c.optim, c.max_steps)
  uncond = {"context": np.zeros((tokens, ctx_dim), np.float32)}
  spec = step_lib.build_step_spec(c, unet_lib.make_unet_apply(unet), tx, lr_fn, uncond)

  ref_dtype = unet_lib.parse_dtype(c.precision.ref_dtype)
  params = random_params(unet, 0)
  ref = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p))(params)
  state = jax.jit(lambda p: step_lib.init_train_state(p, tx))(params)
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  del params
  data = synthetic.make_synthetic_pairs(pairs, min(pairs, 4), (4, side, side), tokens, ctx_dim, 0)
  batch = jax.tree.map(jnp.asarray, data)
  rng = jax.random.PRNGKey(1)
  jax.block_until_ready((state, ref, batch))
  setup_s = time.perf_counter() - t_start
  print(
    f"  {args.objective} pairs={pairs}: {n_params / 1e6:.0f}M params, setup {setup_s:.1f} s",
    flush=True,
  )

  fn = jax.jit(functools.partial(step_lib.train_step, spec=spec), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = fn.lower(state, ref, batch, rng)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  print(f"  compiled in {compile_s:.1f} s", flush=True)
  flops_compiled = step_lib.compiled_flops(compiled)
  # What the device executes (with remat, the recomputed forward too), and the
  # model FLOPs MFU is defined by: the same step without remat and with plain
  # attention (XLA counts the chunked attention's loop bodies once).
  flops_lowered = step_lib.lowered_flops(lowered)
  flops_model = flops_lowered
  if args.remat != "none" or args.mem_efficient_attention:
    flops_model = hlo_flops(args.objective, pairs, args.arch)
  mem = compiled.memory_analysis()
  xla_mem = {
    k: float(getattr(mem, f"{k}_size_in_bytes", float("nan")))
    for k in ("argument", "output", "temp", "alias", "generated_code")
  }

  for _ in range(args.warmup):
    state, m = compiled(state, ref, batch, rng)
  jax.block_until_ready((state, m))
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    state, m = compiled(state, ref, batch, rng)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  last = {k: float(v) for k, v in jax.device_get(m).items()}

  med = float(np.median(times))
  flops = flops_model
  tflops_per_s = flops / med / 1e12
  dev = jax.devices()[0]
  stats = {}
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # noqa: BLE001 - CPU devices have no memory stats.
    pass
  images_per_pair = 2 if args.objective == "dpo" else 1
  return {
    "objective": args.objective,
    "pairs": pairs,
    "unet_params": n_params,
    "latent_shape": [4, side, side],
    "context_shape": [tokens, ctx_dim],
    "compute_dtype": c.precision.compute_dtype,
    "ref_dtype": c.precision.ref_dtype,
    "caption_dropout": float(c.data.caption_dropout),
    "setup_s": setup_s,
    "compile_s": compile_s,
    "step_s_median": med,
    "step_s_min": float(np.min(times)),
    "step_s_max": float(np.max(times)),
    "iters": args.iters,
    "warmup": args.warmup,
    "pairs_per_s": pairs / med,
    "images_per_s": images_per_pair * pairs / med,
    "remat": args.remat,
    "flops_per_step": flops,
    "flops_source": "lowered HLO cost analysis, no remat, plain attention (model FLOPs)",
    "flops_per_step_compiled": flops_compiled,
    "flops_per_step_lowered": flops_lowered,
    "tflops_per_s": tflops_per_s,
    "peak_tflops": args.peak_tflops,
    "mfu": tflops_per_s / args.peak_tflops,
    "peak_bytes_in_use": float(stats.get("peak_bytes_in_use", float("nan"))),
    "bytes_limit": float(stats.get("bytes_limit", float("nan"))),
    "xla_memory_analysis_bytes": xla_mem,
    "last_metrics": last,
    "device_kind": dev.device_kind,
    "environment": results_io.environment(),
    "versions": _versions(),
  }


def _versions() -> dict[str, str]:
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "diffusers"):
    try:
      out[name] = __import__(name).__version__
    except Exception:  # noqa: BLE001
      out[name] = "?"
  return out


def _gib(x: float) -> str:
  return f"{x / 2**30:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
  hdr = (
    f"{'objective':>9} {'pairs':>5} {'compile_s':>9} {'s/step':>8} {'pairs/s':>8} "
    f"{'images/s':>8} {'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak_GiB':>8}"
  )
  print(hdr)
  for r in rows:
    if "error" in r:
      print(f"{r['objective']:>9} {r['pairs']:>5}  failed: {r['error'][-200:]}")
      continue
    print(
      f"{r['objective']:>9} {r['pairs']:>5} {r['compile_s']:>9.1f} {r['step_s_median']:>8.4f} "
      f"{r['pairs_per_s']:>8.2f} {r['images_per_s']:>8.2f} {r['flops_per_step'] / 1e12:>10.2f} "
      f"{r['tflops_per_s']:>8.1f} {100 * r['mfu']:>5.1f}% {_gib(r['peak_bytes_in_use']):>8}"
    )


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
  ok = {(r["objective"], r["pairs"]): r for r in rows if "error" not in r}
  return {
    str(p): ok[("dpo", p)]["step_s_median"] / ok[("sft", p)]["step_s_median"]
    for (o, p) in ok
    if o == "dpo" and ("sft", p) in ok
  }


def write_json(path: str, args, rows: list[dict[str, Any]]) -> None:
  """The results_io layout (environment first), with the environment read in a worker.

  The driver never initialises JAX itself: it would take device memory from
  the workers.
  """
  env = next((r["environment"] for r in rows if "environment" in r), {})
  out = {
    **env,
    "arch": args.arch,
    "device_kind": next((r["device_kind"] for r in rows if "device_kind" in r), "?"),
    "peak_tflops": args.peak_tflops,
    "versions": next((r["versions"] for r in rows if "versions" in r), {}),
    "results": [{k: v for k, v in r.items() if k not in ("environment", "versions")} for r in rows],
    "dpo_over_sft": ratios(rows),
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}", flush=True)


def drive(args) -> None:
  """Runs every configuration in its own subprocess inside `--budget_s`."""
  t_start = time.perf_counter()
  rows: list[dict[str, Any]] = []
  worst_s = 0.0
  configs = [(o, p) for p in args.pairs for o in args.objectives]
  if args.configs:
    configs = [(o, int(p)) for o, p in (x.split(":") for x in args.configs.split(","))]
  for objective, pairs in configs:
    left = args.budget_s - (time.perf_counter() - t_start)
    if left < max(60.0, 0.5 * worst_s):
      print(f"skip {objective} pairs={pairs}: {left:.0f} s of budget left", flush=True)
      rows.append({"objective": objective, "pairs": pairs, "error": "skipped: out of budget"})
      continue
    result_path = os.path.join(args.tmp_dir, f"sd_step_{objective}_{pairs}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--objective={objective}"]
    cmd += [f"--pairs={pairs}", f"--result={result_path}", f"--arch={args.arch}"]
    cmd += [f"--iters={args.iters}", f"--warmup={args.warmup}"]
    cmd += [f"--peak_tflops={args.peak_tflops}"]
    cmd += [f"--remat={args.remat}"]
    if args.mem_efficient_attention:
      cmd.append("--mem_efficient_attention")
    print(f"=== {objective} pairs={pairs} ({left:.0f} s of budget left)", flush=True)
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, timeout=left, check=False)
      rc = proc.returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
    wall = time.perf_counter() - t0
    worst_s = max(worst_s, wall)
    if rc == 0 and os.path.exists(result_path):
      with open(result_path) as f:
        row = json.load(f)
      row["worker_wall_s"] = wall
      rows.append(row)
    else:
      rows.append({"objective": objective, "pairs": pairs, "error": f"worker rc={rc}"})
    print_table(rows[-1:])
    write_json(args.out, args, rows)
  print()
  print_table(rows)
  for p, r in ratios(rows).items():
    print(f"DPO/SFT step time ratio at {p} pairs: {r:.2f} (ideal ~{8 / 3:.2f})")
  write_json(args.out, args, rows)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", default="8", help="Comma-separated per-device pair batches.")
  ap.add_argument("--objectives", default="dpo,sft")
  ap.add_argument(
    "--configs", default="", help="objective:pairs list in run order (overrides the two above)."
  )
  ap.add_argument("--arch", default="sd15", help="sd15, or tiny for a CPU check.")
  ap.add_argument("--iters", type=int, default=20, help="Timed steps (median reported).")
  ap.add_argument("--warmup", type=int, default=3, help="Untimed steps after compiling.")
  ap.add_argument("--peak_tflops", type=float, default=989.0, help="Dense bf16 peak for MFU.")
  ap.add_argument(
    "--mem_efficient_attention",
    action="store_true",
    help="query-chunked attention (config.model.attention=chunked).",
  )
  ap.add_argument(
    "--remat", default="none", help="config.model.remat of the timed step (FLOPs: without)."
  )
  ap.add_argument("--budget_s", type=float, default=1e9, help="Skip configs past this.")
  ap.add_argument("--out", default="benchmarks/results/sd_step_bench.json")
  ap.add_argument("--tmp_dir", default="/tmp")
  ap.add_argument(
    "--recount",
    default="",
    help="Comma-separated result files to merge into --out with FLOPs recounted on this host.",
  )
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--objective", default="dpo", help=argparse.SUPPRESS)
  ap.add_argument("--result", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.pairs = [int(p) for p in str(args.pairs).split(",") if p]
  args.objectives = [o for o in args.objectives.split(",") if o]
  if args.recount:
    recount(args)
  elif args.worker:
    row = run_one(args)
    with open(args.result, "w") as f:
      json.dump(row, f, indent=2)
  else:
    drive(args)


if __name__ == "__main__":
  main()
