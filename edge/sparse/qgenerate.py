"""The quantized engine (edge.sparse.qengine) behind edge's Generator interface.

Prefill is dense (batched over the quantized rows), decode sparse one token at a time,
sampled and streamed by the same code as every other engine (edge.generation,
edge.sampling). Unlike the f32 engine's generator, the KV cache is kept between calls: a
prompt that starts with what the cache holds (a chat's earlier turns) reuses it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edge.engine.generate import NativeGenerator
from edge.generation import GenerationStats, plan, stream_text, token_stream
from edge.sampling import Sampling
from edge.sparse.qengine import QCache, QuantizedEngine
from edge.system import peak_rss_bytes


class QuantizedGenerator(NativeGenerator):
    """One QuantizedEngine (`model`) and one KV cache of `n_ctx` tokens. Not thread-safe.

    Tokens and chat templates are NativeGenerator's: the engine has the same tokenizer
    methods (llama.cpp's vocabulary-only model)."""

    def __init__(self, engine: QuantizedEngine, load_ms: float = 0.0, profile: str | None = None, *,
                 n_ctx: int = 2048, threads: int | None = None) -> None:
        super().__init__(engine, None, load_ms, profile, n_ctx=n_ctx, threads=threads)  # type: ignore[arg-type]
        self.cache: QCache = engine.new_cache(self.n_ctx)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None, sparse_profile: str | os.PathLike[str] | None = None,
             *, threads: int | None = None, n_ctx: int = 2048, weights: str = "q8") -> QuantizedGenerator:
        """MODEL's quantized rows in `weights` (built and cached on first use), with the
        profile's thresholds and low-rank factors when given (its model sha is checked)."""
        from edge.catalog import resolve_model

        t0 = time.perf_counter()
        path = resolve_model(None if model is None else str(model))
        engine = QuantizedEngine.load(path, sparse_profile, weights=weights, threads=threads)
        return cls(engine, (time.perf_counter() - t0) * 1000,
                   str(sparse_profile) if sparse_profile else None, n_ctx=n_ctx, threads=threads)

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Logits after `tokens`, reusing the cached prefix; returns (logits, evaluated)."""
        keep = 0
        for a, b in zip(self.cached, tokens[:-1], strict=False):  # the last token is always run
            if a != b:
                break
            keep += 1
        self.cache.truncate(keep)
        self.cached = self.cached[:keep]
        logits = self.model.prefill(tokens[keep:], self.cache)
        self.cached = list(tokens)
        return logits, len(tokens) - keep

    def stream(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Prefill `tokens` dense (after the reused prefix), then decode up to `max_tokens`."""
        e: QuantizedEngine = self.model  # type: ignore[assignment]
        tokens = list(tokens)
        sampling, budget = plan(len(tokens), self.n_ctx, max_tokens, sampling, e.config.context_length)
        stats = GenerationStats(n_prompt_tokens=len(tokens), load_ms=self.load_ms)
        stats.stop_reason = "length" if budget == max_tokens else "context"
        self.last = stats
        steps = [0, 0.0]  # decode steps and their seconds: the first token came from prefill

        def prefill() -> np.ndarray:
            t = time.perf_counter()
            logits, stats.n_prompt_evaluated = self._prefill(tokens)
            stats.prompt_ms = (time.perf_counter() - t) * 1000
            return logits

        def advance(tok: int) -> np.ndarray:
            t = time.perf_counter()
            logits = e.decode(tok, self.cache)
            self.cached.append(tok)
            steps[0] += 1
            steps[1] += time.perf_counter() - t
            return logits

        t0 = time.perf_counter()
        try:
            yield from stream_text(token_stream(prefill, advance, sampling, budget),
                                   e.token_piece, e.is_eog, stats, t0, stop)
        finally:
            stats.finish(t0, int(steps[0]), steps[1])
            stats.peak_rss_bytes = peak_rss_bytes()

    def generate(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
                 stop: Sequence[str] = ()) -> GenerationStats:
        """Run `stream` to the end and return its stats."""
        for _ in self.stream(tokens, max_tokens=max_tokens, sampling=sampling, stop=stop):
            pass
        assert self.last is not None
        return self.last

    def config_record(self, **extra: object) -> dict[str, Any]:
        e: QuantizedEngine = self.model  # type: ignore[assignment]
        return super().config_record(weights=e.weights, kernels=e.kernels, **extra)
