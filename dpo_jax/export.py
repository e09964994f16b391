"""Exports a trained UNet as a PyTorch diffusers pipeline folder, without torch.

  python -m dpo_jax.export --checkpoint=WORKDIR_OR_STEP_DIR --output=DIR \
      [--base=PRETRAINED_DIR] [--dtype=float32|float16|bfloat16] [--unet_only]
      [--pretrained_variant=fp16]

writes
  DIR/unet/diffusion_pytorch_model.safetensors   the checkpoint's UNet, PyTorch names/layouts
                                                 (`.fp16.safetensors` etc. for a variant base)
  DIR/unet/config.json                           the base's UNet config
  DIR/model_index.json, vae/, text_encoder*/, tokenizer*/, scheduler/   copied from the base
  DIR/README.md                                  model card (config, step, metrics, usage)
(`--unet_only`: only `unet/`). `StableDiffusionPipeline.from_pretrained(DIR)`
(or the XL class) loads it, and so does `dpo_jax.models.loader.load_pipeline`,
which gives back the checkpoint's float32 parameters bit for bit.

A LoRA run's checkpoint (`config.lora.rank > 0`) holds only adapters; export it
with one of
  --lora    DIR/pytorch_lora_weights.safetensors, diffusers' PEFT keys
            (`unet.<module>.lora_A.weight` / `lora_B.weight`, alpha/rank folded
            into lora_B), for `pipe.load_lora_weights(DIR, weight_name=...)`
            on the base pipeline (diffusers needs weight_name when offline);
  --merge   the full UNet with W + (alpha/rank) A B merged in (base from
            `--base` or the run's `pretrained_path`), written as above.

Conversion: the loader's PyTorch -> Flax rule (`naming.torch_to_flax`:
names, conv [O,I,H,W] -> [H,W,I,O], linear .T) is run backwards. Every PyTorch
key of the base UNet (read from its safetensors header, its `.bin`, or for a
Flax msgpack base from torch's `UNet2DConditionModel` built on the meta device)
goes through the forward rule together with a probe that records the axis
permutation instead of moving data; the trained Flax tensor is then transposed
with the inverse permutation. `loader.convert_pt_state_dict` checks the result
both ways (no Flax parameter left over, no PyTorch key unmatched, every shape
equal), so a base of another architecture fails loudly instead of exporting a
half-converted UNet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax.traverse_util import flatten_dict

from dpo_jax import lora
from dpo_jax.models import loader, naming
from dpo_jax.models.unet import parse_dtype

Params = dict[str, Any]

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The file name `pipe.load_lora_weights(DIR)` looks for.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@dataclasses.dataclass(frozen=True)
class AxesProbe:
  """Stands in for a PyTorch tensor in the forward rule and records its transposes.

  The value the rule returns is `pt_tensor.transpose(axes)`; only `shape`,
  `ndim`, `.T` and `.transpose` are used by the diffusers rule, so no data moves.
  """

  key: str
  shape: tuple[int, ...]
  axes: tuple[int, ...]

  @classmethod
  def of(cls, key: str, shape: Sequence[int]) -> AxesProbe:
    return cls(key, tuple(int(d) for d in shape), tuple(range(len(shape))))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def T(self) -> AxesProbe:  # noqa: N802 - numpy's name.
    return self.transpose(*reversed(range(self.ndim)))

  def transpose(self, *axes: int) -> AxesProbe:
    return AxesProbe(
      self.key, tuple(self.shape[a] for a in axes), tuple(self.axes[a] for a in axes)
    )


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{key: shape} from a safetensors header (no tensor is read)."""
  with safetensors.safe_open(path, framework="numpy") as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _torch_unet_shapes(config_path: str) -> dict[str, tuple[int, ...]]:
  """{key: shape} of torch's `UNet2DConditionModel` for a config (meta device: no memory)."""
  try:
    import diffusers
    import torch
  except ImportError as e:
    raise ImportError(
      f"The base UNet next to {config_path} is a Flax msgpack, so the PyTorch key names come "
      "from torch's UNet2DConditionModel, which needs torch (`pip install torch`); or pass "
      "--base=DIR with a safetensors / .bin UNet of the same architecture."
    ) from e
  with open(config_path) as f:
    config = json.load(f)
  with torch.device("meta"):
    model = diffusers.UNet2DConditionModel.from_config(config)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def pytorch_unet_shapes(unet_dir: str, variant: str | None = None) -> dict[str, tuple[int, ...]]:
  """{PyTorch key: shape} that diffusers' `UNet2DConditionModel` reads for `unet_dir`.

  Taken from the folder's own weights (safetensors header, sharded index, or
  `.bin`; the `variant` files, e.g. "fp16", when given), or, for Flax msgpack
  weights, from torch's model built from `config.json`.
  """
  path = loader.find_weights(unet_dir, loader.DIFFUSERS_WEIGHTS, variant)
  if path.endswith(".msgpack"):
    return _torch_unet_shapes(os.path.join(unet_dir, "config.json"))
  shapes = {}
  for f in loader.weight_files(path):
    if f.endswith(".safetensors"):
      shapes.update(_safetensors_shapes(f))  # Header only: no tensor is read.
    else:  # .bin (needs torch)
      shapes.update({k: v.shape for k, v in loader.read_state_dict(f).items()})
  return shapes


def to_pytorch_state_dict(
  params: Params, pt_shapes: dict[str, tuple[int, ...]], source: str, target: str
) -> dict[str, np.ndarray]:
  """Flax UNet params -> {PyTorch key: contiguous numpy array in PyTorch layout}.

  Args:
    params: the UNet's nested Flax params (any array type).
    pt_shapes: the PyTorch keys and shapes to produce (`pytorch_unet_shapes`).
    source, target: names of the key list and of the params, for error messages.

  Raises:
    ValueError: a key that the rule maps nowhere, a parameter left over, or a
      shape mismatch (the base is not the checkpoint's architecture).
  """
  probes = {k: AxesProbe.of(k, s) for k, s in pt_shapes.items()}
  mapping = loader.convert_pt_state_dict(probes, params, naming.torch_to_flax, source, target)
  unmatched = sorted(set(pt_shapes) - {p.key for p in mapping.values()})
  if unmatched:  # Keys the loader drops as buffers would otherwise vanish silently.
    raise ValueError(f"{source}: no Flax parameter for PyTorch keys {unmatched[:5]}.")
  flat = flatten_dict(params)
  state = {}
  for flax_key, probe in mapping.items():
    value = np.asarray(jax.device_get(flat[flax_key]))
    state[probe.key] = np.ascontiguousarray(np.transpose(value, np.argsort(probe.axes)))
  return state


def cast_state_dict(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
  """Floating tensors -> `dtype` ("float32" | "float16" | "bfloat16", ml_dtypes bfloat16)."""
  target = np.dtype(parse_dtype(dtype))
  return {
    k: v.astype(target, copy=False) if jnp.issubdtype(v.dtype, jnp.floating) else v
    for k, v in state.items()
  }


def _pytorch_class_name(name: str) -> str:
  """Drops a "Flax" class-name prefix (a Flax base's UNet): the exported weights are PyTorch's."""
  return name.removeprefix("Flax")


def write_unet(
  params: Params,
  base_unet_dir: str,
  output_dir: str,
  dtype: str,
  target: str,
  variant: str | None = None,
) -> str:
  """Writes `output_dir/{config.json, diffusion_pytorch_model[.variant].safetensors}`.

  With a `variant` base (e.g. a hub folder holding only `*.fp16.*` files) the
  key names come from the base's variant file, and the UNet is written under
  the same variant name, so the exported folder loads with the variant its
  other (copied) components need. Returns the weights file.
  """
  config_path = os.path.join(base_unet_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"Missing file {config_path}.")
  shapes = pytorch_unet_shapes(base_unet_dir, variant)
  state = cast_state_dict(to_pytorch_state_dict(params, shapes, base_unet_dir, target), dtype)
  os.makedirs(output_dir, exist_ok=True)
  with open(config_path) as f:
    config = json.load(f)
  name = config.get("_class_name", "UNet2DConditionModel")
  if name == _pytorch_class_name(name):
    shutil.copyfile(config_path, os.path.join(output_dir, "config.json"))
  else:  # A Flax base: the exported weights are PyTorch's.
    config["_class_name"] = _pytorch_class_name(name)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
  path = os.path.join(output_dir, loader.add_variant(UNET_WEIGHTS, variant))
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
  return path


def copy_components(base: str, output: str) -> list[str]:
  """Copies `model_index.json` and every component but the UNet; returns their names."""
  with open(os.path.join(base, "model_index.json")) as f:
    index = json.load(f)
  names = [
    k
    for k, v in index.items()
    if not k.startswith("_") and isinstance(v, list) and v[0] is not None and k != "unet"
  ]
  for name in names:
    src = os.path.join(base, name)
    if not os.path.isdir(src):
      raise FileNotFoundError(f"Missing folder {src} (listed in {base}/model_index.json).")
    shutil.copytree(src, os.path.join(output, name))
  if isinstance(index.get("unet"), list):
    index["unet"] = [index["unet"][0], _pytorch_class_name(index["unet"][1])]
  with open(os.path.join(output, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return names


def final_metrics(step_dir: str, step: int) -> list[dict[str, Any]]:
  """The last `train/*` and the last `eval/*` rows of the workdir's metrics.jsonl up to `step`.

  `step_dir` is `<workdir>/checkpoints/<step>`; rows after `step` (a run that
  went on after the exported checkpoint) are ignored. [] without metrics.jsonl.
  """
  path = epath.Path(step_dir).parent.parent / "metrics.jsonl"  # Local or gs://.
  if not path.is_file():
    return []
  last = {}
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    row = json.loads(line)
    if row.get("step", 0) > step:
      continue
    for prefix in ("train/", "eval/"):
      if any(k.startswith(prefix) for k in row):
        last[prefix] = row
  return list(last.values())


def _metrics_table(rows: list[dict[str, Any]]) -> str:
  if not rows:
    return "No metrics.jsonl next to the checkpoint.\n"
  fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)
  lines = ["| step | metric | value |", "|---|---|---|"]
  lines += [f"| {r['step']} | {k} | {fmt(v)} |" for r in rows for k, v in r.items() if k != "step"]
  return "\n".join(lines) + "\n"


def model_card(
  meta: dict[str, Any],
  step_dir: str,
  base: str,
  kind: str,
  dtype: str,
  metrics: list,
  variant: str = "",
) -> str:
  """README.md text: what was trained, for how long, the last metrics and how to load it."""
  config = meta.get("config", {})
  cls = PIPELINE_CLASSES[kind]
  # Both loaders take the same argument: the folder holds only `variant` files.
  with_variant = f", variant={variant!r}" if variant else ""
  tags = ["diffusers", "text-to-image", "stable-diffusion" + ("-xl" if kind == "sdxl" else "")]
  summary = ", ".join(
    f"{k}={config[k]}" for k in ("objective", "beta", "max_steps", "seed") if k in config
  )
  return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [{", ".join(tags + ["diffusion-dpo", "dpo_jax"])}]
---

# {kind.upper()} UNet fine-tuned with dpo_jax

The UNet of `{base}` after **{meta.get("step")} steps** of preference tuning with
dpo_jax ({summary}); every other component is the base's.
Exported from `{step_dir}` in {dtype}.

## Final metrics

{_metrics_table(metrics)}
## How to load

PyTorch diffusers:

```python
import torch
from diffusers import {cls}

pipe = {cls}.from_pretrained("PATH_TO_THIS_FOLDER", torch_dtype=torch.{dtype}{with_variant})
image = pipe("a photo of an astronaut riding a horse").images[0]
```

dpo_jax (JAX): `dpo_jax.models.loader.load_pipeline("PATH_TO_THIS_FOLDER"{with_variant})`, then
`dpo_jax.sample.generate(pipeline, pipeline.unet_params, prompts, seeds)`.

## Training config

```json
{json.dumps(config, indent=2, sort_keys=True)}
```
"""


def export(
  checkpoint_path: str,
  output: str,
  base: str | None = None,
  dtype: str = "float32",
  unet_only: bool = False,
  variant: str | None = None,
  mode: str = "",
) -> str:
  """Writes the checkpoint's UNet (and the base's other components) as a diffusers folder.

  Args:
    checkpoint_path: training workdir, its `checkpoints/`, or a step folder.
    output: folder to write; must not exist or be empty.
    base: diffusers folder of the run's base (default: the run's
      `config.pretrained_path` from the checkpoint meta).
    dtype: "float32" (lossless), "float16" or "bfloat16" for the UNet tensors.
    unet_only: write only `output/unet/`.
    variant: weights variant of the base's files, e.g. "fp16" ("" = the plain
      files; default None: the run's `config.pretrained_variant`). The UNet is
      written under the same variant name.
    mode: for a LoRA run's checkpoint, "lora" (only the adapters, PEFT format)
      or "merge" (the full UNet with the adapters merged in); "" otherwise.

  Returns:
    `output`.
  """
  from dpo_jax import checkpoint  # Imports orbax; kept out of the conversion helpers.

  parse_dtype(dtype)  # A typo fails before minutes of loading.
  if os.path.isdir(output) and os.listdir(output):
    raise FileExistsError(f"{output} is not empty; choose a new --output folder.")
  step_dir = checkpoint.resolve_step_dir(checkpoint_path)
  params, meta = checkpoint.load_params_for_inference(step_dir)
  run_config = meta.get("config", {})
  base = base or run_config.get("pretrained_path", "")
  if variant is None:
    variant = run_config.get("pretrained_variant", "")
  lora_scale = _lora_scale(run_config, mode, step_dir)
  if mode == "lora":
    return write_lora(params, lora_scale, output, dtype, base, variant)
  if not base:
    raise ValueError(
      f"The run of {step_dir} started from a random UNet (no pretrained_path); pass --base=DIR, "
      "a diffusers folder whose UNet has the checkpoint's architecture."
    )
  if not os.path.isdir(base):
    raise FileNotFoundError(f"No base pipeline folder at {base}.")
  kind = None if unet_only else loader.detect_kind(base)  # Checks model_index.json early.
  target = os.path.join(step_dir, "state")
  if mode == "merge":
    _, base_params = loader.load_unet(os.path.join(base, "unet"), variant=variant or None)
    params = lora.merge(base_params, params, lora_scale)
    del base_params
  write_unet(
    params, os.path.join(base, "unet"), os.path.join(output, "unet"), dtype, target, variant
  )
  if unet_only:
    return output
  copy_components(base, output)
  metrics = final_metrics(step_dir, meta["step"])
  card = model_card(meta, step_dir, base, kind, dtype, metrics, variant)
  with open(os.path.join(output, "README.md"), "w") as f:
    f.write(card)
  return output


def _lora_scale(run_config: dict[str, Any], mode: str, step_dir: str) -> float:
  """alpha / rank of a LoRA run (0.0 for a full fine-tune), checked against `mode`."""
  if mode not in ("", "lora", "merge"):
    raise ValueError(f"mode={mode!r}; expected '', 'lora' or 'merge'.")
  lora_scale = lora.scale(run_config)
  if not lora_scale and mode:
    raise ValueError(
      f"--{mode} needs a LoRA run's checkpoint, but {step_dir} was trained without LoRA "
      "(config.lora.rank = 0); export it without --lora / --merge."
    )
  if lora_scale and not mode:
    raise ValueError(
      f"{step_dir} holds LoRA adapters only (config.lora.rank = "
      f"{run_config['lora']['rank']}); pass --lora for a diffusers LoRA file or --merge for a "
      "full UNet."
    )
  return lora_scale


def write_lora(
  adapters: Params,
  lora_scale: float,
  output: str,
  dtype: str = "float32",
  base: str = "",
  variant: str | None = None,
) -> str:
  """Writes `output/pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(output)`.

  When the base folder is known, every adapted module is checked against the
  base UNet's PyTorch keys first, so a LoRA for another architecture fails
  here rather than as "unexpected keys" warnings in PyTorch.
  """
  state = lora.to_peft_state_dict(adapters, lora_scale)
  if base and os.path.isdir(os.path.join(base, "unet")):
    known = pytorch_unet_shapes(os.path.join(base, "unet"), variant or None)
    for key, value in state.items():
      if key.endswith(".lora_A.weight"):
        module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        want = known.get(f"{module}.weight")
        if want is None or want[1] != value.shape[1]:
          raise ValueError(
            f"LoRA adapter for {module} (input {value.shape[1:]}) does not fit the base UNet "
            f"in {base}/unet ({'no such module' if want is None else want}); pass the run's base "
            "with --base."
          )
  os.makedirs(output, exist_ok=True)
  path = os.path.join(output, LORA_WEIGHTS)
  safetensors.numpy.save_file(cast_state_dict(state, dtype), path, metadata={"format": "pt"})
  return output


def main(argv: Sequence[str]) -> None:
  """`python -m dpo_jax.export`: see the module docstring."""
  from absl import flags

  from dpo_jax import logs

  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  f = flags.FLAGS
  if f.lora and f.merge:
    raise ValueError("Pass at most one of --lora and --merge.")
  mode = "lora" if f.lora else "merge" if f.merge else ""
  path = export(
    f.checkpoint, f.output, f.base or None, f.dtype, f.unet_only, f.pretrained_variant, mode
  )
  what = "a diffusers LoRA" if mode == "lora" else "the UNet" if f.unet_only else "a pipeline"
  print(f"Wrote {what} to {path}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string(
    "checkpoint", None, "Training workdir, its checkpoints/ or a step folder.", required=True
  )
  flags.DEFINE_string("base", "", "Diffusers folder of the base (default: the run's).")
  flags.DEFINE_string("output", None, "Output folder (new or empty).", required=True)
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "UNet tensor dtype.")
  flags.DEFINE_bool("unet_only", False, "Write only unet/ (no other components, no README).")
  flags.DEFINE_bool(
    "lora", False, f"LoRA run: write only the adapters as {LORA_WEIGHTS} (diffusers/PEFT)."
  )
  flags.DEFINE_bool("merge", False, "LoRA run: write the full UNet with the adapters merged.")
  flags.DEFINE_string(
    "pretrained_variant",
    None,
    "Weights variant of the base's files, e.g. fp16 ('' = the plain files; default: the run's "
    "config.pretrained_variant). The UNet is written under the same variant name.",
  )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
