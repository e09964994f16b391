"""LoRA adapters: a trained low-rank update on a frozen base UNet.

With `config.lora.rank > 0` the policy is `merge(base, adapters)`: every
kernel whose "/"-joined path fully matches `config.lora.targets` becomes

    W' = W + (alpha / rank) * A @ B        A: kernel.shape[:-1] + (rank,), B: [rank, out]

(a Conv kernel [kh, kw, I, O] gets A [kh, kw, I, r], B [r, O]: PEFT's
conv LoRA, a kh x kw conv to r channels followed by a 1x1 conv). B starts at 0,
so the policy starts equal to the base bit for bit; A starts like PEFT's
default (`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))).

The reference of DPO is then the same base with the adapters off: the trainer
keeps one copy of the base (the reference params) and the train state holds
only the adapters, so the optimizer state and checkpoints hold only adapter
tensors. The merge runs inside the jitted step, on the sharded base, so
sharding rules and remat apply to the merged tree as to any UNet params.

Adapter tree layout: the base's nested dict restricted to the targets, each
target kernel replaced by `{"lora_A": A, "lora_B": B}`; its paths are the
kernel's path + "/lora_A" (sharding rules see those).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# The diffusers DPO LoRA script's `target_modules=["to_k", "to_q", "to_v", "to_out.0"]`:
# every attention projection (self and cross) of the UNet's transformer blocks.
DEFAULT_TARGETS = r".*/(to_q|to_k|to_v|to_out_0)/kernel"
# Adds every convolution except the UNet's first and last (whose channel counts
# are the latent's, 4): the "convolutions optional" variant.
CONV_TARGETS = (
  r".*/(to_q|to_k|to_v|to_out_0|conv1|conv2|conv_shortcut|conv|proj_in|proj_out)/kernel"
)

Params = dict[str, Any]


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.lora` turns LoRA on (rank > 0)."""
  return "lora" in config and int(config.lora.rank) > 0


def scale(config: Mapping[str, Any]) -> float:
  """alpha / rank, 0.0 without LoRA; `alpha` 0 means alpha = rank (scale 1, as diffusers' script).

  `config`: a run's ConfigDict, or the dict a checkpoint's meta holds (what
  sampling and export read): > 0 means the saved params are adapters only, to
  be merged into the run's base UNet.
  """
  cfg = config.get("lora") or {}
  rank = int(cfg.get("rank", 0))
  if rank <= 0:
    return 0.0
  return (float(cfg.get("alpha", 0.0)) or float(rank)) / rank


def target_paths(params: Params, targets: str) -> list[tuple[str, ...]]:
  """Paths of the kernels `targets` (a regex over "/"-joined paths) fully matches, sorted.

  Raises:
    ValueError: when nothing matches (an adapter on nothing trains nothing).
  """
  pattern = re.compile(targets)
  found = sorted(
    p for p, v in flatten_dict(params).items() if pattern.fullmatch("/".join(p)) and v.ndim >= 2
  )
  if not found:
    some = sorted("/".join(p) for p in flatten_dict(params))[:3]
    raise ValueError(
      f"config.lora.targets={targets!r} matches no parameter of rank >= 2 (paths look like "
      f"{some}); write a regex over those '/'-joined paths, e.g. {DEFAULT_TARGETS!r}."
    )
  return found


def init_adapters(params: Params, rng: jax.Array, rank: int, targets: str) -> Params:
  """A (PEFT's kaiming-uniform) and B = 0 for every target kernel of `params`, float32.

  Works on abstract params too (inside `jax.eval_shape`): only shapes are read.
  """
  if rank < 1:
    raise ValueError(f"config.lora.rank={rank}; LoRA needs rank >= 1 (0 turns it off).")
  flat = flatten_dict(params)
  out = {}
  for i, path in enumerate(target_paths(params, targets)):
    shape = tuple(flat[path].shape)
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(
      jax.random.fold_in(rng, i), shape[:-1] + (rank,), jnp.float32, -bound, bound
    )
    out[path + ("lora_A",)] = a
    out[path + ("lora_B",)] = jnp.zeros((rank, shape[-1]), jnp.float32)
  return unflatten_dict(out)


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """A [..., r] @ B [r, out] -> [..., out] in float32 (HIGHEST: no bf16 passes on TPU)."""
  return jnp.tensordot(
    a.astype(jnp.float32), b.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST
  )


def merge(base: Params, adapters: Params, lora_scale: float) -> Params:
  """W + scale * A @ B for every adapted kernel; every other leaf is the base's own array.

  The merged kernel keeps the base's dtype, so the policy's weights are the
  reference's where B = 0 (W + 0 rounds back to W exactly).
  """
  flat = dict(flatten_dict(base))
  ad = flatten_dict(adapters)
  for path in {p[:-1] for p in ad}:
    if path not in flat:
      raise KeyError(f"LoRA adapter for {'/'.join(path)}, a path the base UNet does not have.")
    w = flat[path]
    d = delta(ad[path + ("lora_A",)], ad[path + ("lora_B",)])
    flat[path] = (w.astype(jnp.float32) + lora_scale * d).astype(w.dtype)
  return unflatten_dict(flat)


def full_unet(run_config: Mapping[str, Any], params: Params, base_unet: Params) -> Params:
  """The UNet a run's trained params stand for: themselves, or base + merged adapters (LoRA).

  `run_config`: the run's config (a ConfigDict, or the dict checkpoint meta holds).
  """
  lora_scale = scale(run_config)
  return merge(base_unet, params, lora_scale) if lora_scale else params


def num_params(adapters: Params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


# ---- PEFT / diffusers format ------------------------------------------------------------------


def _torch_module_key(path: tuple[str, ...]) -> str:
  """Flax module path -> the diffusers module key ("to_out_0" -> "to_out.0")."""
  parts = []
  for part in path:
    m = re.fullmatch(r"(.+)_(\d+)", part)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else part)
  return ".".join(parts)


def to_peft_state_dict(
  adapters: Params, lora_scale: float, prefix: str = "unet"
) -> dict[str, np.ndarray]:
  """Adapters -> diffusers' PEFT keys (`unet.<module>.lora_A.weight` / `lora_B.weight`).

  alpha / rank is folded into B: diffusers builds a PEFT config with
  lora_alpha = rank (scale 1) for a PEFT-format state dict, so the loaded
  layer computes W x + B (A x) with our scaled B, the same function.
  Linear: lora_A [r, in], lora_B [out, r]; Conv: lora_A [r, I, kh, kw],
  lora_B [O, r, 1, 1].
  """
  out = {}
  ad = flatten_dict(adapters)
  for path in sorted({p[:-1] for p in ad}):
    a = np.asarray(ad[path + ("lora_A",)], np.float32)
    b = np.asarray(ad[path + ("lora_B",)], np.float32) * np.float32(lora_scale)
    key = f"{prefix}.{_torch_module_key(path[:-1])}"  # Drop the "kernel" leaf.
    if a.ndim == 2:  # Dense: Flax [in, r] -> torch [r, in].
      a_t, b_t = a.T, b.T
    elif a.ndim == 4:  # Conv: Flax [kh, kw, I, r] -> torch [r, I, kh, kw].
      a_t, b_t = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    else:
      raise ValueError(f"No PEFT layout for a rank-{a.ndim} adapter at {'/'.join(path)}.")
    out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_t)
    out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_t)
  return out
