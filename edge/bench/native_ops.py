"""`edge bench --engine native`: pp and tg on edge's numpy engine, dense or R-Sparse.

`NativeBenchContext` has BenchContext's interface (edge.bench.llama_ops), so the runner's
`_measure` times both engines with the same loop. What differs, and why:
- pp: one dense `Engine.forward` of `n_prompt` seeded random tokens (BOS first), as
  llama-bench feeds random tokens; the whole prompt is one batch (n_batch = n_ctx).
  Prefill is always dense, as the sparse model runs (sparsity serves decode).
- tg: `n_gen` single-token forwards through the profile's backend (dense without one),
  starting from BOS on an empty cache. Each step feeds back the greedy token of the last
  logits rather than a random one: a profile's thresholds were calibrated on text, and
  random tokens would measure another share of active channels.
- perf(): the engine has no llama.cpp timers. It returns counters from this context's own
  timers around the forward calls only; the runner stores them as `native_perf_*_tps` and
  leaves `llama_perf_*_tps` None, so no figure claims to come from llama.cpp.
- threads: numba's pool (numba.set_num_threads) and the BLAS pool (threadpoolctl) follow
  the test's thread count; both are capped by what the process allows, so the record
  carries the values actually in force (`config.native_threads`).
- a profile made with `edge sparsify --weights q8|q4` opens the quantized-rows engine
  (edge.sparse.qengine): pp is its batched dense prefill, tg its fused decode step with
  the masks inside; the record says which rows and kernels ran (`config.native_weights`,
  `native_kernels`) and the kernels' thread count (`native_threads.kernels`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge.bench.llama_ops import PerfCounters
from edge.engine.generate import NativeGenerator


def check_profile(profile: Path, model_paths: list[Path]) -> dict[str, Any]:
    """The profile's record entry; a profile for another model fails here, before any work."""
    from edge.gguf_file import inspect
    from edge.sparse.profile import SparseProfile

    prof = SparseProfile.load(profile)
    for p in model_paths:
        prof.check_fingerprint(inspect(p).fingerprint, profile)
    return {"path": str(profile), "sparsity": prof.sparsity, "target_sparsity": prof.target_sparsity,
            "search": prof.search}


def _set_threads(n: int) -> tuple[Any, dict[str, int | None]]:
    """Point numba's and BLAS's pools at n threads; return (restorer, the values in force)."""
    in_force: dict[str, int | None] = {"numba": None, "blas": None}
    try:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        in_force["numba"] = int(numba.get_num_threads())
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    limiter = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        limiter = threadpool_limits(limits=n, user_api="blas")
        blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        in_force["blas"] = int(blas[0]) if blas else None
    except ImportError:  # pragma: no cover - then BLAS keeps its start-up pool; recorded as None
        pass
    return limiter, in_force


class NativeBenchContext:
    """A KV cache on an already-loaded engine, for one model × threads test."""

    def __init__(self, gen: NativeGenerator, *, n_ctx: int, threads: int, seed: int = 0,
                 profile: dict[str, Any] | None = None) -> None:
        self.gen, self.profile = gen, profile  # profile: {path, sparsity, ...} for the record
        self.engine = gen.model
        self.backend = gen.backend  # None: dense decode (or the quantized engine's own masks)
        # the quantized rows engine (edge.sparse.qengine): prefill and decode, its masks inside
        self.quantized = hasattr(self.engine, "decode")
        self.n_ctx = min(n_ctx, self.engine.config.context_length)
        self.n_batch = self.n_ubatch = self.n_ctx  # the whole prompt is one forward
        self.threads = threads
        self.n_vocab = self.engine.config.n_vocab
        bos = self.engine.tokenize("", add_bos=True)  # [] when the vocabulary adds no BOS
        self.bos = bos[0] if bos else None
        self.cache = self.engine.new_cache(self.n_ctx)
        self._rng = random.Random(seed)
        self._limiter, self.threads_in_force = _set_threads(threads)
        if self.quantized:
            from edge.sparse.qengine import set_threads

            self.threads_in_force["kernels"] = set_threads(threads)
        self.logits: np.ndarray | None = None  # last logits (tests compare dense and sparse)
        self.interrupt_check: Callable[[], None] | None = None
        self.perf_reset()

    # ---- steps ----------------------------------------------------------------------
    def clear(self) -> None:
        self.cache.clear()
        self.logits = None

    def _forward(self, tokens: list[int], backend: Any) -> None:
        if self.interrupt_check is not None:
            self.interrupt_check()
        if self.quantized:
            e = self.engine
            self.logits = e.decode(tokens[0], self.cache) if len(tokens) == 1 else e.prefill(tokens, self.cache)
            return
        self.logits = self.engine.forward(tokens, cache=self.cache, backend=backend,
                                          last_only=True).logits[-1]

    def prompt(self, n_prompt: int) -> float:
        """One dense forward of `n_prompt` seeded random tokens; return the seconds it took."""
        tokens = [self._rng.randrange(self.n_vocab) for _ in range(n_prompt)]
        if self.bos is not None:
            tokens[0] = self.bos
        t0 = time.perf_counter_ns()
        self._forward(tokens, None)
        dt = time.perf_counter_ns() - t0
        self._n_p, self._t_p = self._n_p + n_prompt, self._t_p + dt
        return dt / 1e9

    def first_token(self) -> int:
        assert self.logits is not None, "first_token() needs prompt() first"
        return int(np.argmax(self.logits))

    def generate(self, n_gen: int) -> float:
        """`n_gen` single-token decodes through the backend; return the seconds it took."""
        token = self.bos if self.bos is not None else self._rng.randrange(self.n_vocab)
        t_fwd = 0
        t0 = time.perf_counter_ns()
        for _ in range(n_gen):
            t1 = time.perf_counter_ns()
            self._forward([token], self.backend)
            t_fwd += time.perf_counter_ns() - t1
            token = int(np.argmax(self.logits))
        dt = time.perf_counter_ns() - t0
        self._n_e, self._t_e = self._n_e + n_gen, self._t_e + t_fwd
        return dt / 1e9

    # ---- this context's own timers (forward calls only) --------------------------------
    def perf_reset(self) -> None:
        self._n_p = self._n_e = 0
        self._t_p = self._t_e = 0

    def perf(self) -> PerfCounters:
        return PerfCounters(self._n_p, self._t_p / 1e6, self._n_e, self._t_e / 1e6)

    def record_fields(self, figures: dict[str, Any], config: dict[str, Any]) -> None:
        """Make a bench record's figures and config say what ran (see the module docstring)."""
        figures["native_perf_pp_tps"] = figures.pop("llama_perf_pp_tps", None)
        figures["native_perf_tg_tps"] = figures.pop("llama_perf_tg_tps", None)
        figures["llama_perf_pp_tps"] = figures["llama_perf_tg_tps"] = None
        config.update(engine="native", flash_attn=None, sparse_profile=self.profile,
                      native_threads=dict(self.threads_in_force))
        if self.quantized:  # which rows and kernels ran (q8 | q4; c | numba)
            config.update(native_weights=self.engine.weights, native_kernels=self.engine.kernels)

    def close(self) -> None:
        if self._limiter is not None:
            self._limiter.restore_original_limits()
            self._limiter = None

    def __enter__(self) -> NativeBenchContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
