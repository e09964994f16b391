"""The shipped bf16 precision settings on the tiny SD1.5 / SDXL pipelines: step 0 is exactly log 2.

configs/sd15.py and sdxl.py compute in bf16 with a bf16 reference at beta =
5000, where any policy-vs-reference rounding difference d becomes a logit of
2500 d. With equal weights the default `precision.reference_forward`
("matched") must give bit-identical MSEs; the "separate" path, which traces
the two forwards differently, is the deliberately mismatched one the guard
must stop.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import optim
from dpo_jax import step as step_lib
from dpo_jax.models import loader
from dpo_jax.models import unet as unet_lib
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline

PAIRS = 8


def _shipped_config(kind: str, **precision):
  from configs import sd15, sdxl

  c = (sd15 if kind == "sd15" else sdxl).get_config()
  c.unlock()
  c.optim.grad_accum = 2  # The shipped configs accumulate micro-batches too.
  c.optim.warmup_frac = 0.0
  for k, v in precision.items():
    c.precision[k] = v
  return c


def _batch(kind: str, unet_dir: str) -> dict:
  cfg = json.load(open(os.path.join(unet_dir, "config.json")))
  rng = np.random.default_rng(0)
  side = cfg["sample_size"]
  batch = {
    "latents_w": rng.normal(size=(PAIRS, 4, side, side)),
    "latents_l": rng.normal(size=(PAIRS, 4, side, side)),
    "context": rng.normal(size=(PAIRS, 77, cfg["cross_attention_dim"])),
  }
  if kind == "sdxl":
    time_dims = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    batch["added_cond"] = {
      "text_embeds": rng.normal(size=(PAIRS, time_dims)),
      "time_ids": np.tile([32.0, 32, 0, 0, 32, 32], (PAIRS, 1)),
    }
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), batch)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipeline(request, tmp_path_factory):
  kind = request.param
  folder = make_tiny_pipeline(kind, str(tmp_path_factory.mktemp(kind)), seed=0)
  unet_dir = os.path.join(folder, "unet")
  unet, params = loader.load_unet(unet_dir, dtype=jnp.bfloat16)
  return kind, unet, params, _batch(kind, unet_dir)


def _first_step(kind, unet, params, batch, **precision):
  config = _shipped_config(kind, **precision)
  tx, lr_fn = optim.make_optimizer(config.optim, config.max_steps)
  # The empty prompt's conditioning for the shipped caption dropout (0.2).
  uncond = {k: np.zeros(v.shape[1:], np.float32) for k, v in batch.items() if k == "context"}
  if "added_cond" in batch:
    uncond["text_embeds"] = np.zeros(batch["added_cond"]["text_embeds"].shape[1:], np.float32)
  spec = step_lib.build_step_spec(config, unet_lib.make_unet_apply(unet), tx, lr_fn, uncond)
  ref_dtype = unet_lib.parse_dtype(config.precision.ref_dtype)
  ref = jax.tree.map(lambda x: x.astype(ref_dtype), params)
  state = step_lib.init_train_state(params, tx)
  train = jax.jit(lambda s, r, b, k: step_lib.train_step(s, r, b, k, spec=spec))
  _, m = train(state, ref, batch, jax.random.PRNGKey(0))
  return spec, jax.device_get(m)


def test_shipped_bf16_settings_give_exactly_log2(pipeline):
  kind, unet, params, batch = pipeline
  spec, m = _first_step(kind, unet, params, batch)
  assert spec.beta == 5000.0 and spec.reference_forward == "matched"
  assert jnp.dtype(spec.compute_param_dtype) == jnp.bfloat16
  assert float(m["max_abs_logit"]) == 0.0
  assert np.float32(m["loss"]) == np.float32(np.log(2.0))
  assert float(m["model_mse_w"]) == float(m["ref_mse_w"]) > 0
  assert float(m["grad_norm"]) > 0
  step_lib.check_reference_match(m, spec)


def test_guard_stops_the_separately_traced_forwards(pipeline):
  kind, unet, params, batch = pipeline
  spec, m = _first_step(kind, unet, params, batch, reference_forward="separate")
  # What both shipped configs trained on before: rounding noise times beta / 2.
  # Measured at step 0: sd15 tiny pipeline above the guard's 1e-2, the tiny
  # SDXL UNet 3e-4 (below it: the guard tolerates noise that small).
  logit = float(m["max_abs_logit"])
  assert logit > 0, "separately traced bf16 forwards were expected to round differently"
  tol = step_lib.REFERENCE_MATCH_TOL if kind == "sd15" else 0.0
  assert logit > tol
  with pytest.raises(step_lib.ReferenceMismatchError, match="reference_forward='separate'"):
    step_lib.check_reference_match(m, spec, tol)
