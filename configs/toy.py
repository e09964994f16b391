"""The toy world (the out-of-the-box default): DPO on a procedural text-to-image task.

`python -m dpo_jax.train` with no flags uses this config: it builds (or reuses
from `toy.cache_dir`) a pretrained toy base pipeline and its preference pairs
(`dpo_jax.toy`), fine-tunes the base with DPO through the real Pick-a-Pic data
path, and prints the reward before / after. `python -m dpo_jax.toy` runs the
full base vs DPO vs SFT vs RPO comparison and the style-alignment run.

  python -m dpo_jax.train                                 # this config, DPO
  python -m dpo_jax.train --config=configs/toy.py:sft     # SFT on the winners
  python -m dpo_jax.train --config=configs/toy.py:rpo     # Diffusion-RPO
  python -m dpo_jax.train --config=configs/toy.py:style   # DPO toward a style
  python -m dpo_jax.train --config.toy.base_steps=300 --config.toy.base_max_steps=0
                                                          # a quicker, weaker base
"""

from __future__ import annotations

import ml_collections

from configs import common


def toy_settings() -> ml_collections.ConfigDict:
  """The toy world's own settings (base pretraining, pairs, evaluation)."""
  t = ml_collections.ConfigDict()
  # Where built bases / pair sets are kept and reused ("" = ~/.cache/dpo_jax/toy).
  t.cache_dir = ""
  t.seed = 0
  t.num_heldout = 8  # Held-out prompt combinations (of 48).
  # Base pretraining (SFT of UNet + text encoder on imperfect captions).
  # At least base_steps steps; then, every base_check_every steps, the judge
  # scores samples of the training prompts and pretraining stops once all three
  # attributes are right for base_target_all_three of them (or at
  # base_max_steps; 0 = exactly base_steps). When a base learns the quadrant
  # words varies with the seed: this fixes its quality, not its step count.
  # The target is past the plateau before that jump (~50 % all three, quadrant
  # ~50 %, where DPO gained nothing on training prompts), and judged on as many
  # samples as the report's training-prompt rows (40 prompts x 4 seeds).
  t.base_steps = 750
  t.base_max_steps = 2000
  t.base_check_every = 250
  t.base_check_seeds = 4
  t.base_target_all_three = 0.6
  t.base_batch_size = 32
  t.base_lr = 1e-3
  t.base_text_lr_mult = 1.0  # The text encoder's lr = base_lr * this.
  # "constant", or "cosine" (warmup, then decay to a tenth of base_lr).
  t.base_lr_schedule = "constant"
  t.base_ema_decay = 0.995  # EMA of the base's weights (0 = off); the EMA is what is saved.
  t.corrupt_frac = 0.3  # Captions lying about colour or position.
  t.clean_frac = 0.0  # The first clean_frac of the base steps use uncorrupted captions.
  t.drop_frac = 0.1  # Empty captions (classifier-free guidance).
  # Preference pairs: every within-prompt pair of `pair_seeds` base samples.
  t.pair_seeds = 16
  t.pair_prompts = 0  # Training prompts that get pairs (0 = all 40).
  t.min_gap = 0.3
  t.tie_tol = 1e-3
  # Sampling (pairs and evaluation): DDIM steps and guidance.
  t.sample_steps = 20
  t.guidance_scale = 3.0
  # Evaluation seeds per prompt: held-out prompts (8) and training prompts (40).
  t.eval_seeds = 24
  t.eval_seeds_train = 4
  # Style alignment (`dpo_jax.data.style`): "" = the reward pairs; a style name
  # (e.g. "amber_duotone") trains on (styled image > original) pairs built from
  # the reward pairs' images, and evaluation adds that style's score.
  t.style = ""
  return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Toy DPO config; `arg="sft"` selects the SFT baseline on the same pairs."""
  c = common.get_base_config()
  c.toy = toy_settings()
  c.objective = "dpo"
  # Tuned on the training prompts only (`python -m dpo_jax.toy.tune`, table in
  # docs/toy_experiments.md): of beta 500 / 2000 x lr 1e-4 / 3e-5 x 100-400
  # steps on seeds 0 and 1, beta 500, lr 1e-4, 100 steps had the best worst-seed
  # lower 95 % bound of the all-three change (+9.4 points; tied with lr 3e-5 x
  # 400 steps, higher mean: +18.4). At lr 1e-4 longer runs lose the shape (seed
  # 0: +6.9 at 200 steps, -9.4 at 400). The warmup (40 steps) is the tuning
  # run's, so this run is the checkpoint that was scored.
  c.beta = 500.0
  c.max_steps = 100
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 100
  c.keep_checkpoints = 1
  c.optim.lr = 1e-4
  c.optim.warmup_frac = 0.4
  c.data.source = "pickapic"
  c.data.global_batch_size = 16
  c.data.eval_batch_size = 32
  c.data.resolution = 16
  c.data.random_crop = False
  c.data.flip = "none"  # Position is part of the prompt: a flip would change it.
  c.data.caption_dropout = 0.0
  c.data.eval_split = "train"
  c.data.keep_extra_columns = False
  c.data.num_threads = 2
  # pretrained_path / data.path: filled in from the toy cache unless given.
  if arg == "sft":
    c.objective = "sft"
  elif arg == "rpo":
    # Diffusion-RPO: every winner vs every loser of the batch, weighted by the
    # similarity of the prompts' pooled CLIP text embeddings (the base's own
    # text encoder).
    c.objective = "rpo"
    c.rpo.embedding = "text"
  elif arg == "style":
    c.toy.style = "amber_duotone"
  elif arg:
    raise ValueError(f"Unknown toy variant {arg!r}; expected '', 'sft', 'rpo' or 'style'.")
  c.lock()
  return c
