"""The toy world's base text-to-image model, pretrained here and saved as a diffusers folder.

Model (a justified pixel-space choice): at 16 x 16 x 3 a VAE would buy nothing
but reconstruction error, so the UNet denoises the images themselves and the
pipeline folder says so with `"vae": [null, null]` in `model_index.json`;
`models.loader` and the data/sampling code treat such a folder as pixel space.
  - UNet: our `models.unet2d.UNet2DConditionModel`, blocks (32, 64, 64, 64), one
    layer per block, cross-attention at 8 x 8, 4 x 4 and 2 x 2.
  - Text encoder: a 2-layer, 32-wide CLIP text transformer with a real CLIP BPE
    tokenizer (16 tokens), trained jointly with the UNet, since there is no
    pretrained one to download. The tokenizer's merges are learned from the
    toy vocabulary itself, so every word of a prompt is one token (9 tokens with
    BOS / EOS). The generic tiny tokenizer split the quadrant words into up to
    five byte-pair pieces at the end of the caption, and cut "left" / "right"
    off 10 of the 48 prompts at 16 tokens: the base could not follow the
    quadrant because its text often did not contain it.
  - Schedule: cosine (`squaredcos_cap_v2`) with v-prediction. With
    epsilon-prediction the cosine schedule's near-zero alpha-bar at high noise
    amplifies errors by > 1e4 and the samples get colour-cast backgrounds.

Pretraining is plain SFT (noise-prediction MSE) on freshly rendered images of
the training prompts with deliberately imperfect captions: `corrupt_frac` of
them lie about the colour or the position, `drop_frac` are empty (for
classifier-free guidance). The result is a base that usually draws the right
thing but often not: what preference tuning should fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dpo_jax import diffusion, sample
from dpo_jax.models import clip, conditioning, loader
from dpo_jax.models import unet as unet_lib
from dpo_jax.tools import make_tiny_pipeline
from dpo_jax.toy import judge, world

Params = dict[str, Any]

IMAGE_SIZE = 16
MAX_TOKENS = 16  # "a yellow triangle at the bottom right" is < 16 BPE tokens with BOS/EOS.

UNET_CONFIG: dict[str, Any] = {
  "sample_size": IMAGE_SIZE,
  "in_channels": 3,
  "out_channels": 3,
  # Four levels (16, 8, 4, 2 px), cross-attention at 8 x 8, 4 x 4 and 2 x 2. At
  # 2 x 2 each cell is one quadrant and sees a different pattern of zero
  # padding, so "where" is a per-cell choice the cross-attention can read off the
  # quadrant words even from pure noise. With two levels (32, 64) the blob's
  # position followed the noise seed; three levels (to 4 x 4) reached quadrant
  # 39 % on training prompts at step 1000, four levels 96 % (docs/toy_experiments.md).
  "down_block_types": (
    "DownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
  ),
  "up_block_types": (
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "UpBlock2D",
  ),
  "block_out_channels": (32, 64, 64, 64),
  "layers_per_block": 1,
  "attention_head_dim": 4,
  "cross_attention_dim": 32,
}

SCHEDULER_CONFIG: dict[str, Any] = {
  "num_train_timesteps": 1000,
  "beta_schedule": "squaredcos_cap_v2",
  "prediction_type": "v_prediction",
  "clip_sample": False,
}


@dataclasses.dataclass(frozen=True)
class BaseSettings:
  """How the base model is pretrained (all of it feeds the cache key)."""

  steps: int = 1000
  batch_size: int = 32
  lr: float = 1e-3
  # The text encoder's lr is `lr * text_lr_mult`.
  text_lr_mult: float = 1.0
  corrupt_frac: float = 0.3
  # The first `clean_frac` of the steps use uncorrupted captions (a curriculum).
  clean_frac: float = 0.0
  drop_frac: float = 0.1
  # "constant" Adam lr, or "cosine": linear warmup over `warmup_steps`, then
  # cosine decay to `lr * final_lr_frac` at the last step.
  lr_schedule: str = "constant"
  warmup_steps: int = 50
  final_lr_frac: float = 0.1
  # EMA of the weights (0 = off); the written pipeline holds the EMA weights.
  # The decay ramps up as min(ema_decay, (1 + step) / (10 + step)), as in
  # diffusers' EMAModel, so early weights fade fast.
  ema_decay: float = 0.0
  # Pretrain until the base follows its words: past `steps`, every
  # `check_every` steps the judge (`toy.judge`) scores the (EMA) weights'
  # samples of the *training* prompts (`check_seeds` seeds each, DDIM 20, CFG
  # 3); training stops once all three attributes are right for at least
  # `target_all_three` of them, or at `max_steps` (0 = exactly `steps`).
  # When a base learns to place the blob in the named quadrant varies a lot
  # with the seed (docs/toy_experiments.md); this makes the base's quality, not
  # its step count, the fixed quantity.
  max_steps: int = 0
  check_every: int = 250
  check_seeds: int = 4
  target_all_three: float = 0.6
  num_heldout: int = 8
  seed: int = 0
  # Which tokenizer: "toy_words" (one token per word) or "tiny" (the generic
  # tiny BPE of `make_tiny_pipeline`, which splits and truncates quadrant words).
  tokenizer: str = "toy_words"


def text_encoder_config(vocab_size: int) -> dict[str, Any]:
  """The toy CLIP text encoder: SD1.5's tiny encoder with 16 positions."""
  cfg = make_tiny_pipeline.text_encoder_config("sd15", 1, vocab_size)
  cfg["max_position_embeddings"] = MAX_TOKENS
  return cfg


def make_text_encoder(vocab_size: int) -> clip.CLIPTextModel:
  """The toy text encoder (our CLIP text model, `models.clip`); the one place it is built."""
  return clip.CLIPTextModel.from_config(text_encoder_config(vocab_size))


def init_text_encoder(module: clip.CLIPTextModel, seed: int) -> Params:
  """Random text-encoder params (transformers' CLIP initialisers, `models.clip`)."""
  ids = jnp.zeros((1, MAX_TOKENS), jnp.int32)
  return jax.device_get(module.init(jax.random.PRNGKey(seed), ids)["params"])


def toy_corpus() -> str:
  """Every word of every toy prompt, once per prompt: the toy tokenizer's BPE corpus."""
  return " ".join(s.text for s in world.all_specs())


def write_tokenizer(directory: str, kind: str = "toy_words") -> Any:
  """Writes the toy's CLIP BPE tokenizer to `directory` and returns it read back.

  `kind="toy_words"`: byte-level BPE merges learned from `toy_corpus()` until
  no pair is left, so each toy word is a single token and any other text still
  tokenizes (byte fallback). `kind="tiny"`: `make_tiny_pipeline`'s generic one.
  """
  if kind == "tiny":
    return make_tiny_pipeline.write_tokenizer_files(directory, max_length=MAX_TOKENS)
  if kind != "toy_words":
    raise ValueError(f"Unknown toy tokenizer {kind!r}; expected 'toy_words' or 'tiny'.")
  # 1000 merges is more than needed: learning stops once every word is one token.
  return make_tiny_pipeline.write_tokenizer_files(
    directory, max_length=MAX_TOKENS, corpus=toy_corpus(), num_merges=1000
  )


def sample_captions(
  specs: Sequence[world.PromptSpec], rng: np.random.Generator, corrupt_frac: float, drop_frac: float
) -> list[str]:
  """Training captions for images of `specs`: some dropped (""), some corrupted."""
  out = []
  for spec in specs:
    u = rng.random()
    if u < drop_frac:
      out.append("")
    elif u < drop_frac + corrupt_frac:
      out.append(world.corrupt_caption(spec, rng).text)
    else:
      out.append(spec.text)
  return out


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (the UNet's x0)."""
  x = images.astype(np.float32) / 127.5 - 1.0
  return np.transpose(x, (0, 3, 1, 2))


def base_loss(
  params: Params,
  x0: jax.Array,
  input_ids: jax.Array,
  rng: jax.Array,
  *,
  unet: Any,
  text_encoder: Any,
  schedule: Any,
) -> jax.Array:
  """Mean v-prediction MSE of UNet + text encoder (both trained) on one batch."""
  context, _ = conditioning.encode_prompt_sd15(text_encoder, params["text_encoder"], input_ids)
  noise, t = diffusion.sample_noise_and_timesteps(
    rng, x0.shape, SCHEDULER_CONFIG["num_train_timesteps"]
  )
  xt = diffusion.q_sample(schedule, x0, noise, t)
  target = diffusion.training_target(schedule, "v_prediction", x0, noise, t)
  pred = unet_lib.make_unet_apply(unet)(params["unet"], xt, t, context)
  return jnp.mean(diffusion.per_sample_mse(pred, target))


def write_pipeline(
  output: str, unet_params: Params, text_params: Params, vocab_size: int, extra: dict
) -> None:
  """Writes the diffusers folder (Flax msgpack weights; tokenizer written beforehand)."""
  save = make_tiny_pipeline.save_flax_component
  save(os.path.join(output, "unet"), "diffusers", "UNet2DConditionModel", UNET_CONFIG, unet_params)
  text_config = text_encoder_config(vocab_size)
  save(
    os.path.join(output, "text_encoder"), "transformers", "CLIPTextModel", text_config, text_params
  )
  os.makedirs(os.path.join(output, "scheduler"), exist_ok=True)
  with open(os.path.join(output, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "DDPMScheduler", **SCHEDULER_CONFIG}, f, indent=2)
  index = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": [None, None],  # Pixel space.
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
  }
  with open(os.path.join(output, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
  with open(os.path.join(output, "toy_base.json"), "w") as f:
    json.dump(extra, f, indent=2)


def learning_rate(settings: BaseSettings, peak: float) -> optax.Schedule | float:
  """The base pretraining's lr (`settings.lr_schedule`) peaking at `peak`."""
  if settings.lr_schedule == "constant":
    return peak
  if settings.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, peak, settings.warmup_steps, settings.steps, peak * settings.final_lr_frac
    )
  raise ValueError(
    f"Unknown lr_schedule {settings.lr_schedule!r}; expected 'constant' or 'cosine'."
  )


def ema_update(ema: Params, params: Params, step: jax.Array, decay: float) -> Params:
  """One EMA step, decay warmed up as `min(decay, (1 + step) / (10 + step))`; 0 = off."""
  if decay <= 0.0:
    return params
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def is_check_step(settings: BaseSettings, step: int) -> bool:
  """Whether the judge checks the base after `step` steps (`BaseSettings.max_steps`)."""
  if settings.max_steps <= settings.steps or not settings.steps <= step <= settings.max_steps:
    return False
  return (step - settings.steps) % settings.check_every == 0 or step == settings.max_steps


def as_pipeline(
  unet: Any, params: Params, text_encoder: clip.CLIPTextModel, tokenizer: Any
) -> loader.Pipeline:
  """The in-memory pipeline `write_pipeline` + `loader.load_pipeline` would give back."""
  return loader.Pipeline(
    kind="sd15",
    unet=unet,
    unet_params=params["unet"],
    vae=None,
    vae_params=None,
    text_encoder=text_encoder,
    text_encoder_params=params["text_encoder"],
    tokenizer=tokenizer,
    scheduler_config=dict(SCHEDULER_CONFIG),
    vae_scaling_factor=1.0,
  )


def judge_rates(
  pipeline: loader.Pipeline, specs: Sequence[world.PromptSpec], num_seeds: int
) -> dict[str, float]:
  """The judge's rates (`judge.METRICS`) on `num_seeds` samples of each prompt (DDIM 20, CFG 3).

  The seeds (20_000 + k) are disjoint from the pair seeds and the evaluation seeds.
  """
  grid, seeds = world.grid_specs(specs, range(20_000, 20_000 + num_seeds))
  images = sample.generate(
    pipeline,
    pipeline.unet_params,
    [s.text for s in grid],
    seeds,
    sample.SampleSettings(20, 3.0, 128),
  )
  acc = judge.accuracy(images, grid)
  return {m: round(float(v.mean()), 4) for m, v in acc.items()}


def train_base(
  output: str, settings: BaseSettings = BaseSettings(), progress=None, on_params=None
) -> str:
  """Pretrains the toy base and writes it as a pipeline folder at `output`.

  Args:
    output: folder to write (created).
    settings: schedule of the pretraining run.
    progress: optional callable(step, loss) after each step (progress bar).
    on_params: optional callable(step, {"unet", "text_encoder"} params, tokenizer)
      after each step (for experiments that evaluate snapshots); the EMA
      weights when `settings.ema_decay` > 0.

  Returns:
    `output`.
  """
  tokenizer = write_tokenizer(os.path.join(output, "tokenizer"), settings.tokenizer)
  train_specs, heldout = world.split_specs(settings.num_heldout, settings.seed)
  captions = sorted({s.text for s in world.all_specs()} | {""})
  ids_of = dict(zip(captions, conditioning.tokenize(tokenizer, captions)))

  unet = unet_lib.unet_from_config(UNET_CONFIG, "float32")
  text_encoder = make_text_encoder(len(tokenizer))
  key = jax.random.PRNGKey(settings.seed)
  key, init_key = jax.random.split(key)
  params = {
    "unet": unet_lib.init_unet_params(unet, init_key),
    "text_encoder": init_text_encoder(text_encoder, settings.seed),
  }
  schedule = diffusion.make_noise_schedule(SCHEDULER_CONFIG)
  # The text encoder may learn faster than the UNet: it must separate 14 words
  # before the UNet can use them.
  tx = optax.multi_transform(
    {
      "unet": optax.adam(learning_rate(settings, settings.lr)),
      "text": optax.adam(learning_rate(settings, settings.lr * settings.text_lr_mult)),
    },
    {"unet": "unet", "text_encoder": "text"},
  )
  opt_state = tx.init(params)
  ema = params

  def loss_fn(p, x0, ids, rng):
    return base_loss(p, x0, ids, rng, unet=unet, text_encoder=text_encoder, schedule=schedule)

  @jax.jit
  def step(p, o, e, i, x0, ids, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, x0, ids, rng)
    updates, o = tx.update(grads, o, p)
    p = optax.apply_updates(p, updates)
    return p, o, ema_update(e, p, i, settings.ema_decay), loss

  rng = np.random.default_rng(settings.seed)
  losses, checks = [], []
  t0 = time.perf_counter()
  for i in range(max(settings.steps, settings.max_steps)):
    specs = [train_specs[j] for j in rng.integers(len(train_specs), size=settings.batch_size)]
    images = np.stack([world.render(s, rng, IMAGE_SIZE) for s in specs])
    corrupt = 0.0 if i < settings.clean_frac * settings.steps else settings.corrupt_frac
    caps = sample_captions(specs, rng, corrupt, settings.drop_frac)
    ids = np.stack([ids_of[c] for c in caps])
    params, opt_state, ema, loss = step(
      params, opt_state, ema, i, to_model_range(images), ids, jax.random.fold_in(key, i)
    )
    losses.append(loss)
    if progress is not None:
      progress(i + 1, loss)
    if on_params is not None:
      on_params(i + 1, ema, tokenizer)
    if is_check_step(settings, i + 1):
      pipe = as_pipeline(unet, ema, text_encoder, tokenizer)
      rates = judge_rates(pipe, train_specs, settings.check_seeds)
      checks.append({"step": i + 1, **rates})
      logging.info("Toy base: step %d, training prompts judged %s", i + 1, rates)
      if rates["all_three"] >= settings.target_all_three:
        break
  losses = [float(x) for x in jax.device_get(losses)]
  extra = {
    "settings": dataclasses.asdict(settings),
    "train_prompts": [s.text for s in train_specs],
    "heldout_prompts": [s.text for s in heldout],
    "steps_trained": len(losses),
    "checks": checks,
    "final_loss_mean_last_50": float(np.mean(losses[-50:])),
    "train_seconds": time.perf_counter() - t0,
  }
  write_pipeline(output, ema["unet"], ema["text_encoder"], len(tokenizer), extra)
  return output


def write_random_pipeline(output: str, seed: int = 1) -> str:
  """An untrained toy pipeline folder: random weights drawn in numpy (no init compile).

  For tests and benchmarks that need the toy's structure but not its training.
  """
  tok = write_tokenizer(os.path.join(output, "tokenizer"))
  unet = unet_lib.unet_from_config(UNET_CONFIG, "float32")
  abstract_unet = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
  unet_params = make_tiny_pipeline._random_params(abstract_unet, seed=seed)
  text = make_text_encoder(len(tok))
  text_params = make_tiny_pipeline._random_params(text.init_abstract(), seed=seed + 1)
  write_pipeline(output, unet_params, text_params, len(tok), {"random": True, "seed": seed})
  return output
