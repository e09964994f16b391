"""LoRA (`dpo_jax.lora`, `config.lora`): merge maths, training, checkpoints, export to PyTorch.

One 2-step DPO run with LoRA on the tiny SD1.5 pipeline (8 devices) gives a
checkpoint; it must hold only adapter tensors, start at loss log 2, and export
as a diffusers LoRA that PyTorch `load_lora_weights` takes without a warning
and that computes what dpo_jax computes.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is local.

import logging  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
from etils import epath  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402
from PIL import Image  # noqa: E402

from dpo_jax import checkpoint, export, lora, optim, sample, sharding, trainer  # noqa: E402
from dpo_jax import step as step_lib  # noqa: E402
from dpo_jax.models import loader  # noqa: E402
from dpo_jax.models import unet as unet_lib  # noqa: E402
from dpo_jax.tools.make_tiny_pipeline import make_tiny_pipeline  # noqa: E402
from tests.fixtures import (  # noqa: E402
  library_warnings,
  make_train_config,
  run_sample_cli,
  tiny_pipeline_train_config,
  torch_unet_inputs,
  write_pickapic_splits,
)

TOL = 1e-4  # float32 PyTorch vs XLA on the same weights.
RANK, ALPHA = 4, 8.0  # scale 2: a wrong alpha handling shows.


def test_merge_matches_numpy_for_dense_and_conv():
  rng = np.random.default_rng(0)
  base = {
    "blk": {
      "attn1": {"to_q": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=(5,))}},
      "conv1": {"kernel": rng.normal(size=(3, 3, 4, 7))},
      "norm": {"scale": rng.normal(size=(6,))},
    }
  }
  base = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
  targets = r".*/(to_q|conv1)/kernel"
  ad = lora.init_adapters(base, jax.random.PRNGKey(0), 2, targets)
  flat = flatten_dict(ad)
  assert sorted("/".join(k) for k in flat) == [
    "blk/attn1/to_q/kernel/lora_A",
    "blk/attn1/to_q/kernel/lora_B",
    "blk/conv1/kernel/lora_A",
    "blk/conv1/kernel/lora_B",
  ]
  # B = 0 at init: the merged tree is the base, bit for bit.
  for leaf_a, leaf_b in zip(jax.tree.leaves(lora.merge(base, ad, 2.0)), jax.tree.leaves(base)):
    np.testing.assert_array_equal(leaf_a, leaf_b)
  # A like PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
  a_conv = np.asarray(flat[("blk", "conv1", "kernel", "lora_A")])
  assert a_conv.shape == (3, 3, 4, 2) and 0.5 / 6 < np.abs(a_conv).max() <= 1 / 6
  ad = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), ad)
  merged = flatten_dict(lora.merge(base, ad, 2.0))
  fa, fb = flatten_dict(ad), flatten_dict(base)
  q = ("blk", "attn1", "to_q", "kernel")
  want_q = np.asarray(fb[q]) + 2.0 * np.asarray(fa[q + ("lora_A",)]) @ np.asarray(
    fa[q + ("lora_B",)]
  )
  np.testing.assert_allclose(merged[q], want_q, rtol=1e-6, atol=1e-6)
  c = ("blk", "conv1", "kernel")
  want_c = np.asarray(fb[c]) + 2.0 * np.einsum(
    "hwir,ro->hwio", np.asarray(fa[c + ("lora_A",)]), np.asarray(fa[c + ("lora_B",)])
  )
  np.testing.assert_allclose(merged[c], want_c, rtol=1e-5, atol=1e-5)
  for k in (("blk", "attn1", "to_q", "bias"), ("blk", "norm", "scale")):
    np.testing.assert_array_equal(merged[k], fb[k])
  with pytest.raises(ValueError, match=r"config.lora.targets=.*matches no parameter"):
    lora.init_adapters(base, jax.random.PRNGKey(0), 2, r".*/to_z/kernel")


def _state_and_batch(config, mesh, seed=0):
  """Sharded LoRA train state, base (= reference), a synthetic batch and the jitted step."""
  c = config
  unet = unet_lib.unet_from_config(c.model)
  tx, lr_fn = optim.make_optimizer(c.optim, c.max_steps)
  spec = step_lib.build_step_spec(c, unet_lib.make_unet_apply(unet), tx, lr_fn)
  rules = [tuple(r) for r in c.sharding_rules]
  init_rng = trainer.split_rngs(c.seed)[0]
  base = unet_lib.init_unet_params(unet, init_rng)
  state = step_lib.init_train_state(trainer._trained_params(c, base, init_rng), tx)
  state_sh = sharding.tree_shardings(state, mesh, rules, c.fsdp_min_size)
  base_sh = sharding.tree_shardings({"params": base}, mesh, rules, c.fsdp_min_size)["params"]
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  r = np.random.default_rng(seed)
  b, s = c.data.global_batch_size, c.model.sample_size
  batch = {
    "latents_w": r.normal(size=(b, 4, s, s)),
    "latents_l": r.normal(size=(b, 4, s, s)),
    "context": r.normal(size=(b, c.data.seq_len, c.model.cross_attention_dim)),
  }
  batch = jax.device_put({k: np.asarray(v, np.float32) for k, v in batch.items()}, batch_sh)
  fn = step_lib.jit_train_step(spec, state_sh, base_sh, batch_sh, repl)
  return (
    jax.device_put(state, state_sh),
    jax.device_put(base, base_sh),
    batch,
    fn,
    jax.device_put(jax.random.PRNGKey(1), repl),
  )


def test_full_unet_merges_only_for_a_lora_run():
  """What sampling, export and the toy evaluation use: config -> adapters merged, or params kept."""
  from configs import toy as toy_config

  base_unet = {"attn": {"to_q": {"kernel": jnp.ones((4, 3))}}, "conv": {"bias": jnp.zeros(3)}}
  adapters = {
    "attn": {"to_q": {"kernel": {"lora_A": jnp.full((4, 2), 0.5), "lora_B": jnp.ones((2, 3))}}}
  }
  c = toy_config.get_config()
  c.unlock()
  c.lora.rank, c.lora.alpha = 2, 4.0  # scale alpha / rank = 2
  # The run's ConfigDict, and the dict a checkpoint's meta holds, alike.
  for run_config in (c, c.to_dict()):
    merged = lora.full_unet(run_config, adapters, base_unet)
    # W + 2 * (A @ B) = 1 + 2 * (2 * 0.5 * 1) = 3 everywhere; other leaves are the base's.
    np.testing.assert_array_equal(merged["attn"]["to_q"]["kernel"], np.full((4, 3), 3.0))
    np.testing.assert_array_equal(merged["conv"]["bias"], base_unet["conv"]["bias"])
  c.lora.alpha = 0.0  # alpha 0 = rank: scale 1.
  assert lora.scale(c) == 1.0
  c.lora.rank = 0
  assert lora.scale(c) == lora.scale({}) == 0.0
  assert lora.full_unet(c, base_unet, {}) is base_unet  # A full fine-tune: its own params.


def test_lora_steps_agree_on_one_and_eight_devices():
  """Two LoRA DPO steps: step 1 is exactly log 2 (B = 0), and 1 device = FSDP 2 x 4."""
  # "matched" forwards: B = 0 makes the merged policy bit-equal to the base,
  # so step 1 is exactly log 2 (float32's default traces them separately).
  config = make_train_config(
    **{
      "lora.rank": RANK,
      "lora.alpha": ALPHA,
      "optim.warmup_frac": 0.0,
      "optim.lr": 1e-3,
      "precision.reference_forward": "matched",
    }
  )
  results = []
  for data, fsdp in ((1, 1), (2, 4)):
    mesh = sharding.make_mesh(data, fsdp, jax.devices()[: data * fsdp])
    state, base, batch, fn, rng = _state_and_batch(config, mesh)
    losses = []
    for _ in range(2):
      state, m = fn(state, base, batch, rng)
      losses.append(float(m["loss"]))
    # Only adapters are trained and in the optimizer state.
    paths = [sharding.path_to_str(p) for p, x in jax.tree_util.tree_leaves_with_path(state)]
    big = [p for p, x in zip(paths, jax.tree.leaves(state)) if np.ndim(x) > 0]
    assert big and all(p.endswith(("lora_A", "lora_B")) for p in big), big
    results.append((losses, jax.tree.map(np.asarray, state.params)))
  (l1, p1), (l8, p8) = results
  assert l1[0] == np.float32(np.log(2.0)) and l8[0] == np.float32(np.log(2.0))
  assert l1[1] != l1[0]  # The adapters moved after step 1.
  np.testing.assert_allclose(l1, l8, rtol=1e-4)
  b = [np.abs(x).max() for k, x in flatten_dict(p1).items() if k[-1] == "lora_B"]
  assert max(b) > 1e-4  # B moved off 0, so the comparison below means something.
  # Adam steps are ~lr (1e-3) per element whatever the gradient's size, so a
  # wrong gradient on either mesh shows at that scale; float reassociation
  # moves a few elements by ~1e-5.
  num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))))
  den = np.sqrt(sum(np.sum(y**2) for y in jax.tree.leaves(p8)))
  assert num / den < 1e-4, (num, den)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=5e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(base pipeline dir, workdir, result) of a 2-step LoRA DPO run on the tiny SD1.5 pipeline."""
  root = tmp_path_factory.mktemp("lora")
  pipe = make_tiny_pipeline("sd15", str(root / "pipe"), seed=0)
  parquet = write_pickapic_splits(root / "parquet", 16)
  workdir = str(root / "run")
  config = tiny_pipeline_train_config(
    "sd15",
    pipe,
    str(parquet),
    **{
      "lora.rank": RANK,
      "lora.alpha": ALPHA,
      "max_steps": 2,
      "checkpoint_every": 2,
      "optim.grad_accum": 1,
      "optim.warmup_frac": 0.0,
      "optim.lr": 1e-2,
      "data.global_batch_size": 8,
      "precision.reference_forward": "matched",  # Step 1 exactly log 2 (B = 0).
    },
  )
  return pipe, workdir, trainer.train_and_evaluate(config, workdir)


def test_lora_run_starts_at_log2_and_checkpoints_only_adapters(run):
  _, workdir, result = run
  losses = [h["loss"] for h in result["history"]]
  assert losses[0] == np.float32(np.log(2.0)) and losses[1] != losses[0]
  assert np.isfinite(result["eval"]["loss"])
  step_dir = checkpoint.resolve_step_dir(workdir)
  tree = checkpoint._read_tree_metadata(epath.Path(step_dir) / "state")
  arrays = {
    sharding.path_to_str(p): m.shape
    for p, m in jax.tree_util.tree_leaves_with_path(tree)
    if len(m.shape) > 0 and sharding.path_to_str(p).startswith("train_state/")
  }
  base = safetensors.numpy.load_file(os.path.join(run[0], "unet", export.UNET_WEIGHTS))
  projections = [k for k in base if re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)]
  # Params and both AdamW moments, adapters only: every attention projection x (A, B).
  assert len(arrays) == 3 * 2 * len(projections) > 0, sorted(arrays)
  assert all(k.endswith(("lora_A", "lora_B")) for k in arrays), sorted(arrays)
  n_state = sum(int(np.prod(s)) for s in arrays.values())
  assert n_state < 0.2 * sum(v.size for v in base.values())


def _load_lora_logged(pipe_dir, lora_dir):
  """(PyTorch pipeline with the LoRA loaded, warnings logged or raised while loading it)."""
  import diffusers

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipe_dir)
  with library_warnings() as messages:
    # weight_name: with HF_HUB_OFFLINE set (as on CI) diffusers will not guess it.
    pipe.load_lora_weights(lora_dir, weight_name=export.LORA_WEIGHTS)
  return pipe, messages


def test_pytorch_load_lora_weights_matches_dpo_jax(run, tmp_path):
  pipe_dir, workdir, _ = run
  adapters, meta = checkpoint.load_params_for_inference(workdir)
  scale = ALPHA / RANK
  # Large random adapters: the trained ones moved little in 2 steps, and a
  # LoRA ignored, transposed or mis-scaled must show far above TOL.
  r = np.random.default_rng(0)
  adapters = jax.tree.map(
    lambda x: jnp.asarray(0.2 * r.normal(size=x.shape), jnp.float32), adapters
  )
  lora_dir = str(tmp_path / "lora")
  export.write_lora(adapters, scale, lora_dir, base=pipe_dir)
  state = safetensors.numpy.load_file(os.path.join(lora_dir, export.LORA_WEIGHTS))
  # diffusers' PEFT naming: the PyTorch module path ("to_out.0"), prefixed "unet.".
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"
  assert key in state, sorted(state)[:4]
  pipe, messages = _load_lora_logged(pipe_dir, lora_dir)
  # diffusers' one warning for *every* UNet-only LoRA (its own DPO LoRA
  # script's too), which it calls "safe to ignore": no text-encoder keys.
  benign = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'"
  assert [m for m in messages if not m.startswith(benign)] == [], messages

  x, t, context, _ = torch_unet_inputs("sd15", pipe.unet.config.cross_attention_dim)
  with torch.no_grad():
    want = pipe.unet(x, t, context).sample.numpy()
    pipe.unet.disable_adapters()
    base_out = pipe.unet(x, t, context).sample.numpy()
  flax_unet, base = loader.load_unet(os.path.join(pipe_dir, "unet"))
  got = jax.jit(unet_lib.make_unet_apply(flax_unet))(
    lora.merge(base, adapters, scale),
    jnp.asarray(x.numpy()),
    jnp.asarray(t.numpy()),
    jnp.asarray(context.numpy()),
  )
  diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  effect = float(np.max(np.abs(want - base_out)))
  print(f"PyTorch+LoRA vs dpo_jax max abs diff {diff:.2e}; LoRA's effect {effect:.2e}")
  assert diff <= TOL and effect > 100 * TOL


def test_warning_capture_is_live(run, tmp_path):
  """A LoRA file with a key the UNet lacks trips the no-warning check above."""
  pipe_dir, workdir, _ = run
  adapters, _ = checkpoint.load_params_for_inference(workdir)
  lora_dir = str(tmp_path / "bad")
  export.write_lora(adapters, 1.0, lora_dir)
  path = os.path.join(lora_dir, export.LORA_WEIGHTS)
  state = safetensors.numpy.load_file(path)
  key = next(k for k in state if k.endswith("attn1.to_q.lora_A.weight"))
  state[key.replace("attn1.to_q", "attn1.to_nothing")] = state[key]
  state[key.replace("attn1.to_q", "attn1.to_nothing").replace("lora_A", "lora_B")] = state[
    key.replace("lora_A", "lora_B")
  ]
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
  # As an in-process CLI main() before leaves it (logs.quiet_libraries): the
  # capture must not depend on it (CI stop 25 ran that way and missed the warning).
  # A module logger silenced on its own too.
  diffusers_logger = logging.getLogger("diffusers")
  module_logger = logging.getLogger("diffusers.utils.peft_utils")
  level = diffusers_logger.level
  diffusers_logger.setLevel(logging.ERROR)
  module_logger.disabled = True
  try:
    _, messages = _load_lora_logged(pipe_dir, lora_dir)
  finally:
    # Restored by the capture.
    assert diffusers_logger.level == logging.ERROR and module_logger.disabled
    diffusers_logger.setLevel(level)
    module_logger.disabled = False
  assert any("to_nothing" in m for m in messages), messages


def test_sample_cli_merges_a_lora_run_into_its_base(run, tmp_path):
  """`python -m dpo_jax.sample --checkpoint=<LoRA run>` samples base + adapters, merged."""
  pipe_dir, workdir, _ = run
  prompt = "a photo of a cat"
  (tmp_path / "prompts.txt").write_text(prompt + "\n")
  out = tmp_path / "out"
  run_sample_cli(
    f"--checkpoint={workdir}",
    f"--prompts={tmp_path / 'prompts.txt'}",
    f"--output={out}",
    "--num_images_per_prompt=1",
    "--seed=3",
    "--num_inference_steps=2",
    "--guidance_scale=2",
    "--mesh=1",
  )
  got = np.asarray(Image.open(out / "00000_3.png"))
  adapters, _ = checkpoint.load_params_for_inference(workdir)
  pipeline = loader.load_pipeline(pipe_dir)
  settings = sample.SampleSettings(2, 2.0, batch_size=16, num_devices=1)
  merged = lora.merge(pipeline.unet_params, adapters, ALPHA / RANK)
  (want,) = sample.generate(pipeline, merged, [prompt], [3], settings)
  (base_image,) = sample.generate(pipeline, pipeline.unet_params, [prompt], [3], settings)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, base_image)  # The adapters were applied, not dropped.


def test_export_merge_and_errors(run, tmp_path):
  pipe_dir, workdir, _ = run
  adapters, _ = checkpoint.load_params_for_inference(workdir)
  out = export.export(workdir, str(tmp_path / "merged"), unet_only=True, mode="merge")
  merged = safetensors.numpy.load_file(os.path.join(out, "unet", export.UNET_WEIGHTS))
  base = safetensors.numpy.load_file(os.path.join(pipe_dir, "unet", export.UNET_WEIGHTS))
  assert set(merged) == set(base)
  mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
  ad = flatten_dict(adapters)
  path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
  a, b = np.asarray(ad[path + ("lora_A",)]), np.asarray(ad[path + ("lora_B",)])
  assert np.abs(b).max() > 0  # Trained: B moved off 0.
  # PyTorch layout [out, in]: W + scale * (A B)^T.
  want = base[f"{mod}.weight"] + (ALPHA / RANK) * (a @ b).T
  np.testing.assert_allclose(merged[f"{mod}.weight"], want, rtol=1e-6, atol=1e-7)
  assert not np.array_equal(merged[f"{mod}.weight"], base[f"{mod}.weight"])
  for k in ("conv_in.weight", f"{mod.replace('to_k', 'to_out.0')}.bias"):
    np.testing.assert_array_equal(merged[k], base[k])
  with pytest.raises(ValueError, match="holds LoRA adapters only.*--lora.*--merge"):
    export.export(workdir, str(tmp_path / "plain"))
