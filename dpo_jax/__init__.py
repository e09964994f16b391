"""dpo_jax: preference tuning (Diffusion-DPO, Diffusion-RPO, SFT) for diffusion models in JAX."""

__version__ = "0.1.0"
