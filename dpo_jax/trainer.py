"""The training loop: set up, loop, finish.

`train_and_evaluate` reads top to bottom as three stages:

1. `setup`: check the config against the devices (before anything is
   written), build mesh, models and data, place the initial policy and the
   frozen reference, restore or initialise the train state, and compile the
   step ahead of time.
2. `train_loop`: per step, the host produces `grad_accum` micro-batches, the
   frozen encoders encode each one as it arrives (bounded memory: one
   micro-batch of images at a time, never the global batch), the jitted step
   accumulates gradients over them; metrics are fetched every `log_every`
   steps, checkpoints saved every `checkpoint_every` and at a preemption
   notice.
3. `finish`: wait for pending saves and close writers.

State setup order (big_vision style): abstract shapes first (`jax.eval_shape`),
then shardings from the rules, then either an orbax restore straight into
those shardings or a jitted, sharded init — full-size parameters never
materialise on one device.

Resume order:
  1. `workdir/checkpoints`: the newest step that reads back completely
     (params, optimizer state, step, RNG key and data-iterator position).
  2. otherwise a fresh init from `config.pretrained_path`, else from `config.seed`.
The frozen reference is never checkpointed: it is the *initial* policy,
rebuilt deterministically at every start. With LoRA (`config.lora.rank > 0`)
the train state holds only the adapters and the reference doubles as the
frozen base they are merged into (`step.policy_params`): one UNet copy, and
checkpoints of adapters only (the base comes from `pretrained_path` again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dpo_jax import (
  checkpoint,
  distributed,
  lora,
  metrics,
  optim,
  preemption,
  preflight,
  sample_eval,
  sharding,
)
from dpo_jax import diagnostics as diag_lib
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
    "process_count": jax.process_count(),
    "jax_version": jax.__version__,
    "time": time.time(),
  }


def resolve_workdir(workdir: str) -> str:
  """orbax needs absolute paths; `--workdir=runs/tiny` is relative to the cwd."""
  workdir = os.fspath(workdir)
  return workdir if "://" in workdir else os.path.abspath(workdir)


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Config errors that need no file: raised before the workdir is created."""
  sharding.check_batch_layout(
    config.data.global_batch_size, config.optim.grad_accum, num_devices, "data.global_batch_size"
  )
  sharding.check_batch_layout(config.data.eval_batch_size, 1, num_devices, "data.eval_batch_size")
  diag_lib.DivergenceAlarm.from_config(config.alarm)


@dataclasses.dataclass
class Run:
  """What `setup` hands the loop: everything placed, restored and compiled."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  writer: Any
  manager: Any
  data: sources.Data
  spec: step_lib.StepSpec
  state: step_lib.TrainState
  ref_params: Any
  # (params, ref_params) -> the policy's full UNet weights (jitted); the
  # identity on params unless LoRA is on.
  policy_params: Callable[..., Any]
  train_rng: jax.Array
  eval_rng: jax.Array
  start_step: int
  train_step: Any  # Compiled (state, ref, batch, rng) -> (state, metrics); None when done.
  eval_step: Callable[..., Any]
  eval_batch: Any  # None: no held-out split (no eval loss), or nothing left to train.
  next_batch: Callable[[], Any]  # -> the next global batch in the step's format.
  flops: float
  sample_evaluator: sample_eval.SampleEval | None
  stop: preemption.Preemption


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
    (base) params, their shardings, the sample evaluator or None). Without
    LoRA the base shardings are the train state's `params` shardings.

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
  abstract_trained = jax.eval_shape(lambda p: _trained_params(config, p, init_rng), abstract_params)
  abstract_state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), abstract_trained)
  state_sh = sharding.tree_shardings(abstract_state, mesh, rules, config.fsdp_min_size)
  # The base under the paths a full fine-tune's state gives it ("params/..."),
  # so the same sharding rules lay it out with or without LoRA.
  base_sh = state_sh.params
  if lora.enabled(config):
    base_sh = sharding.tree_shardings(
      {"params": abstract_params}, mesh, rules, config.fsdp_min_size
    )["params"]
  if models.pretrained_params is not None:
    init_params = jax.device_put(models.pretrained_params, base_sh)
  else:
    init_params = jax.jit(models.init_params, out_shardings=base_sh)(init_rng)
  evaluator = sample_eval.make_sample_eval(config, workdir, mesh, models.pipeline)
  return spec, data, abstract_state, state_sh, init_params, base_sh, evaluator


def _trained_params(config: ml_collections.ConfigDict, base: Any, init_rng: jax.Array) -> Any:
  """What the optimizer trains from `base`: the base itself, or fresh LoRA adapters (B = 0)."""
  if not lora.enabled(config):
    return base
  # A key of its own: the adapters' A must not repeat the UNet init's draws.
  rng = jax.random.fold_in(init_rng, 0x10A)
  return lora.init_adapters(base, rng, int(config.lora.rank), config.lora.targets)


def _stack_micro_batches(micro: list[Any]) -> Any:
  """[n] micro-batches of [B/n, ...] -> one [B, ...] batch with micro-batch j at rows i*n + j.

  That is the layout `step.loss_and_grads` splits back into micro-batches.
  Stacking on axis 1 keeps every device's rows on that device: a device holds
  the same row range of each micro-batch and so of the stacked batch.
  """
  n = len(micro)
  return jax.tree.map(
    lambda *xs: jnp.stack(xs, axis=1).reshape((xs[0].shape[0] * n,) + xs[0].shape[1:]), *micro
  )


def _input_stage(mesh, data: sources.Data, batch_sh):
  """-> (encode_local, micro_abstract, frozen params placed on the mesh).

  `encode_local` turns a local raw micro-batch into an encoded global one.

  The frozen encoders run in their own jit on one micro-batch at a time: their
  params are replicated inputs, never optimizer state, never donated, and
  their activations are bounded by the micro-batch, whatever the global batch.
  """
  repl = sharding.replicated(mesh)
  frozen = None if data.frozen is None else jax.device_put(data.frozen, repl)
  encoder = None if data.encoder is None else jax.jit(data.encoder)

  def encode_local(local: dict[str, Any]) -> Any:
    raw = sharding.global_batch_from_local(encode.device_keys(local), mesh)
    return raw if encoder is None else encoder(frozen, raw)

  raw_abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype, sharding=batch_sh
    ),
    encode.device_keys(data.train.element_spec),
  )
  micro_abstract = (
    raw_abstract if encoder is None else jax.eval_shape(data.encoder, data.frozen, raw_abstract)
  )
  return encode_local, micro_abstract, frozen


def setup(config: ml_collections.ConfigDict, workdir: str, stop: preemption.Preemption) -> Run:
  """Stage 1: everything the loop needs, restored or initialised, and compiled.

  `stop` is installed by the caller before the slow parts (data build,
  compile), so a SIGTERM that arrives during them still ends in a clean save
  after the first step; the caller also removes it, whether or not this raises.
  """
  check_config(config, jax.device_count())
  lead = jax.process_index() == 0
  wd = epath.Path(workdir)
  if lead:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = metrics.create_writer(workdir)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info(
    "Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size, jax.process_count()
  )
  tx, lr_fn = optim.make_optimizer(config.optim, config.max_steps)
  init_rng, _, _ = split_rngs(config.seed)
  spec, data, abstract_state, state_sh, init_params, base_sh, sample_evaluator = (
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
    lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p), out_shardings=base_sh
  )(init_params)

  manager = checkpoint.make_manager(
    os.path.join(workdir, "checkpoints"), config.keep_checkpoints, config.async_checkpointing
  )
  ckpt_abstract = {
    "train_state": _with_shardings(abstract_state, state_sh),
    "rng": jax.ShapeDtypeStruct(train_rng.shape, train_rng.dtype, sharding=repl),
  }
  restored = checkpoint.restore_latest_valid(manager, ckpt_abstract)
  if restored is None:
    state = jax.jit(
      lambda p: step_lib.init_train_state(_trained_params(config, p, init_rng), tx),
      out_shardings=state_sh,
    )(init_params)
    start_step = 0
    logging.info("No checkpoint in %s: starting from step 0.", workdir)
  else:
    start_step, ckpt, data_state = restored
    state, train_rng = ckpt["train_state"], ckpt["rng"]
    data.train.set_state(data_state)
    logging.info("Resumed from step %d in %s (data position %s).", start_step, workdir, data_state)
  del init_params

  encode_local, micro_abstract, frozen = _input_stage(mesh, data, batch_sh)
  if sample_evaluator is not None and frozen is not None:
    # The data encoder's replicated VAE / text encoders serve sampling too.
    sample_evaluator.share_encoders(frozen)
  accum = config.optim.grad_accum
  stack = jax.jit(_stack_micro_batches, out_shardings=batch_sh)

  def next_batch() -> Any:
    micro = [encode_local(next(data.train)) for _ in range(accum)]
    return micro[0] if accum == 1 else stack(micro)

  batch_abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((x.shape[0] * accum,) + x.shape[1:], x.dtype, sharding=batch_sh),
    micro_abstract,
  )
  compiled, flops, eval_batch = None, float("nan"), None
  eval_step = step_lib.jit_eval_step(spec, param_sh, base_sh, batch_sh, repl)
  if start_step < config.max_steps:  # A finished run is neither compiled nor evaluated again.
    # Ahead-of-time compile: shape/sharding errors surface before any data is
    # read, and the cost analysis gives the step's FLOPs for MFU.
    lowered = step_lib.jit_train_step(spec, state_sh, base_sh, batch_sh, repl).lower(
      state, ref_params, batch_abstract, train_rng
    )
    compiled = lowered.compile()
    # From the lowered HLO: whole-mesh FLOPs, including cuDNN/cuBLAS work that a
    # GPU-compiled cost analysis misses, and remat's recomputed forward.
    flops = lowered_flops(lowered)
    logging.info("Compiled train step: %.3g FLOPs/step (whole mesh).", flops)
    if data.eval_batch is not None:
      micro_local = jax.tree.leaves(data.train.element_spec)[0].shape[0]
      eval_batch = _encode_eval_batch(data.eval_batch, encode_local, stack, micro_local)
      # Compiled now, not at the first eval, so that `train_loop`'s start-up
      # barrier also covers it.
      eval_step = eval_step.lower(state.params, ref_params, eval_batch, eval_rng).compile()
  return Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    writer=writer,
    manager=manager,
    data=data,
    spec=spec,
    state=state,
    ref_params=ref_params,
    policy_params=jax.jit(
      lambda p, r: step_lib.policy_params(spec, p, r),
      in_shardings=(param_sh, base_sh),
      out_shardings=base_sh,
    ),
    train_rng=train_rng,
    eval_rng=eval_rng,
    start_step=start_step,
    train_step=compiled,
    eval_step=eval_step,
    eval_batch=eval_batch,
    next_batch=next_batch,
    flops=flops,
    sample_evaluator=sample_evaluator,
    stop=stop,
  )


def _encode_eval_batch(local: dict[str, Any], encode_local, stack, micro: int) -> Any:
  """The fixed eval batch, encoded in chunks of one training micro-batch (`micro`
  local rows) where it divides, so eval never needs more encoder memory than training.

  Chunk j holds local rows j, j + n, ..., so stacking the encoded chunks puts
  every row back where it was (see `_stack_micro_batches`).
  """
  size = len(next(iter(local.values())))
  n = size // micro if size > micro and size % micro == 0 else 1
  if n == 1:
    return encode_local(local)
  chunks = [{k: v[j::n] for k, v in local.items()} for j in range(n)]
  return stack([encode_local(c) for c in chunks])


def train_loop(run: Run) -> dict[str, Any]:
  """Stage 2: steps from `run.start_step + 1` to `max_steps` or a preemption notice."""
  config, writer = run.config, run.writer
  if jax.process_index() == 0 and run.start_step == 0:
    writer.write_hparams(_flat_hparams(config))
  progress = metrics.ProgressLog(config.max_steps, config.data.global_batch_size, run.start_step)
  watchdog = preemption.Watchdog(config.watchdog.factor, config.watchdog.min_seconds)
  alarm = diag_lib.DivergenceAlarm.from_config(config.alarm)
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_log_time, last_log_step = time.perf_counter(), run.start_step
  eval_metrics: dict[str, float] = {}
  preempted = False
  state = run.state
  try:
    for step in range(run.start_step + 1, config.max_steps + 1):
      batch = run.next_batch()
      if step == run.start_step + 1:
        # Every process has compiled its programs: start their first runs together.
        distributed.barrier(f"dpo_jax_first_step_{step}")
      state, m = run.train_step(state, run.ref_params, batch, run.train_rng)
      pending.append((step, m))
      if step == run.start_step + 1:
        jax.block_until_ready(m)
        if run.start_step == 0:
          # Policy = reference on a fresh run: every DPO/RPO logit must be 0,
          # else beta trains on rounding noise (see step.matched_mses).
          step_lib.check_reference_match(jax.device_get(m), run.spec)
        progress.restart_clock(step)
        watchdog.tick(step, measure=False)
        last_log_time, last_log_step = time.perf_counter(), step

      preempted = run.stop.reached(step)
      is_last = step == config.max_steps or preempted
      if step % config.log_every == 0 or is_last:
        # The only device->host sync of the loop: every pending step's metrics.
        fetched = jax.device_get(pending)
        pending = []
        now = time.perf_counter()
        watchdog.tick(step)
        pairs_per_s = (
          (step - last_log_step) * config.data.global_batch_size / (now - last_log_time)
          if step > last_log_step
          else float("nan")
        )
        last_log_time, last_log_step = now, step
        trips = []
        for s, vals in fetched:
          row = {k: float(v) for k, v in vals.items()}
          row["pairs_per_sec"] = pairs_per_s
          history.append({"step": s, **row})
          writer.write_scalars(s, {f"train/{k}": v for k, v in row.items()})
          trips.append(alarm.update(s, row))
        # Visible to `tail -f`, TensorBoard and scripts while the run goes on.
        writer.flush()
        trip = next((t for t in trips if t is not None), None)
        if trip is not None and alarm.action == "stop":
          # Saved (the state after `step`) so the diverged run can be inspected
          # or resumed with other settings; `finish` waits for the save.
          _save(run, state, step, force=True)
          raise diag_lib.DivergenceError(
            f"{trip.message} Stopped after saving step {step} (config.alarm.action='stop')."
          )
        _check_nonfinite(history[-1], config.optim.max_consecutive_nonfinite)
        progress.maybe_log(step, history[-1]["loss"], force=is_last)

      slow_work = False
      eval_now = (config.eval_every and step % config.eval_every == 0) or is_last
      if eval_now and run.eval_batch is not None:
        ev = jax.device_get(
          run.eval_step(state.params, run.ref_params, run.eval_batch, run.eval_rng)
        )
        eval_metrics = {k: float(v) for k, v in ev.items()}
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        slow_work = True

      if run.sample_evaluator and (step % config.sample_eval.every == 0 or is_last):
        policy = state.params
        if run.spec.lora_scale:  # Samples with the adapters merged in (a transient full copy).
          policy = run.policy_params(state.params, run.ref_params)
        eval_metrics.update(run.sample_evaluator(step, policy, writer))
        slow_work = True

      if step % config.checkpoint_every == 0 or is_last:
        _save(run, state, step, force=is_last)
        slow_work = True
      if slow_work:
        watchdog.tick(step, measure=False)
      if preempted:
        logging.warning(
          "Preemption: saved step %d on all processes; rerun the same command to resume.", step
        )
        break
  finally:
    watchdog.close()
  return {
    "state": state,
    "train": history[-1] if history else {},
    "eval": eval_metrics,
    "history": history,
    "flops_per_step": run.flops,
    "preempted": preempted,
    "alarms": alarm.trips,
  }


def _save(run: Run, state: Any, step: int, force: bool) -> None:
  checkpoint.save(
    run.manager,
    step,
    {"train_state": state, "rng": run.train_rng},
    run.data.train.get_state(),
    _meta(run.config, step, run.mesh),
    force=force,
  )


def finish(run: Run) -> None:
  """Stage 3: waits for the last (async) checkpoint, then closes the writers."""
  run.manager.wait_until_finished()
  run.manager.close()
  run.writer.flush()
  run.writer.close()


def use_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """Turns on JAX's persistent compilation cache in `config.compilation_cache_dir`, if set."""
  path = config.get("compilation_cache_dir", "")
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: the default skips those compiled in under a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.max_steps` optimizer steps, resuming from `workdir` if possible.

  Returns:
    {"state": final TrainState, "train": last step's metrics (host floats),
     "eval": final eval metrics, "history": list of per-step metric dicts of
     this invocation, "flops_per_step", "preempted": whether a SIGTERM /
     preemption notice ended the run early (after saving), "alarms": the
     divergence alarm's `diagnostics.Trip`s}.

  Raises:
    diagnostics.DivergenceError: the divergence alarm fired with
      `config.alarm.action="stop"` (after saving that step's checkpoint).
  """
  # Inputs first (pipeline folder, data, cache): a wrong path is an error
  # before the workdir, its config.json or any metric file exists.
  preflight.preflight(config)
  use_compilation_cache(config)
  stop = preemption.Preemption()
  try:
    with jax.debug_nans(bool(config.debug_nans)):
      run = setup(config, resolve_workdir(workdir), stop)
      try:
        if run.start_step >= config.max_steps:
          logging.info(
            "Workdir %s is already at step %d >= max_steps=%d: nothing to train.",
            run.workdir,
            run.start_step,
            config.max_steps,
          )
          result = {"state": run.state, "train": {}, "eval": {}, "history": []}
          return dict(result, flops_per_step=float("nan"), preempted=False)
        return train_loop(run)
      finally:
        finish(run)
  finally:
    # Also when set-up fails (a config mismatch, a bad input): a SIGTERM
    # handler left behind would make this process ignore termination.
    stop.close()


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
