"""Shared by the sampler tests: the multimodal prompts they decode, and the float64 sampling distribution written from
HF's TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper semantics with a chi-square test against it."""

from __future__ import annotations

import jax
import numpy as np

from tests.helpers.prompts import PAD, prompt_rows
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlmr1_jax.models.qwen2_5_vl.processor import build_prompt_batch

# Per prompt: (text before, image grids, text after). Different lengths give left padding; prompt 2 has two images.
PROMPTS = [
    ([5, 6], [(1, 4, 4)], [7, 8, 9]),
    ([10], [(1, 4, 6)], [11, 12, 13, 14, 15, 16, 17]),
    ([20, 21, 22], [(1, 4, 4), (1, 6, 4)], [23]),
]


def make_prompts(cfg: Qwen25VLConfig, seed: int = 0) -> tuple[PromptBatch, list[list[np.ndarray]]]:
    """Left-padded multimodal PROMPTS with random pixels; returns the batch and each prompt's pixel arrays."""
    ids, images = prompt_rows(cfg, PROMPTS, seed)
    batch = build_prompt_batch(ids, images, cfg, pad_id=PAD)
    return batch, [[px for px, _ in imgs] for imgs in images]


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 sampling distribution: logits / T, then keep the k largest (ties kept), then HF's top-p (drop the
    ascending-sorted tokens whose cumulative probability is <= 1 - p, always keeping the most likely one; tied
    tokens sort in index order)."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if 0 < top_k < z.size:
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:
        order = np.argsort(z, kind="stable")
        p = np.where(keep, np.exp(z - z.max()), 0.0)[order]
        cumulative = np.cumsum(p / p.sum())
        assert np.abs(cumulative - (1 - top_p)).min() > 1e-3, "cut point too close to a cumulative sum"
        removed = cumulative <= 1 - top_p
        removed[-1] = False
        keep[order[removed]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of `counts` against `probs` over the tokens with probability > 0."""
    support = probs > 0
    expected = counts.sum() * probs[support]
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return float(jax.scipy.stats.chi2.sf(stat, support.sum() - 1))
