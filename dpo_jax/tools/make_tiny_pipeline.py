"""Writes a tiny random Stable Diffusion 1.5 / 2 / XL pipeline folder in diffusers format.

Usage:
  python -m dpo_jax.tools.make_tiny_pipeline --kind=sdxl --output=/tmp/tiny_sdxl [--seed=0]

The folder has every component of the real checkpoint (`model_index.json`,
`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and for SDXL
`text_encoder_2/`, `tokenizer_2/`) with the real block types, attention layout
and conditioning path, but widths of 32-80 channels so that tests and smoke
runs need no download and run in seconds on a CPU. "sd2" is SD 2.1 (768-v):
linear projections, per-block head counts, upcast attention, an OpenCLIP-style
text encoder and tokenizer, v-prediction with DDIM; its norm_num_groups is 16
(32 in the real one) so that the group count is not the default.

Two writers:
  torch (default when torch is importable): the components are built with the
    PyTorch diffusers/transformers classes and saved by the real
    `StableDiffusion(XL)Pipeline.save_pretrained`, so names, layouts and
    metadata are exactly those of a hub checkpoint (`*.safetensors`).
  flax: Flax modules saved as `diffusion_flax_model.msgpack` /
    `flax_model.msgpack`, the Flax variant of the same format, for machines
    without torch.

The tokenizer is a genuine CLIP byte-level BPE tokenizer with a vocabulary of
~600 tokens learned from a few words here (the real 49k-token vocabulary cannot
be downloaded). As in the real vocabulary, `<|endoftext|>` has the highest id so
that CLIP's pooling (argmax of the ids) picks the end-of-text token.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

from absl import app, flags

from dpo_jax.models import tokenizer as tokenizer_lib
from dpo_jax.models.tokenizer import bytes_to_unicode

KINDS = ("sd15", "sd2", "sdxl")

# SD1.5 and SDXL train with the same DDPM betas; the hub checkpoints ship the
# PNDM (SD1.5) / Euler (SDXL) inference schedulers, whose configs carry them.
_SCHEDULER_COMMON = {
  "num_train_timesteps": 1000,
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "steps_offset": 1,
}
_SCHEDULER = {
  "sd15": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}),
  # stabilityai/stable-diffusion-2-1's scheduler.
  "sd2": (
    "DDIMScheduler",
    {"clip_sample": False, "set_alpha_to_one": False},
  ),
  "sdxl": (
    "EulerDiscreteScheduler",
    {"interpolation_type": "linear", "timestep_spacing": "leading"},
  ),
}

# Words the tiny BPE vocabulary is learned from: prompt-like text, so common
# words become single tokens and everything else still tokenizes (byte fallback).
_CORPUS = (
  "a photo of an astronaut riding a horse on the moon . a painting of a red cat and a blue dog "
  "in the style of van gogh , portrait of a woman with green hair , highly detailed , 4k , "
  "digital art of a small house under a tree at sunset , the quick brown fox jumps over the lazy "
  "dog , a square circle triangle in the top left bottom right corner , black white yellow purple"
)
_NUM_MERGES = 96


# Both kinds' UNets: 16 x 16 x 4 latents, two levels instead of four.
_UNET_COMMON = {
  "sample_size": 16,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": (32, 64),
  "layers_per_block": 1,
}


def unet_config(kind: str) -> dict[str, Any]:
  """UNet constructor kwargs, valid for both the PyTorch and the Flax class."""
  if kind == "sd15":
    return {
      **_UNET_COMMON,
      # SD1.5 order (attention at the highest resolution).
      "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
      # SD1.5's config quirk: `attention_head_dim` is really the number of heads.
      "attention_head_dim": 4,
      "cross_attention_dim": 32,
    }
  if kind == "sd2":
    return {
      **_UNET_COMMON,
      "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
      # SD2 gives per-block head counts (5, 10, 20, 20) as attention_head_dim.
      "attention_head_dim": (2, 4),
      "use_linear_projection": True,
      "upcast_attention": True,
      "norm_num_groups": 16,
      # OpenCLIP ViT-H's width (real: 1024).
      "cross_attention_dim": 48,
    }
  if kind == "sdxl":
    return {
      **_UNET_COMMON,
      # SDXL order: no attention at the highest resolution.
      "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
      "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
      "attention_head_dim": (2, 4),
      # >1 transformer layer per block (SDXL has up to 10) and linear projections.
      "transformer_layers_per_block": (1, 2),
      "use_linear_projection": True,
      # Both encoders' hidden states concatenated: 32 + 48 (real: 768 + 1280).
      "cross_attention_dim": 80,
      "addition_embed_type": "text_time",
      "addition_time_embed_dim": 8,
      # 6 time ids x 8 + pooled text embeds of encoder 2 (real: 6 x 256 + 1280).
      "projection_class_embeddings_input_dim": 6 * 8 + 48,
    }
  raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")


def vae_config(kind: str) -> dict[str, Any]:
  """AutoencoderKL kwargs: two levels, so 32 px images <-> 16 x 16 x 4 latents."""
  if kind not in KINDS:
    raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")
  return {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.13025 if kind == "sdxl" else 0.18215,
  }


def text_encoder_config(kind: str, index: int, vocab_size: int) -> dict[str, Any]:
  """`CLIPTextConfig` kwargs for encoder `index` (1, or 2 for SDXL's OpenCLIP bigG)."""
  if kind not in KINDS or index not in (1, 2) or (index == 2 and kind != "sdxl"):
    raise ValueError(f"No text encoder {index} in a {kind!r} pipeline.")
  # SD2's only encoder is OpenCLIP ViT-H, like SDXL's second (bigG) one.
  openclip = index == 2 or kind == "sd2"
  hidden = 48 if openclip else 32
  return {
    "vocab_size": vocab_size,
    "hidden_size": hidden,
    "intermediate_size": 2 * hidden,
    "projection_dim": hidden,
    # Two layers so that the penultimate hidden state (SDXL) differs from the input.
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    # CLIP ViT-L uses quick_gelu, OpenCLIP bigG exact gelu.
    "hidden_act": "gelu" if openclip else "quick_gelu",
    "layer_norm_eps": 1e-5,
    # The real SD configs' (legacy) token ids: eos_token_id == 2 selects pooling
    # by argmax of the ids, which is why `<|endoftext|>` must have the top id.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
  }


def scheduler_config(kind: str, prediction_type: str | None = None) -> tuple[str, dict[str, Any]]:
  """(diffusers scheduler class name, config kwargs) of the checkpoint's scheduler.

  `prediction_type` None: the real checkpoint's (v_prediction for SD2, else epsilon).
  """
  class_name, extra = _SCHEDULER[kind]
  if prediction_type is None:
    prediction_type = "v_prediction" if kind == "sd2" else "epsilon"
  return class_name, {**_SCHEDULER_COMMON, **extra, "prediction_type": prediction_type}


def _train_bpe(text: str, num_merges: int) -> list[tuple[str, str]]:
  """Greedy byte-level BPE merges (most frequent pair first, ties broken by the pair)."""
  byte_encoder = bytes_to_unicode()
  words = collections.Counter()
  for word in text.lower().split():
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"  # CLIP marks the end of a word on its last symbol.
    words[tuple(symbols)] += 1

  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for symbols, count in words.items():
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged = collections.Counter()
    for symbols, count in words.items():
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def write_tokenizer_files(
  directory: str,
  pad_token: str = "<|endoftext|>",
  max_length: int = 77,
  corpus: str = _CORPUS,
  num_merges: int = _NUM_MERGES,
) -> tokenizer_lib.CLIPTokenizer:
  """Writes a tiny CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json).

  No transformers needed: returns our own `models.tokenizer.CLIPTokenizer` of
  the folder (what `models.loader.load_tokenizer` reads).

  Args:
    directory: output folder (created).
    pad_token: `<|endoftext|>` for SD1.5 / SDXL `tokenizer`, `!` for SDXL's
      `tokenizer_2` (OpenCLIP pads with id 0), as in the real checkpoints.
    max_length: `model_max_length`, the padded prompt length (77 in SD).
    corpus, num_merges: the text the byte-level BPE merges are learned from, and
      at most how many (learning stops earlier once no pair repeats).
  """
  os.makedirs(directory, exist_ok=True)
  merges = _train_bpe(corpus, num_merges)
  # Same id layout as CLIP: bytes, bytes + "</w>", merges, then the two specials last.
  tokens = list(bytes_to_unicode().values())
  tokens += [t + "</w>" for t in tokens]
  tokens += ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  # The hub checkpoints' tokenizer_config.json fields.
  config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": max_length,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": pad_token,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return tokenizer_lib.CLIPTokenizer.from_pretrained(directory)


def write_tokenizer(directory: str, pad_token: str = "<|endoftext|>", max_length: int = 77):
  """`write_tokenizer_files`, then the folder as the installed transformers saves it.

  For the PyTorch pipelines (tests, parity, benchmarks). Returns the
  `transformers.CLIPTokenizer` read back from `directory` (the slow Python
  tokenizer in transformers 4, the `tokenizers`-backed one in 5). Read through
  `from_pretrained`, whose file-based construction is the one API transformers
  4 and 5 share (the constructor took file paths in 4 and takes the vocab in 5).
  """
  from transformers import CLIPTokenizer

  write_tokenizer_files(directory, pad_token, max_length)
  tokenizer = CLIPTokenizer.from_pretrained(directory)
  tokenizer.save_pretrained(directory)  # The installed version's own file set.
  return CLIPTokenizer.from_pretrained(directory)


def _pad_token(kind: str) -> str:
  return "!" if kind == "sd2" else "<|endoftext|>"


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def write_torch_pipeline(
  kind: str,
  output: str,
  seed: int = 0,
  prediction_type: str | None = None,
  unet: dict[str, Any] | None = None,
  text_widths: tuple[int, ...] | None = None,
) -> None:
  """Builds the PyTorch pipeline and lets diffusers write it (the exact hub format).

  `unet` replaces the tiny UNet config (e.g. the benchmarks' SD-shaped one) and
  `text_widths` the text encoders' hidden sizes (their sum, or the one width,
  must be the UNet's cross-attention dim).
  """
  import diffusers
  import torch
  import transformers

  # OpenCLIP's tokenizer (SD2's only one, SDXL's second) pads with "!" (id 0).
  tokenizer = write_tokenizer(os.path.join(output, "tokenizer"), pad_token=_pad_token(kind))
  vocab_size = len(tokenizer)
  torch.manual_seed(seed)
  unet_model = diffusers.UNet2DConditionModel(**(unet or unet_config(kind)))
  vae = diffusers.AutoencoderKL(**vae_config(kind))

  def text_config(index: int) -> Any:
    cfg = text_encoder_config(kind, index, vocab_size)
    if text_widths is not None:
      width = text_widths[index - 1]
      cfg.update(hidden_size=width, intermediate_size=2 * width, projection_dim=width)
    return transformers.CLIPTextConfig(**cfg)

  text_encoder = transformers.CLIPTextModel(text_config(1))
  class_name, sched_kwargs = scheduler_config(kind, prediction_type)
  scheduler = getattr(diffusers, class_name)(**sched_kwargs)
  if kind != "sdxl":
    pipe = diffusers.StableDiffusionPipeline(
      vae=vae,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
      unet=unet_model,
      scheduler=scheduler,
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
    )
  else:
    tokenizer_2 = write_tokenizer(os.path.join(output, "tokenizer_2"), pad_token="!")
    text_encoder_2 = transformers.CLIPTextModelWithProjection(text_config(2))
    pipe = diffusers.StableDiffusionXLPipeline(
      vae=vae,
      text_encoder=text_encoder,
      text_encoder_2=text_encoder_2,
      tokenizer=tokenizer,
      tokenizer_2=tokenizer_2,
      unet=unet_model,
      scheduler=scheduler,
    )
  pipe.save_pretrained(output, safe_serialization=True)
  _hub_text_encoder_keys(os.path.join(output, "text_encoder"))


def _hub_text_encoder_keys(directory: str) -> None:
  """Puts back the `text_model.` prefix that transformers 5 drops when saving `CLIPTextModel`.

  transformers 5's `CLIPTextModel` holds the text transformer's modules itself
  (4 had them under `.text_model`) and saves its keys without the prefix. The
  SD1.5 / SDXL hub checkpoints, written by transformers 4, have it; so does
  every file written here, whichever version runs (both versions load both).
  """
  import safetensors.numpy

  path = os.path.join(directory, "model.safetensors")
  state = safetensors.numpy.load_file(path)
  if all(k.startswith("text_model.") for k in state):
    return
  state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})


def _random_params(abstract: Any, seed: int) -> dict[str, Any]:
  """Random params for an abstract Flax tree, drawn in numpy.

  A stand-in for the modules' own initialisers, which cost ~20 s of XLA compile
  per module on a 2-core CPU: norm scales 1, biases 0, embeddings N(0, 0.02),
  kernels [..., in, out] N(0, 1 / fan_in).
  """
  import flax
  import numpy as np

  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  out = {}
  for path, leaf in flat.items():
    shape = leaf.shape
    if path[-1] == "scale":
      value = np.ones(shape)
    elif path[-1] == "bias":
      value = np.zeros(shape)
    elif path[-1] == "embedding":
      value = rng.normal(0.0, 0.02, shape)
    else:
      value = rng.normal(0.0, 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))), shape)
    out[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


# Weight file names of our Flax msgpack components (`models.loader` reads them).
FLAX_WEIGHTS = {"diffusers": "diffusion_flax_model.msgpack", "transformers": "flax_model.msgpack"}


def save_flax_component(
  directory: str, library: str, class_name: str, config: dict[str, Any], params: Any
) -> None:
  """`config.json` (with `_class_name`) + msgpack params under our (PyTorch-key) names.

  The diffusers/transformers Flax layout of a component folder, written from
  our own modules: no diffusers or transformers needed.
  """
  import flax
  import jax

  os.makedirs(directory, exist_ok=True)
  meta = {"_class_name": class_name} if library == "diffusers" else {"architectures": [class_name]}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({**meta, **config}, f, indent=2)
  with open(os.path.join(directory, FLAX_WEIGHTS[library]), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))


def _write_flax(kind: str, output: str, seed: int, prediction_type: str | None) -> None:
  """Same structure from our own Flax models, saved as msgpack (no torch, diffusers or
  transformers needed); random weights drawn in numpy (`_random_params`)."""
  import jax

  from dpo_jax.models import clip, unet2d
  from dpo_jax.models import vae as vae_lib

  tokenizer = write_tokenizer_files(os.path.join(output, "tokenizer"), pad_token=_pad_token(kind))
  vocab_size = len(tokenizer)
  index = {
    "_class_name": "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline",
    "tokenizer": ["transformers", "CLIPTokenizer"],
  }
  components = [
    ("unet", "diffusers", "UNet2DConditionModel", unet_config(kind), unet2d.UNet2DConditionModel),
    ("vae", "diffusers", "AutoencoderKL", vae_config(kind), vae_lib.AutoencoderKL),
    (
      "text_encoder",
      "transformers",
      "CLIPTextModel",
      text_encoder_config(kind, 1, vocab_size),
      clip.CLIPTextModel,
    ),
  ]
  if kind == "sdxl":
    components.append(
      (
        "text_encoder_2",
        "transformers",
        "CLIPTextModelWithProjection",
        text_encoder_config(kind, 2, vocab_size),
        clip.CLIPTextModelWithProjection,
      )
    )
    write_tokenizer_files(os.path.join(output, "tokenizer_2"), pad_token="!")
    index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
  for offset, (name, library, class_name, config, cls) in enumerate(components):
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    module = cls.from_config(config)
    if hasattr(module, "init_abstract"):
      abstract = module.init_abstract()
    else:  # The UNet.
      abstract = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    params = _random_params(abstract, seed * 10 + offset)
    save_flax_component(os.path.join(output, name), library, class_name, config, params)
    index[name] = [library, class_name]
  class_name, sched_kwargs = scheduler_config(kind, prediction_type)
  index["scheduler"] = ["diffusers", class_name]
  os.makedirs(os.path.join(output, "scheduler"), exist_ok=True)
  with open(os.path.join(output, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": class_name, **sched_kwargs}, f, indent=2)
  with open(os.path.join(output, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def make_tiny_pipeline(
  kind: str,
  output: str,
  seed: int = 0,
  *,
  prediction_type: str | None = None,
  backend: str = "auto",
) -> str:
  """Writes a tiny random `kind` pipeline to `output` and returns `output`.

  Args:
    kind: "sd15", "sd2" or "sdxl".
    output: folder to write (created; existing files are overwritten).
    seed: seeds the random weights (torch.manual_seed or a JAX PRNG key).
    prediction_type: written into `scheduler/scheduler_config.json`; None:
      the real checkpoint's ("v_prediction" for sd2, else "epsilon").
    backend: "torch" (safetensors via PyTorch diffusers), "flax" (msgpack), or
      "auto": torch when it is importable.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")
  if backend == "auto":
    backend = "torch" if _torch_available() else "flax"
  writers = {"torch": write_torch_pipeline, "flax": _write_flax}
  if backend not in writers:
    raise ValueError(f"Unknown backend {backend!r}; expected 'auto', 'torch' or 'flax'.")
  os.makedirs(output, exist_ok=True)
  writers[backend](kind, output, seed, prediction_type)
  return output


def _define_flags() -> None:
  # Defined only when run as a script, so importing `make_tiny_pipeline` (tests)
  # cannot collide with another module's flags of the same name.
  flags.DEFINE_enum("kind", "sd15", list(KINDS), "Which pipeline structure to write.")
  flags.DEFINE_string("output", None, "Output folder.", required=True)
  flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
  flags.DEFINE_enum(
    "prediction_type",
    None,
    ["epsilon", "v_prediction"],
    "Scheduler prediction type (default: the real checkpoint's).",
  )
  flags.DEFINE_enum("backend", "auto", ["auto", "torch", "flax"], "Which classes write it.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  path = make_tiny_pipeline(
    f.kind, f.output, f.seed, prediction_type=f.prediction_type, backend=f.backend
  )
  print(f"Wrote a tiny {f.kind} pipeline to {path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
