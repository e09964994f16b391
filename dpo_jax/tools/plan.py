"""Memory and compute plan for a full-size train step, from shapes alone.

  python -m dpo_jax.tools.plan --config=configs/sdxl.py --mesh=data=1,fsdp=8

  python -m dpo_jax.tools.plan --config=configs/sdxl.py --mesh=data=1,fsdp=1 --flops_only

Builds the UNet of `--kind` (default: from the config name) from its published
architecture (`models.architectures`) with the config's `model.remat` and
`model.attention`, derives parameters, optimizer state
and shardings with `jax.eval_shape` (no weights are created or loaded), then
ahead-of-time lowers and compiles one optimizer micro-step of the configured
objective on forced host CPU devices (`--xla_force_host_platform_device_count`)
and prints, per device: parameter + optimizer bytes, frozen-reference bytes,
XLA's temp (activation) memory, and FLOPs per step and per pair; then the
same for the frozen encoders' stage on one micro-batch (VAE on both images
and the text encoders, as the trainer runs them) and the resulting peak. With gradient
accumulation the step is planned for one micro-batch (global_batch_size /
grad_accum pairs); a full optimizer step is grad_accum of them. CPU
compilation only estimates accelerator memory: layouts, fusion and scheduling
differ on TPU/GPU (for SD1.5 the CPU estimate has been well above the
activation memory measured on an H200).

FLOPs are XLA's count of the lowered (unoptimised) HLO (`step.lowered_flops`),
so they include every convolution and matmul whatever the backend, and with
remat the recomputed forward; a loop body (chunked attention's `lax.map`)
counts once. `--flops_only` stops after lowering (about a minute for SDXL,
instead of ~13 to compile) and plans the step with plain attention and,
unless `--remat` says otherwise, without remat: model FLOPs, the numerator
of MFU.
"""

from __future__ import annotations

import os
import sys


def _force_devices(argv: list[str]) -> None:
  """Sets the host device count from --mesh before jax initialises."""
  mesh = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), "data=1,fsdp=8")
  n = 1
  for part in mesh.split(","):
    n *= int(part.split("=")[1])
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__":
  _force_devices(sys.argv)

import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import lora, optim, sharding  # noqa: E402
from dpo_jax import step as step_lib  # noqa: E402
from dpo_jax.models import architectures  # noqa: E402
from dpo_jax.models import unet as unet_lib  # noqa: E402

# XLA:CPU expands the optimization barriers that keep a rematerialised forward
# apart from the original (pass "cse_barrier_expander") before CSE, which then
# merges the two: remat is undone and the CPU temp estimate ignores it. Keeping
# the barriers, as the GPU and TPU compilers do until scheduling, makes the
# estimate reflect remat. CPU only: the plan's devices are forced host devices.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _bytes_per_device(abstract: Any, shardings: Any) -> float:
  total = 0.0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = s.shard_shape(a.shape)
    total += float(np.prod(shard, dtype=np.float64)) * jnp.dtype(a.dtype).itemsize
  return total


def plan(
  config: ml_collections.ConfigDict,
  kind: str,
  data: int,
  fsdp: int,
  compile_step: bool = True,
  remat: str | None = None,
  encode_stage: bool = False,
) -> dict[str, Any]:
  """Lowers (and unless `compile_step` is False, compiles) one micro-step.

  Args:
    config: the run config.
    kind: a key of `models.architectures.ARCHITECTURES`.
    data, fsdp: the mesh (the first data*fsdp devices of this process).
    compile_step: also compile, for XLA's temp memory; False plans FLOPs only.
    remat: remat policy of the trained UNet; None = `config.model.remat`.
    encode_stage: also plan the frozen encoders on one micro-batch
      (`plan_encode`): what a run from images (not a latent cache) adds.

  Returns:
    Per-device bytes and FLOPs (temp bytes NaN without compiling), timings.
  """
  remat = config.model.remat if remat is None else remat
  unet_cfg, side, tokens, pooled = architectures.ARCHITECTURES[kind]
  # The published architecture, with the config's choices of how to compute it.
  unet_cfg = dict(unet_cfg, attention=unet_lib.attention_from_config(config.model))
  unet = unet_lib.unet_from_config(unet_cfg, config.precision.compute_dtype, remat=remat)
  # The first data*fsdp devices, so a small plan also runs in a process with more.
  mesh = sharding.make_mesh(data, fsdp, jax.devices()[: data * fsdp])
  accum = config.optim.grad_accum
  micro = config.data.global_batch_size // accum
  if micro < mesh.size:
    # At least one pair per device: fewer, larger micro-steps, same global batch.
    micro = mesh.size
    accum = max(1, config.data.global_batch_size // micro)
  c = ml_collections.ConfigDict(config.to_dict())
  c.optim.grad_accum = 1
  tx, lr_fn = optim.make_optimizer(c.optim, c.max_steps)
  ctx_dim = unet_cfg["cross_attention_dim"]
  uncond = {"context": np.zeros((tokens, ctx_dim), np.float32)}
  if pooled:
    uncond["text_embeds"] = np.zeros((pooled,), np.float32)
  spec = step_lib.build_step_spec(c, unet_lib.make_unet_apply(unet), tx, lr_fn, uncond)
  rules = [tuple(r) for r in c.sharding_rules]

  t0 = time.perf_counter()
  abstract_params = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
  trained = abstract_params
  if lora.enabled(c):  # Only the adapters are trained; the reference is the frozen base.
    trained = jax.eval_shape(
      lambda p: lora.init_adapters(p, jax.random.PRNGKey(0), int(c.lora.rank), c.lora.targets),
      abstract_params,
    )
  abstract_state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), trained)
  state_sh = sharding.tree_shardings(abstract_state, mesh, rules, c.fsdp_min_size)
  ref_sh = state_sh.params
  if lora.enabled(c):
    ref_sh = sharding.tree_shardings({"params": abstract_params}, mesh, rules, c.fsdp_min_size)
    ref_sh = ref_sh["params"]
  ref_dtype = unet_lib.parse_dtype(c.precision.ref_dtype)
  abstract_ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ref_dtype), abstract_params)
  batch_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  batch = {
    "latents_w": jax.ShapeDtypeStruct((micro, 4, side, side), jnp.float32),
    "latents_l": jax.ShapeDtypeStruct((micro, 4, side, side), jnp.float32),
    "context": jax.ShapeDtypeStruct((micro, tokens, ctx_dim), jnp.float32),
  }
  if pooled:
    batch["added_cond"] = {
      "text_embeds": jax.ShapeDtypeStruct((micro, pooled), jnp.float32),
      "time_ids": jax.ShapeDtypeStruct((micro, 6), jnp.float32),
    }
  batch_shs = jax.tree.map(lambda _: batch_sh, batch)
  fn = step_lib.jit_train_step(spec, state_sh, ref_sh, batch_shs, repl)
  lowered = fn.lower(abstract_state, abstract_ref, batch, jax.random.PRNGKey(0))
  # The lowered HLO is not yet partitioned: these are the whole mesh's FLOPs.
  flops_global = step_lib.lowered_flops(lowered)
  lower_s = time.perf_counter() - t0
  temp_bytes, compile_s = float("nan"), float("nan")
  if compile_step:
    t0 = time.perf_counter()
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = float(getattr(mem, "temp_size_in_bytes", float("nan")))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  enc = {}
  if encode_stage:
    enc = plan_encode(config, kind, mesh, micro, compile_step)
  persistent = _bytes_per_device(abstract_state, state_sh) + _bytes_per_device(abstract_ref, ref_sh)
  peak = persistent + temp_bytes
  if enc:
    peak = (
      persistent
      + enc["encoder_param_bytes_per_device"]
      + max(temp_bytes, enc["encode_temp_bytes_per_device"])
    )
  return {
    **enc,
    "peak_bytes_per_device": peak,
    "kind": kind,
    "objective": c.objective,
    "remat": remat,
    "attention": unet_lib.attention_from_config(config.model),
    "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
    "unet_params": n_params,
    "pairs_per_micro_step": micro,
    "grad_accum": accum,
    "param_and_opt_bytes_per_device": _bytes_per_device(abstract_state, state_sh),
    "reference_bytes_per_device": _bytes_per_device(abstract_ref, ref_sh),
    "lora_rank": int(c.lora.rank) if lora.enabled(c) else 0,
    "trained_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained)),
    "temp_bytes_per_device": temp_bytes,
    "flops_per_device_per_micro_step": flops_global / mesh.size,
    "flops_per_pair": flops_global / micro,
    "flops_source": "lowered HLO (step.lowered_flops)",
    "lower_s": lower_s,
    "compile_s": compile_s,
  }


def _encoder_modules(kind: str, dtype: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
  """(VAE, text encoder, text encoder 2 or None, abstract params) of the published pipeline."""
  from dpo_jax.models import clip
  from dpo_jax.models import vae as vae_lib

  vae_cfg, te_cfg, te2_cfg = architectures.ENCODERS[kind]
  vae = vae_lib.AutoencoderKL.from_config(dict(vae_cfg), dtype=dtype)
  abstract = {"vae": vae.init_abstract()}
  modules = []
  for name, cfg, cls in (
    ("text_encoder", te_cfg, clip.CLIPTextModel),
    ("text_encoder_2", te2_cfg, clip.CLIPTextModelWithProjection),
  ):
    if cfg is None:
      modules.append(None)
      continue
    module = cls.from_config(dict(cfg), dtype=dtype)
    modules.append(module)
    abstract[name] = module.init_abstract()
  return vae, modules[0], modules[1], abstract


def plan_encode(
  config: ml_collections.ConfigDict, kind: str, mesh: Any, micro: int, compile_step: bool = True
) -> dict[str, Any]:
  """The frozen encoders' stage for one micro-batch: VAE on both images, text encoder(s).

  The trainer runs it once per micro-batch in its own jit (never on the global
  batch), with the encoder parameters replicated on every device for the
  whole run; its temporaries are freed before the step runs, so the run's
  peak is the persistent buffers plus the larger of the two stages' temp.
  """
  from dpo_jax.models import conditioning

  dtype = unet_lib.parse_dtype(config.precision.compute_dtype)
  vae, te, te2, abstract = _encoder_modules(kind, dtype)
  res = config.data.resolution
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  factor = 0.18215 if kind == "sd15" else 0.13025

  def encode(params, pixels_w, pixels_l, ids):
    lat = [
      conditioning.vae_encode(vae, params["vae"], jnp.transpose(p, (0, 3, 1, 2)), factor)
      for p in (pixels_w, pixels_l)
    ]
    if te2 is None:
      text = conditioning.encode_prompt_sd15(te, params["text_encoder"], ids)
    else:
      text = conditioning.encode_prompt_sdxl(
        te, params["text_encoder"], te2, params["text_encoder_2"], ids, ids
      )
    return lat, text

  pixels = jax.ShapeDtypeStruct((micro, res, res, 3), jnp.float32, sharding=batch_sh)
  ids = jax.ShapeDtypeStruct((micro, 77), jnp.int32, sharding=batch_sh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
  t0 = time.perf_counter()
  lowered = jax.jit(encode).lower(params, pixels, pixels, ids)
  temp, compile_s = float("nan"), float("nan")
  if compile_step:
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)
    temp = float(getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan")))
    compile_s = time.perf_counter() - t0
  param_bytes = sum(
    float(np.prod(x.shape, dtype=np.float64)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(abstract)
  )
  return {
    "encode_pairs": micro,
    "encode_resolution": res,
    "encoder_param_bytes_per_device": param_bytes,
    "encode_temp_bytes_per_device": temp,
    "encode_flops_per_pair": step_lib.lowered_flops(lowered) / micro,
    "encode_compile_s": compile_s,
  }


def model_flops_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose lowered step has the model's FLOPs (the MFU numerator).

  Plain ("xla") attention instead of the query-chunked one: XLA's cost analysis
  counts a loop body once, so the chunked version's `lax.map` loops would be
  undercounted (SD1.5 DPO: 5.3 instead of 6.3 T per pair). Remat is chosen
  separately (`plan(remat=...)`).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.attention = "xla"
  if "use_memory_efficient_attention" in c.model:  # A config saved before `attention`.
    c.model.use_memory_efficient_attention = False
  return c


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def main(argv: list[str]) -> None:
  del argv
  from absl import flags

  config = flags.FLAGS.config
  parts = dict(p.split("=") for p in flags.FLAGS.mesh.split(","))
  kind = flags.FLAGS.kind or ("sdxl" if "sdxl" in flags.FLAGS["config"].config_filename else "sd15")
  flops_only = flags.FLAGS.flops_only
  # FLOPs-only plans model FLOPs (no remat recompute) unless --remat is given.
  remat = flags.FLAGS.remat or ("none" if flops_only else None)
  if flops_only:
    config = model_flops_config(config)
  r = plan(
    config,
    kind,
    int(parts.get("data", 1)),
    int(parts.get("fsdp", 1)),
    compile_step=not flops_only,
    remat=remat,
    encode_stage=flags.FLAGS.encode_stage and config.data.source != "cache",
  )
  per_step = r["flops_per_pair"] * r["pairs_per_micro_step"] * r["grad_accum"]
  temp = "not compiled (--flops_only)" if flops_only else _gib(r["temp_bytes_per_device"])
  print(
    f"{kind} {r['objective']} mesh data={r['mesh']['data']} fsdp={r['mesh']['fsdp']}"
    f" remat={r['remat']} attention={r['attention']}:"
    f" UNet {r['unet_params'] / 1e6:.0f}M params"
    + (
      f", LoRA rank {r['lora_rank']}: {r['trained_params'] / 1e6:.2f}M trained"
      if r["lora_rank"]
      else ""
    )
    + "\n"
    f"  params + optimizer state / device: {_gib(r['param_and_opt_bytes_per_device'])}\n"
    f"  frozen reference{' (= LoRA base)' if r['lora_rank'] else ''} / device:"
    f" {_gib(r['reference_bytes_per_device'])}\n"
    f"  XLA temp (activations) / device:   {temp}"
    f" (micro-step of {r['pairs_per_micro_step']} pairs)\n"
    f"  FLOPs / pair (lowered HLO): {r['flops_per_pair'] / 1e12:.2f} T;"
    f" per optimizer step ({r['grad_accum']} micro-steps): {per_step / 1e15:.2f} PFLOP\n"
    f"  lowered in {r['lower_s']:.0f} s"
    + ("" if flops_only else f", compiled in {r['compile_s']:.0f} s")
  )
  if "encode_pairs" in r:
    enc_temp = "not compiled" if flops_only else _gib(r["encode_temp_bytes_per_device"])
    print(
      f"  encode stage ({r['encode_pairs']} pairs at {r['encode_resolution']} px per call):"
      f" encoders {_gib(r['encoder_param_bytes_per_device'])} / device (replicated),"
      f" XLA temp {enc_temp} / device,"
      f" {r['encode_flops_per_pair'] / 1e12:.2f} TFLOP / pair"
    )
  if not flops_only:
    print(f"  peak / device (persistent + larger stage temp): {_gib(r['peak_bytes_per_device'])}")
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
  flags.DEFINE_string("mesh", "data=1,fsdp=8", "Mesh as data=D,fsdp=F (forced CPU devices).")
  flags.DEFINE_string("kind", "", "sd15 | sdxl (default: from the config file name).")
  flags.DEFINE_bool("flops_only", False, "Lower only (no compile, no temp memory): fast FLOPs.")
  flags.DEFINE_string("remat", "", "Remat policy override (default: config; none if flops_only).")
  flags.DEFINE_string("out", "", "Optional JSON output path.")
  flags.DEFINE_bool(
    "encode_stage", True, "Also plan the frozen VAE / text encoders on one micro-batch."
  )
  flags.mark_flags_as_required(["config"])
  app.run(main)
