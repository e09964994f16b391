"""dpo_jax: Diffusion-DPO / Diffusion-RPO preference tuning for Stable Diffusion in JAX."""

from setuptools import find_packages, setup

# Run time needs no diffusers / transformers / torch: the models, tokenizers and
# schedules are our own (dpo_jax/models, dpo_jax/diffusion.py, dpo_jax/sampler.py).
# Lower bounds are the releases this tree is tested with; no upper pins, so pip
# resolves today's releases (jax, flax, optax, orbax move together).
INSTALL_REQUIRES = [
  "jax>=0.10",
  "flax>=0.12",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12",
  "chex>=0.1.92",
  "ml_collections>=1.1",
  "absl-py>=2.1",
  "clu>=0.0.12",
  "tensorboard>=2.20",
  # CLIP's caption cleaning (models.conditioning.clip_text_clean), as openai/CLIP.
  "ftfy>=6.1,<7",
  "regex>=2023.0",
  "safetensors>=0.4",
  "etils[epath]>=1.7",
  "tensorflow-cpu>=2.20",
  "tensorflow-datasets>=4.9.9",
  "grain>=0.2.12",
  "pyarrow>=15",
  "pillow>=10",
  "numpy>=1.26",
  "tqdm>=4.66",
  "matplotlib>=3.8",
]

# PyTorch diffusers / transformers are the independent reference of the parity
# checks (`python -m dpo_jax.tools.parity`, the tests) and write the tiny test
# pipelines; both the last Flax releases (0.39 / 4.57) and today's work.
_TORCH_REFERENCE = ["diffusers>=0.39", "transformers>=4.57"]

EXTRAS_REQUIRE = {
  # The parity tool and the PyTorch script of an exported folder.
  "torch": ["torch>=2.4", *_TORCH_REFERENCE],
  # torch==2.13.0 resolves to the local CPU wheel on machines that ship one.
  "test": [
    *_TORCH_REFERENCE,
    # diffusers' `pipe.load_lora_weights` of an exported LoRA (tests/test_lora.py).
    "peft>=0.17",
    "pytest>=8",
    "pytest-xdist>=3.5",
    "portpicker>=1.6",
    # A local GCS server and the fsspec client that etils.epath uses with it:
    # whole training runs on gs:// in tests/test_cloud_paths.py.
    "gcp-storage-emulator>=2026.7,<2027",
    "gcsfs>=2026.7,<2027",
    "ruff>=0.6",
    "torch==2.13.0",
    # Runs notebooks/sample.ipynb headless in the suite.
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
  ],
}

setup(
  name="dpo_jax",
  version="0.1.0",
  description="Diffusion-DPO and Diffusion-RPO for Stable Diffusion in JAX/Flax.",
  packages=find_packages(include=["dpo_jax", "dpo_jax.*", "configs"]),
  python_requires=">=3.10",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
)
