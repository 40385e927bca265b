"""Verifiable rewards with VLM-R1 semantics: `fn(completions: list[str], **columns) -> list[float]`, by name."""

from vlmr1_jax.rewards import accuracy, format, length, rec  # noqa: F401 -- imported to register the built-in rewards
from vlmr1_jax.rewards.registry import REWARDS, get_reward, register_reward, reward_functions

__all__ = ["REWARDS", "get_reward", "register_reward", "reward_functions"]
