"""Stable Diffusion 1.5 (and 2.x) Diffusion-DPO on Pick-a-Pic v2, official settings.

  python -m dpo_jax.train --config=configs/sd15.py --workdir=gs://bucket/run \
      --config.pretrained_path=/path/to/stable-diffusion-v1-5 \
      --config.data.path=/path/to/pickapic_v2/data

Official recipe (Wallace et al. 2023; BRIEF §1): beta 5000, AdamW, effective
batch 2048 pairs (16 GPUs x 1 x 128 accumulation), lr 1e-8 per pair scaled by
the batch (2.048e-5), constant after 25 % warmup, 2000 steps, 512 px, random
crop + flip, caption dropout 0.2. Memory: fp32 master + AdamW + bf16 reference
is ~15.5 GB for the 860M UNet, so plain data parallelism fits on 16+ GB chips;
set mesh.fsdp > 1 on smaller ones.

Activations: the 16-pair micro-step is 1 pair per chip on the official 16
chips. With more pairs per chip, rematerialise and chunk the attention
(`--config.model.remat=blocks --config.model.attention=chunked`):
for 16 pairs on one chip the planner's XLA temp estimate drops from 219 GiB to
37 GiB (`python -m dpo_jax.tools.plan --config=configs/sd15.py
--mesh=data=1,fsdp=1`), for ~22 % more FLOPs (remat) plus the chunked
attention's own recompute.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg="sft"` selects the SFT baseline on the same data."""
  c = common.get_base_config()
  c.objective = "sft" if arg == "sft" else "dpo"
  if arg not in (None, "", "sft"):
    raise ValueError(f"Unknown sd15 variant {arg!r}; expected '' or 'sft'.")
  c.beta = 5000.0
  c.max_steps = 2000
  c.log_every = 10
  c.eval_every = 200
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.pretrained_path = ""  # Required: a diffusers SD1.5 folder.

  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.precision.compute_dtype = "bfloat16"
  c.precision.ref_dtype = "bfloat16"

  c.optim.name = "adamw"
  c.optim.lr = 1e-8 * 2048
  c.optim.warmup_frac = 0.25
  c.optim.weight_decay = 1e-2
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 128

  c.data.source = "pickapic"
  c.data.global_batch_size = 2048
  c.data.eval_batch_size = 64
  c.data.resolution = 512
  c.data.caption_dropout = 0.2
  c.lock()
  return c
