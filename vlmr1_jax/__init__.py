"""vlmr1-jax: R1-style GRPO with verifiable rewards for vision-language models, in JAX."""

__version__ = "0.1.0"
