"""Checks a diffusers folder in dpo_jax against PyTorch diffusers / transformers.

  python -m dpo_jax.tools.parity --pretrained_path=DIR \
      [--components=unet,vae,text_encoder,text_encoder_2] [--dtype=float32] [--atol=1e-4]

Loads each component of the pipeline folder DIR twice, in PyTorch (diffusers'
`UNet2DConditionModel` / `AutoencoderKL`, transformers' `CLIPTextModel[WithProjection]`)
and in dpo_jax (`models.loader`), runs both on the same seeded random inputs
and prints, per output, the max abs difference, the max abs reference value
and pass/fail (diff <= atol + rtol * max|ref|). Exit status 1 if any output
fails (or dpo_jax refuses a component's config), 2 on a usage error. This is
the check to run on a new checkpoint before spending accelerator hours on it.

Outputs compared:
  unet            the prediction for noisy latents, timesteps, context (and
                  SDXL's text_embeds / time_ids).
  vae             encode: the posterior mean of images in [-1, 1]; decode: images
                  from random latents (both unscaled).
  text_encoder    last_hidden_state and pooler_output (`models.conditioning.
                  encode_prompt_sd15`), and with a `text_encoder_2` the penultimate
                  hidden state SDXL uses;
  text_encoder_2  penultimate hidden state and projected text_embeds
                  (`encode_prompt_sdxl`).
Text encoders get random token ids between a start and an end token.

Needs the torch extra (`pip install 'dpo_jax[torch]'`: torch, diffusers,
transformers). Matmuls run at full float32 precision on every backend
(jax_default_matmul_precision=highest; TPUs default to bfloat16 passes).
Defaults keep spatial sizes small (latents <= 32 x 32, images <= 64 x 64) so
that SDXL checks in minutes on a CPU: the same weights and operations run at
any size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpo_jax import logs

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DTYPES = ("float32", "bfloat16", "float16")
SEQUENCE_LENGTH = 77


@dataclasses.dataclass(frozen=True)
class Row:
  """One compared output. `error` is set when dpo_jax refused the component."""

  component: str
  output: str
  max_abs_diff: float
  max_abs_ref: float
  passed: bool
  error: str = ""


def require_torch() -> tuple[Any, Any, Any]:
  """(torch, diffusers, transformers), or an ImportError saying how to install them."""
  try:
    import diffusers
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(
      f"dpo_jax.tools.parity compares against PyTorch diffusers / transformers, which are not "
      f"installed ({e}); install them with: pip install 'dpo_jax[torch]'."
    ) from None
  return torch, diffusers, transformers


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Missing file {path}.")
  with open(path) as f:
    return json.load(f)


def present_components(path: str) -> list[str]:
  """The components of `COMPONENTS` that `path/model_index.json` lists (not null)."""
  index = _read_json(os.path.join(path, "model_index.json"))
  return [
    c for c in COMPONENTS if isinstance(index.get(c), list) and index[c] and index[c][0] is not None
  ]


def _with_projection(path: str, name: str) -> bool:
  """Whether text encoder `name` is a CLIPTextModelWithProjection (SDXL's second encoder)."""
  index = _read_json(os.path.join(path, "model_index.json"))
  entry = index.get(name) or [None, None]
  if entry[1] is not None:
    return entry[1] == "CLIPTextModelWithProjection"
  config = _read_json(os.path.join(path, name, "config.json"))
  return "CLIPTextModelWithProjection" in config.get("architectures", [])


def _compare(component: str, output: str, got: Any, want: np.ndarray, atol: float, rtol: float):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    msg = f"shape {got.shape} != PyTorch's {want.shape}"
    return Row(component, output, float("nan"), float("nan"), False, msg)
  diff = float(np.abs(got - want).max())
  ref = float(np.abs(want).max())
  # NaN compares False: a NaN on either side fails.
  return Row(component, output, diff, ref, bool(diff <= atol + rtol * ref))


def _jax_dtype(name: str):
  import jax.numpy as jnp

  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _torch_float(torch: Any, x: Any) -> np.ndarray:
  return x.detach().to(torch.float32).cpu().numpy()


# ----------------------------------------------------------------------------- components


def _unet_inputs(config: dict[str, Any], rng: np.random.Generator, latent_size: int):
  """Seeded UNet inputs: x [2, C, s, s], t [2], context [2, 77, D], SDXL added cond or None."""
  cross = config.get("cross_attention_dim", 1280)
  if not isinstance(cross, int):
    raise ValueError(f"unet/config.json: cross_attention_dim={cross!r}; expected one int.")
  levels = len(config.get("block_out_channels", (320, 640, 1280, 1280)))
  factor = 2 ** (levels - 1)
  size = min(int(config.get("sample_size", 64)), latent_size)
  size = max(factor, size // factor * factor)
  x = rng.standard_normal((2, config.get("in_channels", 4), size, size)).astype(np.float32)
  t = np.array([rng.integers(0, 100), rng.integers(500, 1000)], np.int64)
  context = rng.standard_normal((2, SEQUENCE_LENGTH, cross)).astype(np.float32)
  added = None
  if config.get("addition_embed_type") == "text_time":
    n_time = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
    text_dim = config["projection_class_embeddings_input_dim"]
    text_dim -= n_time * config["addition_time_embed_dim"]
    px = 8 * size
    added = {
      "text_embeds": rng.standard_normal((2, text_dim)).astype(np.float32),
      "time_ids": np.array([[px, px, 0, 0, px, px], [2 * px, px, 16, 8, px, px]], np.float32),
    }
  elif config.get("addition_embed_type") is not None:
    raise ValueError(
      f"unet/config.json: addition_embed_type={config['addition_embed_type']!r} is not "
      "implemented (only None and 'text_time')."
    )
  return x, t, context, added


def check_unet(path: str, variant: str | None, dtype: str, inputs_seed: int, latent_size: int):
  """-> ({output: PyTorch array}, callable running dpo_jax on the same inputs)."""
  torch, diffusers, _ = require_torch()
  directory = os.path.join(path, "unet")
  config = _read_json(os.path.join(directory, "config.json"))
  x, t, context, added = _unet_inputs(config, np.random.default_rng(inputs_seed), latent_size)
  tdtype = getattr(torch, dtype)
  model = diffusers.UNet2DConditionModel.from_pretrained(directory, variant=variant)
  model = model.to(tdtype).eval()
  with torch.no_grad():
    t_added = None
    if added is not None:
      t_added = {k: torch.from_numpy(v).to(tdtype) for k, v in added.items()}
    want = model(
      torch.from_numpy(x).to(tdtype),
      torch.from_numpy(t),
      encoder_hidden_states=torch.from_numpy(context).to(tdtype),
      added_cond_kwargs=t_added,
    ).sample
  want = {"sample": _torch_float(torch, want)}
  del model

  def ours():
    import jax

    from dpo_jax.models import loader
    from dpo_jax.models import unet as unet_lib

    jd = _jax_dtype(dtype)
    module, params = loader.load_unet(directory, variant=variant, param_dtype=jd, dtype=jd)
    apply = jax.jit(unet_lib.make_unet_apply(module))
    j_added = None if added is None else {k: v.astype(jd) for k, v in added.items()}
    out = apply(params, x.astype(jd), t.astype(np.int32), context.astype(jd), j_added)
    return {"sample": np.asarray(out.astype(np.float32))}

  return want, ours


def check_vae(path: str, variant: str | None, dtype: str, inputs_seed: int, image_size: int):
  torch, diffusers, _ = require_torch()
  directory = os.path.join(path, "vae")
  config = _read_json(os.path.join(directory, "config.json"))
  factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
  size = min(int(config.get("sample_size", 512)), image_size)
  size = max(factor, size // factor * factor)
  rng = np.random.default_rng(inputs_seed)
  images = rng.uniform(-1, 1, (2, config.get("in_channels", 3), size, size)).astype(np.float32)
  latent_shape = (2, config.get("latent_channels", 4), size // factor, size // factor)
  latents = rng.standard_normal(latent_shape).astype(np.float32)
  tdtype = getattr(torch, dtype)
  model = diffusers.AutoencoderKL.from_pretrained(directory, variant=variant).to(tdtype).eval()
  with torch.no_grad():
    mean = model.encode(torch.from_numpy(images).to(tdtype)).latent_dist.mean
    decoded = model.decode(torch.from_numpy(latents).to(tdtype)).sample
  want = {"encode.mean": _torch_float(torch, mean), "decode": _torch_float(torch, decoded)}
  del model

  def ours():
    import jax

    from dpo_jax.models import conditioning, loader

    jd = _jax_dtype(dtype)
    module, params = loader.load_vae(directory, variant=variant, param_dtype=jd, dtype=jd)
    # scaling_factor 1: the raw posterior mean / decoder, as compared on the PyTorch side.
    enc = jax.jit(lambda p, x: conditioning.vae_encode(module, p, x, 1.0))
    dec = jax.jit(lambda p, z: conditioning.vae_decode(module, p, z, 1.0))
    return {
      "encode.mean": np.asarray(enc(params, images.astype(jd)).astype(np.float32)),
      "decode": np.asarray(dec(params, latents.astype(jd)).astype(np.float32)),
    }

  return want, ours


def _token_ids(config: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
  """int32 [2, 77]: start, random tokens, end, then end-token padding (as SD's tokenizer).

  CLIP pools at the end token: the first `eos_token_id`, or (the legacy configs
  of the SD checkpoints, eos_token_id 2) the largest id, which in CLIP's
  vocabulary is the end token, the last id. Random tokens stay below both.
  """
  vocab = int(config["vocab_size"])
  eos = int(config.get("eos_token_id", 2))
  end = vocab - 1 if eos == 2 else eos
  start, top = vocab - 2, min(vocab - 2, end)
  ids = np.full((2, SEQUENCE_LENGTH), end, np.int32)
  for row, n in enumerate((5, 20)):
    ids[row, 0] = start
    ids[row, 1 : n + 1] = rng.integers(0, top, n)
  return ids


def check_text_encoders(
  path: str, names: Sequence[str], variant: str | None, dtype: str, inputs_seed: int
):
  """Both text encoders at once: SDXL's penultimate context needs the two together."""
  torch, _, transformers = require_torch()
  tdtype = getattr(torch, dtype)
  rng = np.random.default_rng(inputs_seed)
  specs, want = {}, {}
  for name in names:
    directory = os.path.join(path, name)
    config = _read_json(os.path.join(directory, "config.json"))
    projection = _with_projection(path, name)
    ids = _token_ids(config, rng)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls.from_pretrained(directory, variant=variant).to(tdtype).eval()
    with torch.no_grad():
      out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    # hidden_states = (embeddings, layer 1, ..., layer N): [-2] is what SDXL conditions on.
    want[name, "penultimate"] = _torch_float(torch, out.hidden_states[-2])
    if projection:
      want[name, "text_embeds"] = _torch_float(torch, out.text_embeds)
    else:
      want[name, "last_hidden_state"] = _torch_float(torch, out.last_hidden_state)
      want[name, "pooler_output"] = _torch_float(torch, out.pooler_output)
    specs[name] = (directory, projection, ids, int(config["hidden_size"]))
    del model
  plain = [n for n in names if not specs[n][1]]
  projected = [n for n in names if specs[n][1]]
  # Without an encoder 2 the penultimate of encoder 1 is not something dpo_jax computes.
  if not projected:
    for n in plain:
      del want[n, "penultimate"]

  def ours():
    import jax

    from dpo_jax.models import conditioning, loader

    jd = _jax_dtype(dtype)
    loaded = {
      n: loader.load_text_encoder(
        d, with_projection=proj, variant=variant, param_dtype=jd, dtype=jd
      )
      for n, (d, proj, _, _) in specs.items()
    }
    got = {}
    for n in plain:
      module, params = loaded[n]
      last, pooled = jax.jit(lambda p, i, m=module: conditioning.encode_prompt_sd15(m, p, i))(
        params, specs[n][2]
      )
      got[n, "last_hidden_state"], got[n, "pooler_output"] = last, pooled
    for n2 in projected:
      # encode_prompt_sdxl(encoder 1, encoder 2): context = [penultimate 1, penultimate 2].
      n1 = plain[0] if plain else n2
      (m1, p1), (m2, p2) = loaded[n1], loaded[n2]
      context, pooled = jax.jit(
        lambda p1, p2, i1, i2, m1=m1, m2=m2: conditioning.encode_prompt_sdxl(m1, p1, m2, p2, i1, i2)
      )(p1, p2, specs[n1][2], specs[n2][2])
      d1 = specs[n1][3]
      if n1 != n2:
        got[n1, "penultimate"] = context[..., :d1]
      got[n2, "penultimate"] = context[..., d1:]
      got[n2, "text_embeds"] = pooled
    return {k: np.asarray(v.astype(np.float32)) for k, v in got.items()}

  return want, ours


# ----------------------------------------------------------------------------- driver


def check(
  pretrained_path: str,
  components: Sequence[str] | None = None,
  *,
  dtype: str = "float32",
  atol: float = 1e-4,
  rtol: float = 0.0,
  seed: int = 0,
  latent_size: int = 32,
  image_size: int = 64,
  variant: str | None = None,
) -> list[Row]:
  """Runs the comparison; -> one `Row` per compared output.

  A config that dpo_jax refuses (ValueError / NotImplementedError from its
  loader) becomes one failed row carrying the message; PyTorch-side errors
  propagate.
  """
  require_torch()
  if not os.path.isdir(pretrained_path):
    raise FileNotFoundError(f"No pipeline folder at {pretrained_path}.")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}; expected one of {DTYPES}.")
  present = present_components(pretrained_path)
  components = list(components) if components else present
  for c in components:
    if c not in COMPONENTS:
      raise ValueError(f"--components: unknown component {c!r}; expected some of {COMPONENTS}.")
    if c not in present:
      raise ValueError(f"{pretrained_path}/model_index.json has no {c!r} component.")

  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  jobs = []
  if "unet" in components:
    jobs.append(("unet", check_unet(pretrained_path, variant, dtype, seed, latent_size)))
  if "vae" in components:
    jobs.append(("vae", check_vae(pretrained_path, variant, dtype, seed + 1, image_size)))
  encoders = [c for c in components if c.startswith("text_encoder")]
  if encoders:
    jobs.append(("text", check_text_encoders(pretrained_path, encoders, variant, dtype, seed + 2)))
  rows = []
  for job, (want, ours) in jobs:
    try:
      got = ours()
    except (ValueError, NotImplementedError) as e:
      names = encoders if job == "text" else [job]
      rows += [Row(n, "-", float("nan"), float("nan"), False, str(e)) for n in names]
      continue
    for key, value in want.items():
      component, output = key if isinstance(key, tuple) else (job, key)
      rows.append(_compare(component, output, got[key], value, atol, rtol))
  return rows


def format_table(rows: Sequence[Row]) -> str:
  lines = [f"{'component':<16}{'output':<20}{'max |diff|':>12}{'max |ref|':>12}  result"]
  for r in rows:
    result = "pass" if r.passed else ("FAIL: " + r.error if r.error else "FAIL")
    lines.append(
      f"{r.component:<16}{r.output:<20}{r.max_abs_diff:>12.3e}{r.max_abs_ref:>12.3e}  {result}"
    )
  return "\n".join(lines)


def parse_flags(argv: Sequence[str]):
  """absl flags in their own FlagValues, so `main` can be called from tests."""
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("pretrained_path", None, "Diffusers pipeline folder.", flag_values=fv)
  flags.DEFINE_list(
    "components", [], f"Some of {','.join(COMPONENTS)} (default: all present).", flag_values=fv
  )
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Both sides' compute dtype.", flag_values=fv)
  flags.DEFINE_float("atol", 1e-4, "Pass if max |diff| <= atol + rtol * max |ref|.", flag_values=fv)
  flags.DEFINE_float("rtol", 0.0, "See --atol.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the random inputs.", flag_values=fv)
  flags.DEFINE_integer(
    "latent_size", 32, "UNet latent side (at most the config's).", flag_values=fv
  )
  flags.DEFINE_integer("image_size", 64, "VAE image side (at most the config's).", flag_values=fv)
  flags.DEFINE_string("variant", "", "Weights variant, e.g. fp16 ('' = plain).", flag_values=fv)
  return logs.parse_own_flags(fv, argv, __doc__, ("pretrained_path",))


def main(argv: Sequence[str]) -> int:
  """`python -m dpo_jax.tools.parity`: prints the table; -> 0 if all pass, 1 if any fails.

  Usage errors (a missing folder or component, torch not installed) print one
  `error:` line on stderr and exit with status 2.
  """
  try:
    fv = parse_flags(argv)
    require_torch()
    logs.quiet_libraries()  # After diffusers is imported: it is then quieted too.
    rows = check(
      fv.pretrained_path,
      fv.components,
      dtype=fv.dtype,
      atol=fv.atol,
      rtol=fv.rtol,
      seed=fv.seed,
      latent_size=fv.latent_size,
      image_size=fv.image_size,
      variant=fv.variant or None,
    )
  except (ImportError, FileNotFoundError, ValueError) as e:
    print(f"dpo_jax.tools.parity: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_table(rows))
  failed = [r for r in rows if not r.passed]
  print(f"{len(rows) - len(failed)} of {len(rows)} outputs within tolerance.")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
