"""User mistakes caught before a run creates anything, each reported as one line.

Two checks for the command-line entry points (`train`, `data.cache`):

  check_config_args(argv): the `--config=FILE[:ARG]` file and every
    `--config.FIELD=VALUE` override, before absl parses them. A misspelt field
    otherwise surfaces as a 50-line traceback from inside ml_collections (raised
    while the flag is *defined* when `--config` is left at its default); here it
    is `error: unknown config field 'max_step'; did you mean: max_steps?`.
  preflight(config): the inputs the config names (pretrained pipeline folder,
    its weights variant, parquet folder, latent cache, CLIP folder), checked
    before the trainer creates the workdir, `config.json`, the events file or
    `metrics.jsonl`. Raises `UserInputError` naming the field and the fix.

`run(main)` is `absl.app.run` that prints a `UserInputError` raised by `main`,
or a flag-parsing error, as `error: <message>` and exits with status 2 (the
usual status of a command-line usage error) instead of a traceback. Anything
else still raises with its traceback: those are bugs, not user errors.

Paths go through `etils.epath`, so `gs://` inputs are checked too (the weights
files of a remote pipeline are left to the loader).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections
from etils import epath

SOURCES = ("synthetic", "pickapic", "cache")
# Components of a diffusers pipeline whose weights a run reads, with the library
# that names their files (when model_index.json lists them).
_WEIGHTED = {
  "unet": "diffusers",
  "vae": "diffusers",
  "text_encoder": "transformers",
  "text_encoder_2": "transformers",
}


class UserInputError(ValueError):
  """A wrong or missing input; the message is one line naming it and the fix."""


def fail(message: str) -> NoReturn:
  """Prints `error: message` (on one line) to stderr and exits with status 2."""
  print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
  sys.exit(2)


# --- command line -------------------------------------------------------------


def config_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted field path of `config`, groups included ("optim", "optim.lr", ...)."""
  out = []
  for key, value in config.items():
    path = prefix + key
    out.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      out += config_fields(value, path + ".")
  return out


def closest_fields(path: str, fields: Sequence[str], n: int = 3) -> list[str]:
  """The fields most like `path`, as a whole or by their last part, best first.

  The last-part score finds `optim.lr` for `lr` (a field given at the wrong
  level); only suggestions about as good as the best one are kept.
  """
  leaf = path.rsplit(".", 1)[-1]

  def score(field: str) -> tuple[float, float]:
    whole = difflib.SequenceMatcher(None, path, field).ratio()
    last = difflib.SequenceMatcher(None, leaf, field.rsplit(".", 1)[-1]).ratio()
    return max(whole, last), whole  # Ties: the field at the same level first.

  scored = sorted(((score(f), f) for f in fields if f != path), key=lambda t: t[0], reverse=True)
  if not scored or scored[0][0][0] < 0.7:
    return []
  best = scored[0][0][0]
  return [f for (s, _), f in scored[:n] if s >= best - 0.1]


def _has_field(config: Any, path: str) -> bool:
  node = config
  for part in path.split("."):
    part = part.split("[", 1)[0]  # `field[0]` indexes a sequence field.
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The last value of `--name=V` / `--name V` in argv (absl semantics), or None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{re.escape(name)}(=(?P<v>.*))?", arg)
    if m and m.group("v") is not None:
      value = m.group("v")
    elif m:
      value = argv[i + 1] if i + 1 < len(argv) else ""
  return value


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """Field paths of `--name.PATH[=V]` / `--noname.PATH` (bool) arguments, in order."""
  out = []
  for arg in argv:
    m = re.match(rf"--?(no)?{re.escape(name)}\.(?P<path>[^=]+)", arg)
    if m:
      out.append(m.group("path"))
  return out


def _missing_config_file(spec: str) -> str:
  path = spec.split(":", 1)[0]
  folder = os.path.dirname(path) or "."
  hint = ""
  if os.path.isdir(folder):
    near = difflib.get_close_matches(
      os.path.basename(path), [f for f in os.listdir(folder) if f.endswith(".py")], n=3
    )
    hint = f"; did you mean: {', '.join(os.path.join(folder, f) for f in near)}?" if near else ""
  return f"--config={spec}: no such config file{hint or ' (e.g. configs/sd15.py)'}"


def check_config_args(
  argv: Sequence[str], default: str | None = None, name: str = "config"
) -> None:
  """Exits with one line if the config file cannot load or an override names no field.

  Call it before `config_flags.DEFINE_config_file(name, default, ...)`: that
  call already loads the default config and applies argv's overrides.

  Args:
    argv: the command line (`sys.argv`).
    default: the config file used when argv has no `--name=...`.
    name: the config flag's name.
  """
  # The parser DEFINE_config_file uses (same file loading, `:ARG` handling, lock).
  from ml_collections.config_flags import config_flags

  spec = _flag_value(argv, name) or default
  overrides = _overrides(argv, name)
  if not spec:
    return  # absl reports the missing required flag.
  try:
    config = config_flags.ConfigFileFlagParser(name).parse(spec)
  except (TypeError, ValueError) as e:
    # ml_collections re-raises get_config()'s error with the traceback as text;
    # the original (e.g. "Unknown sd15 variant 'x'") is its context.
    fail(f"--{name}={spec}: {e.__context__ or e}")
  if not isinstance(config, ml_collections.ConfigDict):
    if os.path.isfile(spec.split(":", 1)[0]):
      return  # Not a ConfigDict (some other config type): nothing to check here.
    fail(_missing_config_file(spec))
  fields = config_fields(config)
  for path in overrides:
    if not _has_field(config, path):
      near = closest_fields(path, fields)
      fix = (
        f"did you mean: {', '.join(near)}?"
        if near
        else "the fields and their meaning are in configs/common.py"
      )
      fail(f"unknown config field {path!r}; {fix}")


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # Unknown flag, bad value, missing required flag.
    fail(f"{e} (see --help)")


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with one-line errors for flag mistakes and `UserInputError`."""
  from absl import app

  def main_with_user_errors(argv: list[str]) -> Any:
    try:
      return main(argv)
    except UserInputError as e:
      fail(str(e))

  app.run(main_with_user_errors, flags_parser=_parse_flags)


# --- inputs named by the config -------------------------------------------------


def _is_remote(path: str) -> bool:
  return "://" in path


def check_pipeline(path: str, variant: str = "", with_encoders: bool = True) -> None:
  """Raises UserInputError unless `path` is a diffusers pipeline folder with weights.

  Checks `model_index.json`, `unet/config.json` and, for local folders, the
  weights files (of `variant`, e.g. "fp16") of the UNet and, with
  `with_encoders`, of the VAE and text encoder(s) the index lists.
  """
  field = "config.pretrained_path"
  root = epath.Path(path)
  what = "a diffusers pipeline folder (model_index.json, unet/, scheduler/, ...)"
  if not root.exists():
    raise UserInputError(f"{field}={path}: no such folder; expected {what}.")
  if not root.is_dir():
    raise UserInputError(f"{field}={path} is a file; expected {what}.")
  index_path = root / "model_index.json"
  if not index_path.exists():
    hint = ""
    if (root / "config.json").exists():
      hint = " It looks like one component of a pipeline (config.json): pass the folder above it."
    else:
      # A folder above the pipeline, e.g. a hub cache's models--ORG--NAME/.
      found = [*root.glob("*/model_index.json"), *root.glob("snapshots/*/model_index.json")]
      inner = sorted(p.parent for p in found)
      if inner:
        hint = f" Did you mean {inner[0]}?"
    raise UserInputError(f"{field}={path} has no model_index.json; expected {what}.{hint}")
  if not (root / "unet" / "config.json").exists():
    raise UserInputError(f"{field}={path} has no unet/config.json; expected {what}.")
  if _is_remote(path):
    return
  from dpo_jax.models import loader  # Heavy (diffusers); the trainer imports it anyway.

  try:
    index = json.loads(index_path.read_text())
  except json.JSONDecodeError as e:
    raise UserInputError(f"{index_path} is not valid JSON ({e}).") from e
  listed = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
  components = _WEIGHTED if with_encoders else {"unet": "diffusers"}
  names = {"diffusers": loader.DIFFUSERS_WEIGHTS, "transformers": loader.TRANSFORMERS_WEIGHTS}
  for component, library in components.items():
    if component != "unet" and component not in listed:
      continue
    try:
      loader.find_weights(str(root / component), names[library], variant or None)
    except FileNotFoundError as e:
      raise UserInputError(f"{field}={path}: {e}") from e


def check_parquet_dir(path: str, field: str = "config.data.path") -> None:
  """Raises UserInputError unless `path` is a folder holding `*.parquet` shards."""
  root = epath.Path(path)
  what = "a folder of Pick-a-Pic-format parquet shards (train-*.parquet, ...)"
  if not root.is_dir():
    raise UserInputError(f"{field}={path}: no such folder; expected {what}.")
  if not any(root.glob("*.parquet")):
    # The hub's pickapic_v2 repository keeps its shards in data/.
    inner = sorted({p.parent for p in root.glob("*/*.parquet")})
    hint = f" Did you mean {inner[0]}?" if inner else ""
    raise UserInputError(f"{field}={path} has no *.parquet files; expected {what}.{hint}")


# `dpo_jax.data.cache.META`, repeated so that preflight imports no JAX.
CACHE_META = "meta.json"


def check_cache_dir(path: str) -> None:
  """Raises UserInputError unless `path` holds a latent cache (`meta.json`)."""
  root = epath.Path(path)
  if (root / CACHE_META).exists():
    return
  write = f"`python -m dpo_jax.data.cache --config=... --output={path}`"
  if (root / "meta.npz").exists():
    raise UserInputError(
      f"config.data.cache_dir={path} is a cache of an older dpo_jax (.npz shards, which "
      f"cannot be memory-mapped and lose bf16): rewrite it with {write}."
    )
  raise UserInputError(
    f"config.data.cache_dir={path} has no {CACHE_META}: write the cache first with {write}."
  )


def _missing_inputs(config: ml_collections.ConfigDict, source: str) -> list[str]:
  """`--config.FIELD=...` texts for the required fields that are empty."""
  need = []
  if source == "pickapic":
    if not config.pretrained_path:
      need.append(
        "--config.pretrained_path=DIR (a diffusers pipeline folder: the VAE and text "
        "encoders encode the pairs)"
      )
    if not config.data.path:
      need.append("--config.data.path=DIR (a folder of Pick-a-Pic-format parquet shards)")
    rpo = config.objective == "rpo" and "image" in config.rpo.embedding
    if rpo and not config.rpo.clip_path:
      need.append(
        f"--config.rpo.clip_path=DIR (a CLIP model folder; rpo.embedding="
        f"{config.rpo.embedding!r} embeds the pair images)"
      )
  if source == "cache" and not config.data.cache_dir:
    need.append("--config.data.cache_dir=DIR (written by `python -m dpo_jax.data.cache`)")
  if config.sample_eval.every > 0 and not config.pretrained_path and source != "pickapic":
    need.append("--config.pretrained_path=DIR (sample_eval.every > 0 samples images with it)")
  return need


def preflight(
  config: ml_collections.ConfigDict, *, source: str | None = None, check_missing: bool = True
) -> None:
  """Checks the inputs `config` names before anything is created or loaded.

  Args:
    config: a run config (`configs/common.py` fields).
    source: check as if `config.data.source` were this ("pickapic" for the
      cache writer, which reads parquet shards whatever the config trains on).
    check_missing: False checks only the paths that are set (a toy config
      before `toy.run.materialize` fills in the rest).

  Raises:
    UserInputError: one line naming the field, what is wrong and the fix.
  """
  source = source or config.data.source
  if source not in SOURCES:
    near = difflib.get_close_matches(source, SOURCES, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise UserInputError(
      f"config.data.source={source!r} is not a data source (expected one of {SOURCES}){hint}"
    )
  missing = _missing_inputs(config, source) if check_missing else []
  if missing:
    raise UserInputError(f"missing input: set {'; and '.join(missing)}.")
  if config.pretrained_path:
    variant = config.get("pretrained_variant", "")
    check_pipeline(config.pretrained_path, variant, with_encoders=source != "cache")
  if source == "pickapic" and config.data.path:
    check_parquet_dir(config.data.path)
  if source == "cache" and config.data.cache_dir:
    check_cache_dir(config.data.cache_dir)
  rpo_clip = config.objective == "rpo" and "image" in config.rpo.embedding
  if rpo_clip and source == "pickapic" and config.rpo.clip_path:
    if not (epath.Path(config.rpo.clip_path) / "config.json").exists():
      raise UserInputError(
        f"config.rpo.clip_path={config.rpo.clip_path} has no config.json; expected a CLIP "
        "model folder (transformers format)."
      )
