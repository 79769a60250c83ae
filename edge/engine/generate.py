"""The native engine (dense or an R-Sparse profile) behind edge's Generator interface:
prefill dense, decode one token at a time through the backend, sampled and streamed by
the same code as the llama.cpp session (edge.generation, edge.sampling)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.engine.model import Backend, Engine
from edge.generation import ChatFormat, GenerationStats, Message, plan, stream_text, token_stream
from edge.sampling import Sampling
from edge.system import default_threads, peak_rss_bytes


class NativeGenerator:
    """A loaded Engine plus the profile's backend (None: dense decode)."""

    engine = "native"  # the Generator's engine name; the Engine itself is `model`

    def __init__(self, engine: Engine, backend: Backend | None, load_ms: float = 0.0,
                 profile: str | None = None, *, n_ctx: int = 2048, threads: int | None = None) -> None:
        self.model, self.backend, self.load_ms, self.profile = engine, backend, load_ms, profile
        self.info = engine.info
        self.path = Path(engine.path)
        self.n_ctx = min(n_ctx, engine.config.context_length)
        self.threads_arg = threads  # what was asked for (None: the pools' defaults)
        self.threads = threads or default_threads()
        self.last: GenerationStats | None = None
        self._chat: ChatFormat | None = None

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None, sparse_profile: str | os.PathLike[str] | None = None,
             *, threads: int | None = None, n_ctx: int = 2048) -> NativeGenerator:
        """The engine, plus the profile's backend when given (its model sha is checked)."""
        from edge.catalog import resolve_model
        from edge.gguf_file import inspect
        from edge.sparse.profile import SparseProfile

        t0 = time.perf_counter()
        path = resolve_model(None if model is None else str(model))
        prof = None
        if sparse_profile is not None:  # a wrong profile fails before the weights are read
            prof = SparseProfile.load(sparse_profile)
            prof.check_fingerprint(inspect(path).fingerprint, sparse_profile)
        engine = Engine.from_gguf(path)
        backend = None
        if prof is not None:
            from edge.sparse.rsparse import SparseBackend

            prof.check(engine, sparse_profile)
            svd = None
            if prof.needs_svd:
                from edge.sparse.svd import SvdCache

                svd = SvdCache.load_or_build(engine)
            backend = SparseBackend(engine, [m for m in prof.modules if m.t >= 0], svd)
        if threads:
            from edge.sparse.kernel import set_threads

            set_threads(threads)
        return cls(engine, backend, (time.perf_counter() - t0) * 1000,
                   str(sparse_profile) if sparse_profile else None, n_ctx=n_ctx, threads=threads)

    # ---- tokens and chat --------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos, special=special)

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        if self._chat is None:
            e = self.model
            bos = e.tokenize("", add_bos=True)
            eos = e.eos_token()
            self._chat = ChatFormat(self.info.chat_template,
                                    bos=e.token_piece(bos[0], special=True).decode("utf-8", "replace") if bos else "",
                                    eos=e.token_piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "")
            self._bos = bos[0] if bos else -1
        return self._chat.tokens(self.tokenize, self._bos, messages)

    # ---- generation -------------------------------------------------------------------
    def stream(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Prefill `tokens` dense, then decode up to `max_tokens` through the backend."""
        e = self.model
        tokens = list(tokens)
        sampling, budget = plan(len(tokens), self.n_ctx, max_tokens, sampling, e.config.context_length)
        stats = GenerationStats(n_prompt_tokens=len(tokens), n_prompt_evaluated=len(tokens),
                                load_ms=self.load_ms)
        stats.stop_reason = "length" if budget == max_tokens else "context"
        self.last = stats
        cache = e.new_cache(len(tokens) + budget)
        steps = [0, 0.0]  # decode forwards and their seconds: the first token came from prefill

        def prefill() -> np.ndarray:
            t = time.perf_counter()
            logits = e.forward(tokens, cache=cache, last_only=True).logits[-1]
            stats.prompt_ms = (time.perf_counter() - t) * 1000
            return logits

        def advance(tok: int) -> np.ndarray:
            t = time.perf_counter()
            logits = e.forward([tok], cache=cache, backend=self.backend, last_only=True).logits[-1]
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

    def config_record(self, **extra: object) -> dict[str, Any]:
        return {"engine": "native", "threads": self.threads_arg, "n_ctx": self.n_ctx,
                "sparse_profile": self.profile, "correction": None, **extra}

    def close(self) -> None:  # the engine is plain numpy arrays: nothing to free by hand
        pass
