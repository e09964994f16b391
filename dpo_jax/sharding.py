"""The one place that decides how arrays are laid out over the device mesh.

Mesh axes:
  data: pure data parallelism (parameters replicated along it).
  fsdp: data parallelism *and* parameter/optimizer-state sharding (ZeRO-3
        style): each large array is split along one dimension over `fsdp` and
        all-gathered by XLA just before use.
The batch is split over both axes, so every device sees a distinct slice.

The stock diffusers Flax UNet carries no logical-axis annotations, so arrays
are matched by regex on their "/"-joined pytree path (big_vision style). The
same rules apply to optimizer state, whose paths end with the parameter path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Fills in a single -1 and checks that data * fsdp == num_devices."""
  dims = [data, fsdp]
  if dims.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}.")
  if -1 in dims:
    known = int(np.prod([d for d in dims if d != -1]))
    if known <= 0 or num_devices % known:
      raise ValueError(f"Cannot fill mesh data={data}, fsdp={fsdp} on {num_devices} devices.")
    dims[dims.index(-1)] = num_devices // known
  if dims[0] * dims[1] != num_devices or min(dims) < 1:
    raise ValueError(
      f"Mesh data={dims[0]} x fsdp={dims[1]} = {dims[0] * dims[1]} devices, but "
      f"{num_devices} are available; set config.mesh.data/fsdp (-1 = the rest)."
    )
  return dims[0], dims[1]


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp") mesh; fsdp is the fastest-varying (ICI-local) axis."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = resolve_mesh_shape(data, fsdp, len(devices))
  # Auto axes: XLA's sharding propagation decides intermediate layouts from the
  # parameter/batch shardings given here (no sharding-in-types).
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    # Topology-aware ordering on TPU/GPU; a plain reshape for a device subset.
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES, axis_types=axis_types)


def path_to_str(path: tuple[Any, ...]) -> str:
  """ "/"-joined pytree key path, e.g. "params/down_blocks_0/resnets_0/conv1/kernel"."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Shards the largest dimension divisible by the fsdp axis; else replicates."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def _explicit_spec(text: str, ndim: int) -> P:
  names = [None if n.strip() in ("None", "") else n.strip() for n in text.split(",")]
  if len(names) != ndim:
    raise ValueError(f"Sharding spec {text!r} has {len(names)} entries for a rank-{ndim} array.")
  return P(*names)


def spec_for(
  path: str,
  shape: tuple[int, ...],
  rules: Sequence[tuple[str, str]],
  mesh: Mesh,
  min_size: int,
) -> P:
  """PartitionSpec for one array: the first rule whose regex matches `path`."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if spec == "replicate" or not shape:
        return P()
      if spec == "fsdp":
        return _fsdp_spec(shape, mesh.shape["fsdp"], min_size)
      return _explicit_spec(spec, len(shape))
  return P()


def tree_shardings(
  tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]], min_size: int = 2**14
) -> Any:
  """NamedShardings for every leaf of an (abstract) pytree, by path rules."""

  def leaf_sharding(path, leaf):
    return NamedSharding(
      mesh, spec_for(path_to_str(path), tuple(leaf.shape), rules, mesh, min_size)
    )

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_layout(batch: int, grad_accum: int, num_devices: int, name: str) -> int:
  """-> pairs per micro-batch; raises unless every device gets the same whole number.

  The batch axis is split over every device of the mesh, one micro-batch
  (`batch / grad_accum` pairs) at a time. A micro-batch that does not split
  evenly would be resharded by XLA behind the user's back (2048 pairs,
  accumulation 128, 64 chips: 16-pair micro-batches on 64 devices), so it is
  an error that proposes values that work.
  """
  if batch % grad_accum == 0 and (batch // grad_accum) % num_devices == 0:
    return batch // grad_accum
  accums = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % num_devices == 0]
  unit = grad_accum * num_devices
  sizes = sorted({max(unit, batch // unit * unit), -(-batch // unit) * unit})
  per = (
    f"{batch} / {grad_accum} = {batch / grad_accum:g} pairs per micro-batch"
    if grad_accum > 1
    else f"{batch} pairs"
  )
  fix = f"{name} in {sizes} (multiples of {grad_accum} x {num_devices})"
  if grad_accum > 1 and accums:
    fix = f"optim.grad_accum in {accums[:8]}, or {fix}"
  raise ValueError(
    f"{name}: {per} do not split evenly over the {num_devices} devices "
    f"of the mesh (each device needs the same whole number of pairs). Use {fix}."
  )


def global_batch_from_local(batch: Any, mesh: Mesh) -> Any:
  """Assembles per-process numpy batches into global jax.Arrays split over the mesh.

  Each process passes only its own rows (global_batch / process_count); on a
  single host this is the whole batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
