"""The training loop: build mesh, state, data; compile the step; loop; checkpoint.

State setup order (big_vision style): abstract shapes first (`jax.eval_shape`),
then shardings from the rules, then either an orbax restore straight into
those shardings or a jitted, sharded init — full-size parameters never
materialise on one device.

Resume order:
  1. `workdir/checkpoints`: the newest step that reads back completely
     (params, optimizer state, step, RNG key and data-iterator position).
  2. otherwise a fresh init from `config.seed`.
The frozen reference is never checkpointed: it is the *initial* policy,
rebuilt deterministically at every start.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dpo_jax import checkpoint, metrics, optim, sample_eval, sharding
from dpo_jax import step as step_lib
from dpo_jax.data import encode, sources
from dpo_jax.models import build as build_lib
from dpo_jax.models import unet as unet_lib
from dpo_jax.step import build_step_spec, lowered_flops


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def split_rngs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(init, train, eval) keys. The train key is folded with the step inside the step."""
  init_rng, train_rng, eval_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init_rng, train_rng, eval_rng


def _meta(config: ml_collections.ConfigDict, step: int, mesh) -> dict[str, Any]:
  return {
    "config": json.loads(config.to_json_best_effort()),
    "step": step,
    "mesh": dict(mesh.shape),
    "jax_version": jax.__version__,
    "time": time.time(),
  }


def _models_data_and_initial_params(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh,
  tx,
  lr_fn,
  init_rng: jax.Array,
) -> tuple[step_lib.StepSpec, sources.Data, Any, Any, Any, sample_eval.SampleEval | None]:
  """Builds the models and the data; places the initial policy on the mesh.

  Returns:
    (step spec, data, abstract train state, train-state shardings, initial
    params sharded as `shardings.params`, the sample evaluator or None).

  The `Models` object, and with it `models.pretrained_params` (a full host copy
  of the UNet weights, GBs for SDXL), is a local of this function only: once
  the weights are on the mesh and it returns, the trainer keeps no reference
  to the host copy for the rest of the run (the data encoder and the sample
  evaluator keep the pipeline without its `unet_params`).
  """
  models = build_lib.build_models(config)
  data = sources.make_data(config, models, workdir)
  spec = build_step_spec(
    config,
    unet_lib.make_unet_apply(models.unet),
    tx,
    lr_fn,
    data.uncond,
    models.scheduler_config,
  )
  rules = [tuple(r) for r in config.sharding_rules]
  abstract_params = jax.eval_shape(models.init_params, init_rng)
  abstract_state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), abstract_params)
  state_sh = sharding.tree_shardings(abstract_state, mesh, rules, config.fsdp_min_size)
  if models.pretrained_params is not None:
    init_params = jax.device_put(models.pretrained_params, state_sh.params)
  else:
    init_params = jax.jit(models.init_params, out_shardings=state_sh.params)(init_rng)
  evaluator = sample_eval.make_sample_eval(config, workdir, mesh, models.pipeline)
  return spec, data, abstract_state, state_sh, init_params, evaluator


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.max_steps` optimizer steps, resuming from `workdir` if possible.

  Returns:
    {"state": final TrainState, "train": last step's metrics (host floats),
     "eval": final eval metrics, "history": list of per-step metric dicts of
     this invocation}.
  """
  workdir = os.fspath(workdir)
  if "://" not in workdir:
    # orbax requires absolute paths; `--workdir=runs/tiny` is relative to the cwd.
    workdir = os.path.abspath(workdir)
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(workdir, exist_ok=True)
    epath.Path(workdir, "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = metrics.create_writer(workdir)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info(
    "Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size, jax.process_count()
  )

  tx, lr_fn = optim.make_optimizer(config.optim, config.max_steps)
  init_rng, _, _ = split_rngs(config.seed)
  spec, data, abstract_state, state_sh, init_params, sample_evaluator = (
    _models_data_and_initial_params(config, workdir, mesh, tx, lr_fn, init_rng)
  )
  param_sh = state_sh.params
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  # Keys as global, replicated arrays: orbax (and multi-host jit) reject
  # host-local arrays when there is more than one process.
  _, train_rng, eval_rng = jax.jit(lambda: split_rngs(config.seed), out_shardings=repl)()

  ref_dtype = unet_lib.parse_dtype(config.precision.ref_dtype)
  # The reference is the initial policy, optionally stored in bf16 (it only
  # runs forward passes). A separate buffer, so donating the state never
  # touches it.
  ref_params = jax.jit(
    lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p), out_shardings=param_sh
  )(init_params)

  train_iter = data.train
  manager = checkpoint.make_manager(
    os.path.join(workdir, "checkpoints"), config.keep_checkpoints, config.async_checkpointing
  )
  ckpt_abstract = {
    "train_state": _with_shardings(abstract_state, state_sh),
    "rng": jax.ShapeDtypeStruct(train_rng.shape, train_rng.dtype, sharding=repl),
  }
  restored = checkpoint.restore_latest_valid(manager, ckpt_abstract)
  if restored is None:
    state = jax.jit(lambda p: step_lib.init_train_state(p, tx), out_shardings=state_sh)(init_params)
    start_step = 0
    logging.info("No checkpoint in %s: starting from step 0.", workdir)
  else:
    start_step, ckpt, data_state = restored
    state, train_rng = ckpt["train_state"], ckpt["rng"]
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d in %s (data position %s).", start_step, workdir, data_state)
  del init_params
  if start_step >= config.max_steps:
    logging.info(
      "Workdir %s is already at step %d >= max_steps=%d: nothing to train.",
      workdir,
      start_step,
      config.max_steps,
    )
    manager.close()
    writer.close()
    return {"state": state, "train": {}, "eval": {}, "history": [], "flops_per_step": float("nan")}

  frozen = None if data.frozen is None else jax.device_put(data.frozen, repl)
  if sample_evaluator is not None and frozen is not None:
    # The data encoder's replicated VAE / text encoders serve sampling too.
    sample_evaluator.share_encoders(frozen)
  if data.encoder is None:
    to_step_batch = lambda raw: raw
  else:
    # Frozen encoders run in their own jit: their params are replicated
    # inputs, never optimizer state, never donated.
    encoder = jax.jit(data.encoder)
    to_step_batch = lambda raw: encoder(frozen, raw)
  raw_abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype, sharding=batch_sh
    ),
    encode.device_keys(train_iter.element_spec),
  )
  batch_abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh),
    jax.eval_shape(to_step_batch, raw_abstract),
  )
  # Ahead-of-time compile: shape/sharding errors surface before any data is
  # read, and the cost analysis gives the step's FLOPs for MFU.
  train_step = step_lib.jit_train_step(spec, state_sh, param_sh, batch_sh, repl)
  lowered = train_step.lower(state, ref_params, batch_abstract, train_rng)
  compiled = lowered.compile()
  # From the lowered HLO: whole-mesh FLOPs, including cuDNN/cuBLAS work that a
  # GPU-compiled cost analysis misses, and remat's recomputed forward.
  flops = lowered_flops(lowered)
  logging.info("Compiled train step: %.3g FLOPs/step (whole mesh).", flops)
  eval_fn = step_lib.jit_eval_step(spec, param_sh, param_sh, batch_sh, repl)
  eval_global = to_step_batch(
    sharding.global_batch_from_local(encode.device_keys(data.eval_batch), mesh)
  )

  if lead and start_step == 0:
    writer.write_hparams(_flat_hparams(config))
  progress = metrics.ProgressLog(config.max_steps, config.data.global_batch_size, start_step)
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_log_time, last_log_step = time.perf_counter(), start_step
  step = start_step
  eval_metrics: dict[str, float] = {}

  for step in range(start_step + 1, config.max_steps + 1):
    raw = sharding.global_batch_from_local(encode.device_keys(next(train_iter)), mesh)
    batch = to_step_batch(raw)
    state, m = compiled(state, ref_params, batch, train_rng)
    pending.append((step, m))
    if step == start_step + 1:
      jax.block_until_ready(m)
      progress.restart_clock(step)
      last_log_time, last_log_step = time.perf_counter(), step

    is_last = step == config.max_steps
    if step % config.log_every == 0 or is_last:
      # The only device->host sync of the loop: every pending step's metrics.
      fetched = jax.device_get(pending)
      pending = []
      now = time.perf_counter()
      pairs_per_s = (
        (step - last_log_step) * config.data.global_batch_size / (now - last_log_time)
        if step > last_log_step
        else float("nan")
      )
      last_log_time, last_log_step = now, step
      for s, vals in fetched:
        row = {k: float(v) for k, v in vals.items()}
        row["pairs_per_sec"] = pairs_per_s
        history.append({"step": s, **row})
        writer.write_scalars(s, {f"train/{k}": v for k, v in row.items()})
      _check_nonfinite(history[-1], config.optim.max_consecutive_nonfinite)
      progress.maybe_log(step, history[-1]["loss"], force=is_last)

    if (config.eval_every and step % config.eval_every == 0) or is_last:
      ev = jax.device_get(eval_fn(state.params, ref_params, eval_global, eval_rng))
      eval_metrics = {k: float(v) for k, v in ev.items()}
      writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})

    if sample_evaluator and (step % config.sample_eval.every == 0 or is_last):
      eval_metrics.update(sample_evaluator(step, state.params, writer))

    if step % config.checkpoint_every == 0 or is_last:
      checkpoint.save(
        manager,
        step,
        {"train_state": state, "rng": train_rng},
        train_iter.get_state(),
        _meta(config, step, mesh),
        force=is_last,
      )

  manager.wait_until_finished()
  manager.close()
  writer.flush()
  writer.close()
  return {
    "state": state,
    "train": history[-1] if history else {},
    "eval": eval_metrics,
    "history": history,
    "flops_per_step": flops,
  }


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat: dict[str, Any] = {}

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(f"{prefix}{k}.", v)
      else:
        flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

  walk("", config)
  return flat


def _check_nonfinite(last: dict[str, float], limit: int) -> None:
  if last.get("consecutive_skipped", 0) >= limit:
    raise FloatingPointError(
      f"{int(last['consecutive_skipped'])} consecutive steps had a non-finite loss or gradient "
      f"(all skipped, {int(last['total_skipped'])} in total); stopping. Lower the learning rate "
      "or beta, or check the data."
    )
  if not np.isfinite(last.get("loss", 0.0)):
    logging.warning("Non-finite loss at step %d; the update was skipped.", int(last["step"]))
