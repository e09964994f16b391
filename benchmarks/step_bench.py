"""Times the jitted train step of every objective on a tiny SD-shaped UNet.

Shape from BRIEF §5: blocks 64/128/128, cross-attention in the first two
levels, 32x32x4 latents, 4 pairs per step, AdamW. Prints steps/s, pairs/s and
the DPO/SFT time ratio (ideal ~8/3 per pair: policy fwd+bwd on two images plus
two reference forwards, vs fwd+bwd on one image), each objective's step time
and XLA FLOPs relative to DPO (RPO reads cached pair embeddings, its extra
work is the [B, B] weighting; MaPO has no reference forward; DSPO always
traces policy and reference separately) and writes JSON.

  python benchmarks/step_bench.py --out=benchmarks/results/step_bench.json
  python benchmarks/step_bench.py --objectives=dpo,mapo --size=16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import results_io  # noqa: E402
from configs import common  # noqa: E402
from dpo_jax import optim  # noqa: E402
from dpo_jax import step as step_lib  # noqa: E402
from dpo_jax.data import synthetic  # noqa: E402
from dpo_jax.models import unet as unet_lib  # noqa: E402


def sd_shaped_config(objective: str, pairs: int, size: int):
  c = common.get_base_config()
  c.objective = objective
  c.model.sample_size = size
  c.model.block_out_channels = (64, 128, 128)
  c.model.layers_per_block = 1
  c.model.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  c.model.cross_attention_dim = 64
  c.data.global_batch_size = pairs
  return c


def time_step(objective: str, pairs: int, size: int, iters: int) -> dict[str, float]:
  c = sd_shaped_config(objective, pairs, size)
  unet = unet_lib.unet_from_config(c.model, c.precision.compute_dtype)
  tx, lr_fn = optim.make_optimizer(c.optim, 1000)
  spec = step_lib.build_step_spec(c, unet_lib.make_unet_apply(unet), tx, lr_fn)
  params = unet_lib.init_unet_params(unet, jax.random.PRNGKey(0))
  ref = jax.tree.map(jnp.copy, params)
  data = synthetic.make_synthetic_pairs(pairs, 2, (4, size, size), 8, 64, seed=0)
  if objective == "rpo":
    # Cached per-pair CLIP embeddings (what the data side supplies).
    data["rpo_embeds"] = data["context"].mean(axis=1)
  batch = jax.tree.map(jnp.asarray, data)
  state = step_lib.init_train_state(params, tx)
  fn = jax.jit(lambda s, r, b, k: step_lib.train_step(s, r, b, k, spec=spec), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = fn.lower(state, ref, batch, jax.random.PRNGKey(0))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, ref, batch, jax.random.PRNGKey(0))  # Warm-up.
  jax.block_until_ready(m)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    state, m = compiled(state, ref, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {
    "compile_s": compile_s,
    "step_s_median": med,
    "step_s_min": float(np.min(times)),
    "steps_per_s": 1.0 / med,
    "pairs_per_s": pairs / med,
    "flops_per_step": step_lib.lowered_flops(lowered),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--size", type=int, default=32, help="Latent height/width.")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--objectives", default=",".join(step_lib.OBJECTIVES))
  ap.add_argument("--out", default="benchmarks/results/step_bench.json")
  args = ap.parse_args()

  names = ["dpo"] + [o for o in args.objectives.split(",") if o and o != "dpo"]
  results = {o: time_step(o, args.pairs, args.size, args.iters) for o in names}
  dpo = results["dpo"]
  for o, r in results.items():
    r["time_over_dpo"] = r["step_s_median"] / dpo["step_s_median"]
    r["flops_over_dpo"] = r["flops_per_step"] / dpo["flops_per_step"]
    print(
      f"{o}: {r['steps_per_s']:.3f} steps/s, {r['pairs_per_s']:.2f} pairs/s, "
      f"median {r['step_s_median']:.3f} s/step (compile {r['compile_s']:.1f} s); "
      f"vs DPO: time x{r['time_over_dpo']:.2f}, FLOPs x{r['flops_over_dpo']:.2f}"
    )
  out = {"pairs": args.pairs, "latent_size": args.size, "results": results}
  if "sft" in results:
    out["dpo_over_sft"] = dpo["step_s_median"] / results["sft"]["step_s_median"]
    print(f"DPO/SFT step time ratio: {out['dpo_over_sft']:.2f} (ideal ~{8 / 3:.2f})")
  results_io.write_results(out, args.out)


if __name__ == "__main__":
  main()
