"""Text generation on the quantized engine, with the llama.cpp runtime's stream contract:
`stream(tokens, max_tokens=, sampling=, stop=)` yields text pieces and leaves the figures
in `.last` (edge.runtime.GenerationStats), so both engines can sit behind one interface.

Prefill is dense (batched), decode sparse one token at a time. The KV cache is kept between
calls: a prompt that starts with what the cache holds (a chat's earlier turns) reuses it.
Drawing follows bias.sampler's chain (llama-cpp-python's order: repeat penalty, top-k,
top-p, min-p, temperature); temp 0 is greedy after the penalty.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence

import numpy as np

from edge.errors import BadOptionError, ContextOverflowError
from edge.runtime import GenerationStats, Sampling, peak_rss_bytes
from edge.sparse.qengine import QCache, QuantizedEngine


class QuantizedGenerator:
    """One engine and one KV cache of `n_ctx` tokens. Not thread-safe."""

    def __init__(self, engine: QuantizedEngine, n_ctx: int = 2048, load_ms: float = 0.0) -> None:
        self.engine = engine
        self.n_ctx = min(n_ctx, engine.config.context_length)
        self.cache: QCache = engine.new_cache(self.n_ctx)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.load_ms = load_ms
        self.last: GenerationStats | None = None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.engine.tokenize(text, add_bos=add_bos, special=special)

    def _draw(self, logits: np.ndarray, s: Sampling, history: list[int], rng: np.random.Generator | None) -> int:
        from bias.sampler import sample_rows  # moves to edge.sampling with issue 13

        return int(sample_rows(logits[None, :], [history], [rng if s.temp > 0 else None], s)[0])

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Logits after `tokens`, reusing the cached prefix; returns (logits, evaluated)."""
        keep = 0
        for a, b in zip(self.cached, tokens[:-1], strict=False):  # the last token is always run
            if a != b:
                break
            keep += 1
        self.cache.truncate(keep)
        self.cached = self.cached[:keep]
        logits = self.engine.prefill(tokens[keep:], self.cache)
        self.cached = list(tokens)
        return logits, len(tokens) - keep

    def stream(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield text pieces as they are generated; `self.last` holds the stats after.

        Stops at an end-of-generation token, `max_tokens`, a full context, or a stop string.
        """
        s = sampling or Sampling()
        s.validate()
        if max_tokens < 1:
            raise BadOptionError(f"-n {max_tokens}: the number of tokens to generate must be ≥ 1")
        tokens = list(tokens)
        if not tokens:
            raise BadOptionError("the prompt has no tokens")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(tokens)} tokens but the context holds "
                                       f"{self.n_ctx}; raise --ctx or shorten it")
        budget = min(max_tokens, self.n_ctx - len(tokens))
        rng = np.random.default_rng(s.seed) if s.temp > 0 else None
        stats = GenerationStats(n_prompt_tokens=len(tokens), load_ms=self.load_ms)
        stats.stop_reason = "length" if budget == max_tokens else "context"
        self.last = stats
        eng = self.engine
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        pending = ""
        max_stop = max((len(x) for x in stop), default=0)
        history = list(tokens)
        t0 = time.perf_counter()
        t_gen = 0.0
        try:
            logits, stats.n_prompt_evaluated = self._prefill(tokens)
            stats.prompt_ms = (time.perf_counter() - t0) * 1000
            while True:
                tok = self._draw(logits, s, history, rng)
                if stats.n_gen_tokens == 0:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1000
                if eng.is_eog(tok):
                    stats.stop_reason = "eos"
                    break
                stats.n_gen_tokens += 1
                stats.token_ids.append(tok)
                history.append(tok)
                pending += decoder.decode(eng.token_piece(tok))
                hit = min((i for x in stop if (i := pending.find(x)) >= 0), default=-1) if stop else -1
                if hit >= 0:
                    parts.append(pending[:hit])
                    pending = ""
                    stats.stop_reason = "stop"
                    yield parts[-1]
                    break
                safe = len(pending) - max(0, max_stop - 1)
                if safe > 0:
                    parts.append(pending[:safe])
                    pending = pending[safe:]
                    yield parts[-1]
                if stats.n_gen_tokens >= budget:
                    break
                t1 = time.perf_counter()
                logits = eng.decode(tok, self.cache)
                self.cached.append(tok)
                t_gen += time.perf_counter() - t1
            tail = pending + decoder.decode(b"", final=True)
            if tail and stats.stop_reason != "stop":
                parts.append(tail)
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            stats.stop_reason = "interrupted"
            raise
        finally:
            stats.text = "".join(parts)
            stats.total_ms = (time.perf_counter() - t0) * 1000
            stats.gen_ms = t_gen * 1000
            if stats.prompt_ms > 0:
                stats.prompt_tps = stats.n_prompt_evaluated / stats.prompt_ms * 1000
            n_dec = max(0, stats.n_gen_tokens - 1)  # the first token came from the prefill
            if n_dec and stats.gen_ms > 0:
                stats.gen_tps = n_dec / stats.gen_ms * 1000
            stats.peak_rss_bytes = peak_rss_bytes()

    def generate(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
                 stop: Sequence[str] = ()) -> GenerationStats:
        """Run `stream` to the end and return its stats."""
        for _ in self.stream(tokens, max_tokens=max_tokens, sampling=sampling, stop=stop):
            pass
        assert self.last is not None
        return self.last
