"""Verifiable rewards with VLM-R1 semantics: `fn(completions: list[str], **columns) -> list[float]`, by name."""

from vlmr1_jax.rewards.registry import REWARDS, get_reward, register_reward
from vlmr1_jax.rewards import accuracy, format, length, rec  # noqa: E402,F401  (register the built-in rewards)

__all__ = ["REWARDS", "get_reward", "register_reward"]
