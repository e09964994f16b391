"""Prompt and image conditioning for SD1.5 / SDXL, as diffusers' pipelines compute it.

Everything here is a pure function of (module, params, arrays) and can be
jitted, except `tokenize` (host-side strings -> ids). Outputs follow the batch
format of `dpo_jax.step`:

  SD1.5: context = last hidden state of CLIP ViT-L            [B, 77, 768]
  SDXL:  context = concat(penultimate hidden state of CLIP ViT-L,
                          penultimate hidden state of OpenCLIP bigG)  [B, 77, 2048]
         added_cond = {"text_embeds": bigG pooled + projection [B, 1280],
                       "time_ids": (orig_h, orig_w, crop_top, crop_left,
                                    target_h, target_w)         [B, 6]}
  latents = (VAE posterior (mean or sample) - shift) * scaling    [B, 4, H/8, W/8]

which is what `StableDiffusion(XL)Pipeline.encode_prompt` / `_get_add_time_ids`
and the diffusers SDXL (DPO) training scripts compute (clip_skip unset).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import tokenizer as tokenizer_lib

if TYPE_CHECKING:  # loader imports the models; only the type is needed here.
  from dpo_jax.models.loader import Pipeline

# Re-exported: CLIP's caption cleaning lives with the tokenizer.
clip_text_clean = tokenizer_lib.clip_text_clean

Params = dict[str, Any]


def tokenize(tokenizer: tokenizer_lib.CLIPTokenizer, prompts: Sequence[str]) -> np.ndarray:
  """Prompts -> int32 ids [B, L], L = tokenizer.model_max_length (77).

  Exactly openai/CLIP's `clip.tokenize(truncate=True)` (= open_clip's):
  captions cleaned by `clip_text_clean`, split by CLIP's regex and byte-level
  BPE, start token, at most L - 2 caption tokens (long Pick-a-Pic captions
  lose their tail), end token; then padded to L with the tokenizer's pad token
  (end-of-text for SD1.5 / SDXL's first tokenizer, "!" for SDXL's second), as
  diffusers' pipelines pad. See `models.tokenizer` for the one transformers
  quirk (a "!" in a caption) this does not copy.

  Args:
    tokenizer: `models.tokenizer.CLIPTokenizer` (what `models.loader.load_tokenizer`
      returns).
    prompts: B captions.
  """
  return tokenizer(prompts)["input_ids"]


def _run_text_encoder(text_encoder: Any, params: Params, input_ids: jax.Array) -> Any:
  """CLIP forward with all hidden states; input_ids [B, L] -> model output."""
  # No padding mask: SD's text encoders were trained (and are used by the
  # pipelines) attending to the padding tokens; only CLIP's causal mask applies.
  attention_mask = jnp.ones_like(input_ids)
  position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  return text_encoder.apply(
    {"params": params},
    input_ids,
    attention_mask,
    position_ids,
    deterministic=True,
    output_hidden_states=True,
  )


def encode_prompt_sd15(
  text_encoder: Any, params: Params, input_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """SD1.5 context: the final (layer-normed) hidden state, and CLIP's pooled output.

  Args:
    text_encoder: `models.clip.CLIPTextModel` (`Pipeline.text_encoder`).
    params: its params.
    input_ids: [B, L] int token ids from `tokenize`.

  Returns:
    context [B, L, D] (D = 768 for CLIP ViT-L);
    pooled [B, D]: the end-of-text token's final state (CLIP's `pooler_output`,
      unused by the SD1.5 UNet; Diffusion-RPO embeds prompts with it).
  """
  out = _run_text_encoder(text_encoder, params, input_ids)
  return out.last_hidden_state, out.pooler_output


def encode_prompt_sdxl(
  text_encoder: Any,
  params: Params,
  text_encoder_2: Any,
  params_2: Params,
  input_ids: jax.Array,
  input_ids_2: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """SDXL context and pooled text embeds.

  Args:
    text_encoder, params: CLIP ViT-L (`Pipeline.text_encoder`).
    text_encoder_2, params_2: OpenCLIP bigG with projection (`Pipeline.text_encoder_2`).
    input_ids: [B, L] ids from `Pipeline.tokenizer`.
    input_ids_2: [B, L] ids from `Pipeline.tokenizer_2` (it pads with "!", not
      end-of-text, so the two id arrays differ).

  Returns:
    context [B, L, D1 + D2] (2048): both encoders' *penultimate* hidden states
      (before the last layer and the final layer norm), encoder 1 first;
    pooled [B, P] (1280): encoder 2's projected end-of-text embedding.
  """
  out_1 = _run_text_encoder(text_encoder, params, input_ids)
  out_2 = _run_text_encoder(text_encoder_2, params_2, input_ids_2)
  # hidden_states = (embeddings, layer 1, ..., layer N): [-2] is layer N-1's output.
  context = jnp.concatenate([out_1.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
  return context, out_2.text_embeds


def add_time_ids(
  original_size: jax.Array | Sequence[int],
  crop_top_left: jax.Array | Sequence[int],
  target_size: jax.Array | Sequence[int],
) -> jax.Array:
  """SDXL micro-conditioning ids, (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

  Args:
    original_size: [..., 2] (height, width) of the image before resizing/cropping.
    crop_top_left: [..., 2] (top, left) of the crop in the resized image.
    target_size: [..., 2] (height, width) of the training/generation resolution.
      Leading axes broadcast (one size for the whole batch, or one per sample).

  Returns:
    float32 [..., 6].
  """
  parts = [jnp.asarray(x, jnp.float32) for x in (original_size, crop_top_left, target_size)]
  shape = jnp.broadcast_shapes(*(p.shape for p in parts))
  return jnp.concatenate([jnp.broadcast_to(p, shape) for p in parts], axis=-1)


def sdxl_added_cond(text_embeds: jax.Array, time_ids: jax.Array) -> dict[str, jax.Array]:
  """The UNet's `added_cond_kwargs`: text_embeds [B, P], time_ids [B, 6] (broadcast to B)."""
  time_ids = jnp.broadcast_to(time_ids, (text_embeds.shape[0], time_ids.shape[-1]))
  return {"text_embeds": text_embeds, "time_ids": time_ids}


def make_prompt_encoder(
  pipeline: Any,
) -> Callable[[Sequence[str]], tuple[jax.Array, jax.Array | None]]:
  """`encode(prompts) -> (context, pooled)` for a loaded `Pipeline` (see `encode_prompt_*`).

  Build it once and reuse it: the encoder(s) are jitted here, closing over the
  modules, with the params passed as arguments (not baked into the executable
  as constants).
  """
  if pipeline.kind == "sd15":
    encode_ids = jax.jit(functools.partial(encode_prompt_sd15, pipeline.text_encoder))

    def encode(prompts):
      ids = tokenize(pipeline.tokenizer, prompts)
      return encode_ids(pipeline.text_encoder_params, ids)

    return encode

  encode_ids_xl = jax.jit(
    lambda p1, p2, ids, ids_2: encode_prompt_sdxl(
      pipeline.text_encoder, p1, pipeline.text_encoder_2, p2, ids, ids_2
    )
  )

  def encode_xl(prompts):
    ids = tokenize(pipeline.tokenizer, prompts)
    ids_2 = tokenize(pipeline.tokenizer_2, prompts)
    return encode_ids_xl(pipeline.text_encoder_params, pipeline.text_encoder_2_params, ids, ids_2)

  return encode_xl


def vae_encode(
  vae: Any,
  params: Params,
  images: jax.Array,
  scaling_factor: float,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Images -> scaled latents, the UNet's x0: (posterior - shift_factor) * scaling_factor.

  Args:
    vae: `models.vae.AutoencoderKL` (`Pipeline.vae`); its `shift_factor`
      (config.json, 0 when unset as in SD1.5 / SDXL) is subtracted first.
    params: its params.
    images: [B, 3, H, W] in [-1, 1].
    scaling_factor: `Pipeline.vae_scaling_factor` (0.18215 SD1.5, 0.13025 SDXL).
    rng: None -> the posterior mean (deterministic; what a latent cache should
      store); a key -> a posterior sample mean + std * N(0, 1), which is what
      the official DPO / diffusers training scripts use. The posterior std of
      the SD VAEs is tiny, so the two differ little.

  Returns:
    latents [B, C, H/f, W/f] (channels first, the batch format), f = 2^(levels-1).
  """
  posterior = vae.apply({"params": params}, images, method="encode")
  latents = posterior.mode() if rng is None else posterior.sample(rng)
  return (latents - vae.shift_factor) * scaling_factor


def vae_decode(vae: Any, params: Params, latents: jax.Array, scaling_factor: float) -> jax.Array:
  """Scaled latents [B, C, h, w] -> images [B, 3, H, W] (roughly [-1, 1], unclipped)."""
  unscaled = latents / scaling_factor + vae.shift_factor
  return vae.apply({"params": params}, unscaled, method="decode")


# ---------------------------------------------------- a loaded pipeline's prompts


def frozen_params(pipeline: Pipeline) -> dict[str, Any]:
  """The encoder parameters the encode stage needs (not the UNet's)."""
  out = {"text_encoder": pipeline.text_encoder_params}
  if pipeline.vae is not None:
    out["vae"] = pipeline.vae_params
  if pipeline.kind == "sdxl":
    out["text_encoder_2"] = pipeline.text_encoder_2_params
  return out


def make_tokenize_fn(pipeline: Pipeline) -> Callable[[Sequence[str]], np.ndarray]:
  """Captions -> int32 ids [B, L] (SD1.5) or [B, 2, L] (SDXL), 77 tokens, truncated."""
  if pipeline.kind == "sd15":
    return lambda captions: tokenize(pipeline.tokenizer, captions)

  def tokenize_xl(captions):
    ids = tokenize(pipeline.tokenizer, captions)
    ids_2 = tokenize(pipeline.tokenizer_2, captions)
    return np.stack([ids, ids_2], axis=1)

  return tokenize_xl


def encode_text(pipeline: Pipeline, params: dict[str, Any], input_ids: jax.Array):
  """-> (context [B, L, D], pooled [B, P]): the UNet's context and the pooled prompt.

  pooled is SDXL's `text_embeds` (text_encoder_2, projected); for SD1.5 it is
  the text encoder's `pooler_output`, which only Diffusion-RPO uses.
  """
  if pipeline.kind == "sd15":
    return encode_prompt_sd15(pipeline.text_encoder, params["text_encoder"], input_ids)
  return encode_prompt_sdxl(
    pipeline.text_encoder,
    params["text_encoder"],
    pipeline.text_encoder_2,
    params["text_encoder_2"],
    input_ids[:, 0],
    input_ids[:, 1],
  )


def empty_prompt_conditioning(pipeline: Pipeline) -> dict[str, np.ndarray]:
  """The empty prompt's conditioning (caption dropout): context [L, D] (+ text_embeds [P])."""
  ids = make_tokenize_fn(pipeline)([""])
  context, pooled = encode_text(pipeline, frozen_params(pipeline), jnp.asarray(ids))
  out = {"context": np.asarray(context[0])}
  if pipeline.kind == "sdxl":
    out["text_embeds"] = np.asarray(pooled[0])
  return out
