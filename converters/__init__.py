"""HF safetensors <-> vlmr1-jax parameter trees, HF release folders and PEFT adapters. Never imports torch."""
