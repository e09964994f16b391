"""One parameter naming for every model: the PyTorch state-dict key, in Flax form.

A Flax parameter path is the PyTorch key split at ".", with two changes that
linen forces on us and nothing else:

  * a numeric segment is glued to the segment before it with "_" (linen names
    a list of submodules `down_blocks_0`, ...):
    `down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight`
    -> `down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel`;
  * the leaf: a Dense or Conv `weight` is a `kernel` in Flax layout (Dense
    [out, in] -> [in, out]; Conv [O, I, kh, kw] -> [kh, kw, I, O]), a 1-D norm
    `weight` is a `scale` and an embedding table's `weight` an `embedding`.

Loading (`loader.convert_pt_state_dict`), export (which runs `torch_to_flax`
over the PyTorch key set it writes, see `export.AxesProbe`), sharding rules,
remat and adapters all use these paths, so a regex written against the
diffusers/transformers key names ("attn1/to_q") means the same thing here.

Two kinds of old names are accepted on the way in:
  * PyTorch VAE checkpoints saved before diffusers 0.14 name the mid-block
    attention `query/key/value/proj_attn`;
  * Flax msgpack VAEs written with diffusers' Flax `AutoencoderKL` used the
    same four names; `legacy_flax_path` maps them. (diffusers' Flax UNet already
    used our names, so dpo_jax training checkpoints need no mapping.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Path = tuple[str, ...]

# Pre-0.14 diffusers attention names (PyTorch VAE files, old Flax trees) -> ours.
LEGACY_ATTENTION_NAMES = {
  "query": "to_q",
  "key": "to_k",
  "value": "to_v",
  "proj_attn": "to_out_0",
}


def flax_module_path(pt_key: str) -> Path:
  """`"a.0.b.weight"` -> `("a_0", "b", "weight")`: the dotted key with numbers glued on."""
  parts: list[str] = []
  for part in pt_key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts)


def torch_to_flax(pt_key: str, tensor: Any, expected: Mapping[Path, Any]) -> tuple[Path, Any]:
  """One PyTorch tensor -> (Flax path, tensor in Flax layout).

  Args:
    pt_key: the state-dict key, e.g. "mid_block.attentions.0.proj_in.weight".
    tensor: anything with `.ndim`, `.T` and `.transpose` (numpy arrays; export
      passes shape probes).
    expected: `flatten_dict` of the module's (abstract) parameters. It decides
      only between a Dense `kernel` and an Embed `embedding`, and lets a legacy
      attention name map to ours.

  Returns:
    The Flax path (may be absent from `expected`: the caller reports it as an
    unexpected tensor) and the tensor, transposed where the layouts differ.
  """
  path = flax_module_path(pt_key)
  if len(path) >= 2 and path[-2] in LEGACY_ATTENTION_NAMES:
    path = path[:-2] + (LEGACY_ATTENTION_NAMES[path[-2]], path[-1])
  module, leaf = path[:-1], path[-1]
  if leaf != "weight":
    return path, tensor
  if module + ("embedding",) in expected:
    return module + ("embedding",), tensor
  if tensor.ndim == 4:
    return module + ("kernel",), tensor.transpose(2, 3, 1, 0)
  if tensor.ndim == 2:
    return module + ("kernel",), tensor.T
  if tensor.ndim == 1:
    return module + ("scale",), tensor
  return path, tensor


def legacy_flax_path(path: Path) -> Path:
  """A parameter path written with diffusers' old Flax attention names -> ours."""
  return tuple(LEGACY_ATTENTION_NAMES.get(part, part) for part in path)
