"""Defaults shared by every config; variants import this and override fields.

Every field a command line may override must exist here, because configs are
locked (`lock_config`) so that a typo such as `--config.max_step=5` fails
loudly instead of being ignored.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the full default config tree (values sized for a CPU smoke run)."""
  c = ml_collections.ConfigDict()

  c.seed = 0
  # "dpo" | "sft" | "rpo" (Diffusion-RPO, BRIEF §2) | "mapo" | "kto" | "dspo" | "sdpo"
  # (the losses after DPO, README "Objectives"; their settings below).
  c.objective = "dpo"
  # DPO temperature; the official SD1.5/SDXL runs use 5000. RPO uses it too.
  c.beta = 5000.0
  # Diffusion-RPO: every winner vs every loser of the global batch, weighted by
  # w_ij = softmax_j(-(1 - cos(e_i, e_j)) / tau) over frozen-CLIP pair embeddings.
  # tau: the authors' LM code default `distance_temperature` (rpo-paired.yaml).
  # embedding: what the data side embeds per pair, "text" | "image" |
  # "text+image" (the paper's cross-modal variant). Needs optim.grad_accum == 1.
  c.rpo = ml_collections.ConfigDict()
  c.rpo.tau = 0.5
  c.rpo.embedding = "text"
  # "text": the pipeline's own frozen CLIP text encoder (pooled output; SDXL:
  # text_encoder_2's projected embeds). "image" / "text+image" also need a CLIP
  # model folder (transformers format) for the image tower.
  c.rpo.clip_path = ""
  # Objectives after DPO; defaults are the authors' (dpo_jax/losses.py names the files).
  # MaPO (reference-free): loss = mean(m_w) - beta * mean(log sigmoid(T (f(m_w) - f(m_l)))),
  # f(m) = s m / (exp(s m) - 1); mapo-t2i/mapo args.py: beta_mapo 0.1, snr_value 0.5.
  c.mapo = ml_collections.ConfigDict()
  c.mapo.beta = 0.1
  c.mapo.snr_value = 0.5
  # Diffusion-KTO on the pairs split into liked winners and disliked losers:
  # beta 1000 (--beta_dpo), lambda_d / lambda_u weight liked / disliked images.
  c.kto = ml_collections.ConfigDict()
  c.kto.beta = 1000.0
  c.kto.lambda_d = 1.0
  c.kto.lambda_u = 1.0
  # DSPO: its own beta (the authors' SD1.5 launcher: 0.001; searched 0.001-0.05).
  c.dspo = ml_collections.ConfigDict()
  c.dspo.beta = 0.001
  # SDPO = Diffusion-DPO (c.beta) with the loser's gradient scaled to keep a share
  # mu of the winner's descent; the authors' SD1.5 DPO launcher uses mu 0.9.
  c.sdpo = ml_collections.ConfigDict()
  c.sdpo.mu = 0.9
  c.max_steps = 20
  c.log_every = 1
  c.eval_every = 0  # 0 = only at the end.
  c.checkpoint_every = 10
  c.keep_checkpoints = 3
  # A diffusers pipeline folder (UNet, VAE, text encoders, scheduler). Empty:
  # a random UNet from `model` and the schedule in `scheduler`.
  # Resume order: workdir/checkpoints (newest readable step) -> pretrained_path
  # -> random init; the frozen reference is always the initial UNet.
  c.pretrained_path = ""
  # diffusers weights variant of that folder's files, e.g. "fp16" for
  # `diffusion_pytorch_model.fp16.safetensors` / `model.fp16.safetensors` (the
  # hub's half-precision copies); "" = the plain files. Values are cast to the
  # configured precision either way.
  c.pretrained_variant = ""
  c.async_checkpointing = True
  # JAX's persistent compilation cache: compiled programs are stored in this
  # directory (local or gs://) and reused by later runs with the same program,
  # e.g. a resumed run skips its compile. "" = off.
  c.compilation_cache_dir = ""
  # Stops at the first NaN produced inside any jitted function (jax_debug_nans;
  # slow, for debugging a run whose loss turned NaN).
  c.debug_nans = False
  # Hang watchdog: warns (with step and process) when no step completes for
  # `factor` x the median time between metric fetches, and at least
  # `min_seconds`. 0 = off.
  c.watchdog = ml_collections.ConfigDict()
  c.watchdog.factor = 10.0
  c.watchdog.min_seconds = 120.0

  # Divergence alarm (dpo_jax.diagnostics.DivergenceAlarm), on every logged train
  # step: trips when drift_rel (max |policy - reference MSE| / reference MSE,
  # winners or losers) > drift_threshold, or when grad_norm > grad_norm_jump x
  # the median of the previous `window` steps. 0 = that check off. action:
  # "warn" (log), "stop" (save a checkpoint, then raise DivergenceError: exit
  # status 1, the message names metric, value and threshold) or "off".
  c.alarm = ml_collections.ConfigDict()
  c.alarm.action = "warn"
  c.alarm.drift_threshold = 1.0
  c.alarm.grad_norm_jump = 10.0
  c.alarm.window = 20

  # Device mesh: product must equal the device count; -1 = all remaining.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # Regex rules over "/"-joined parameter paths, first match wins. A spec is
  # "fsdp" (shard the largest dimension divisible by the fsdp axis), "replicate",
  # or a comma-separated per-dimension list like "None,None,None,fsdp".
  c.sharding_rules = ((".*", "fsdp"),)
  # Arrays smaller than this stay replicated: sharding tiny biases only adds
  # collectives.
  c.fsdp_min_size = 2**14

  c.precision = ml_collections.ConfigDict()
  c.precision.compute_dtype = "float32"  # UNet activations: float32 | bfloat16.
  # Frozen reference params: float32 or compute_dtype (a lower precision than
  # the policy's would make their MSEs differ at step 0; rejected).
  c.precision.ref_dtype = "float32"
  # How policy and reference forwards are computed (step.REFERENCE_FORWARDS):
  # "matched" evaluates both in one compiled loop body (step.matched_mses), so
  # equal weights give bit-identical MSEs, as beta 5000 needs in bf16; it keeps
  # the reference's backward residuals too (no extra FLOPs). "separate" traces
  # them apart (XLA rounds them differently in bf16). "auto": matched unless
  # compute_dtype is float32.
  c.precision.reference_forward = "auto"

  # LoRA (dpo_jax.lora): rank 0 = off (full fine-tune). With rank > 0 only the
  # adapters A [in, r], B [r, out] of the kernels whose "/"-joined path fully
  # matches `targets` are trained, checkpointed and in the optimizer state; the
  # policy is base + (alpha / rank) A B and the reference is the same base with
  # the adapters off (one UNet copy in memory). alpha 0 = rank (scale 1, as the
  # diffusers DPO LoRA script). Default targets: the attention projections
  # to_q/to_k/to_v/to_out.0; dpo_jax.lora.CONV_TARGETS adds the convolutions.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 0.0
  c.lora.targets = r".*/(to_q|to_k|to_v|to_out_0)/kernel"

  c.model = ml_collections.ConfigDict()
  c.model.sample_size = 16
  c.model.in_channels = 4
  c.model.out_channels = 4
  c.model.block_out_channels = (32, 64)
  c.model.layers_per_block = 1
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  c.model.attention_head_dim = 8
  c.model.cross_attention_dim = 32
  # How attention is computed (models.attention): "xla" (plain, fused by XLA),
  # "cudnn" (cuDNN flash attention: NVIDIA GPU, bf16/fp16), "chunked" (query-
  # chunked with a flash-attention backward: lower memory, and on CPU 2-4x
  # faster at >= 1024 tokens; was use_memory_efficient_attention=True), "auto"
  # (cudnn where it applies, on CPU chunked for long sequences, else xla).
  c.model.attention = "auto"
  # Rematerialisation of the trained UNet's activations in the backward pass
  # (models.unet.REMAT_POLICIES): "none" keeps all; "blocks" puts each down/mid/up
  # block under jax.checkpoint and keeps only the blocks' inputs and outputs
  # (least memory, one extra policy forward: ~10 instead of ~8 forward-
  # equivalents per DPO pair); "blocks_save_dots" also keeps the Dense layers'
  # outputs. Not part of the architecture: a pretrained folder's UNet gets it
  # too, and parameters and checkpoints are the same with any setting.
  c.model.remat = "none"

  c.scheduler = ml_collections.ConfigDict()
  c.scheduler.num_train_timesteps = 1000
  c.scheduler.beta_schedule = "scaled_linear"
  c.scheduler.beta_start = 0.00085
  c.scheduler.beta_end = 0.012
  c.scheduler.prediction_type = "epsilon"  # epsilon | v_prediction

  # Periodic evaluation by sampling (`dpo_jax.sample_eval`): every N steps
  # (0 = off) sample images_per_prompt fixed seeds (seed + j) for each prompt
  # of `prompts` ("builtin", "pickapic:DIR[:SPLIT]" or a .txt/.jsonl file),
  # score them with `scorers` ("NAME=PATH,..." as in dpo_jax.evaluate, or
  # model-free names) and log means and a grid. Needs pretrained_path.
  c.sample_eval = ml_collections.ConfigDict()
  c.sample_eval.every = 0
  c.sample_eval.prompts = "builtin"
  c.sample_eval.max_prompts = 8
  c.sample_eval.images_per_prompt = 2
  c.sample_eval.seed = 0
  c.sample_eval.num_inference_steps = 20
  c.sample_eval.guidance_scale = 7.5
  c.sample_eval.scheduler = "ddim"
  c.sample_eval.batch_size = 16
  c.sample_eval.scorers = ""

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # adamw | adafactor
  c.optim.lr = 1e-4
  c.optim.warmup_frac = 0.25  # Constant schedule after a linear warmup.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 1e-2
  c.optim.clip_norm = 1.0
  # Micro-batches per optimizer step, scanned inside one jitted step.
  c.optim.grad_accum = 1
  # Abort after this many consecutive non-finite steps (each one is skipped).
  c.optim.max_consecutive_nonfinite = 10

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.global_batch_size = 8  # Preference pairs per optimizer step.
  c.data.num_examples = 256
  c.data.num_prompts = 16
  c.data.seq_len = 8
  c.data.eval_batch_size = 16
  # Probability of training a pair on the empty prompt instead of its caption.
  c.data.caption_dropout = 0.0
  # pickapic source: a folder of Pick-a-Pic-format parquet shards, checked and
  # written once as array_record under tfds_dir (default: workdir/tfds).
  c.data.path = ""
  c.data.tfds_dir = ""
  c.data.max_examples = 0  # 0 = all.
  c.data.max_skip_rate = 0.1  # Defects (not ties) above this stop the run.
  c.data.keep_empty_captions = False
  c.data.resolution = 512
  c.data.random_crop = True
  c.data.flip = "independent"  # independent | shared | none
  c.data.num_threads = 8
  c.data.eval_split = "validation_unique"
  # Parquet column of each logical field, so any preference set with the same
  # layout works ("" for example_id = use the row index). Defaults mirror
  # data.pickapic.PICKAPIC_COLUMNS, repeated here so that loading a config
  # does not import TensorFlow Datasets.
  c.data.columns = ml_collections.ConfigDict(
    {
      "caption": "caption",
      "jpg_0": "jpg_0",
      "jpg_1": "jpg_1",
      "label_0": "label_0",
      "label_1": "label_1",
      "example_id": "ranking_id",
    }
  )
  # Carry Pick-a-Pic's other columns (model_0, user_id, ...) into the build.
  c.data.keep_extra_columns = True
  # cache source: a directory written by `python -m dpo_jax.data.cache`.
  c.data.cache_dir = ""
  return c
