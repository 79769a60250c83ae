"""Agreement of the native engine with llama.cpp on the same GGUF: top-1 and mean KL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge.engine.model import Engine
from edge.runtime import Runtime


@dataclass
class Agreement:
    n_tokens: int
    top1: float  # fraction of positions where both argmax agree
    mean_kl: float  # mean KL(llama.cpp ‖ engine) in nats
    max_kl: float


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) per row, from raw logits."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def llama_logits(rt: Runtime, tokens: Sequence[int]) -> np.ndarray:
    """Every position's logits from llama.cpp, (T, n_vocab) float32, from a clean context."""
    return rt.logits(tokens)


def compare_logits(ref: np.ndarray, ours: np.ndarray) -> Agreement:
    kl = kl_rows(ref, ours)
    top1 = float(np.mean(ref.argmax(axis=-1) == ours.argmax(axis=-1)))
    return Agreement(n_tokens=int(ref.shape[0]), top1=top1, mean_kl=float(kl.mean()),
                     max_kl=float(kl.max()))


def agreement(engine: Engine, rt: Runtime, tokens: Sequence[int]) -> Agreement:
    """Run both on `tokens` and compare every position's next-token distribution."""
    return compare_logits(llama_logits(rt, tokens), engine.forward(tokens).logits)
