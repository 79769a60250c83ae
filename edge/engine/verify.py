"""Agreement of the native engine with llama.cpp on the same GGUF: top-1 and mean KL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge.engine.model import Engine
from edge.logprobs import kl_rows


@dataclass
class Agreement:
    n_tokens: int
    top1: float  # fraction of positions where both argmax agree
    mean_kl: float  # mean KL(llama.cpp ‖ engine) in nats
    max_kl: float


class LogitsSource(Protocol):
    """What the comparison needs of llama.cpp: edge.runtime.Runtime.logits (the engine never
    imports the llama.cpp session; the caller hands it in)."""

    def logits(self, tokens: Sequence[int], first: int = 0) -> np.ndarray: ...


def compare_logits(ref: np.ndarray, ours: np.ndarray) -> Agreement:
    kl = kl_rows(ref, ours)
    top1 = float(np.mean(ref.argmax(axis=-1) == ours.argmax(axis=-1)))
    return Agreement(n_tokens=int(ref.shape[0]), top1=top1, mean_kl=float(kl.mean()),
                     max_kl=float(kl.max()))


def agreement(engine: Engine, rt: LogitsSource, tokens: Sequence[int]) -> Agreement:
    """Run both on `tokens` (llama.cpp from a clean context) and compare every position's
    next-token distribution."""
    return compare_logits(rt.logits(tokens), engine.forward(tokens).logits)
