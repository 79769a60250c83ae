"""pp and tg measured the way llama-bench measures them, through llama.cpp's C API.

llama-bench (tools/llama-bench) times, per repetition and on an emptied KV cache:
  pp: llama_decode of `n_prompt` random tokens in batches of n_batch, then synchronize;
  tg: `n_gen` single-token llama_decode calls, synchronizing after each.
It runs one full pp and one 1-token tg as warm-up, and reports the mean and sample std
of the per-repetition tokens/s. This module does the same with the same context
parameters (flash attention "auto", n_batch 2048, n_ubatch 512, f16 KV cache), so edge's
figures and llama-bench's can be compared one to one.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.errors import EdgeError

# llama-bench's defaults (cmd_params_defaults): same batch shapes, same attention kernel.
DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512


class BenchRunError(EdgeError):
    """llama.cpp refused a benchmark step (context creation or a decode)."""


@dataclass
class PerfCounters:
    """llama.cpp's own timers (llama_perf_context) for the last measured step."""

    n_p_eval: int
    t_p_eval_ms: float
    n_eval: int
    t_eval_ms: float


class BenchContext:
    """A fresh llama.cpp context on an already-loaded model, for one model × threads test."""

    def __init__(self, model: Any, *, n_ctx: int, threads: int, n_batch: int = DEFAULT_N_BATCH,
                 n_ubatch: int = DEFAULT_N_UBATCH, flash_attn: int | None = None, seed: int = 0,
                 type_k: str = "f16", type_v: str = "f16"):
        import llama_cpp

        from edge.llamacpp import FLASH_ATTN_AUTO, new_context

        self._ll = llama_cpp
        self.ctx = new_context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, threads=threads,
                               flash_attn=FLASH_ATTN_AUTO if flash_attn is None else flash_attn,
                               perf=True, type_k=type_k, type_v=type_v)
        if not self.ctx:
            raise BenchRunError(
                f"llama.cpp could not create a {n_ctx}-token context; lower --ctx or free memory"
            )
        self.threads = threads
        self.n_batch = n_batch
        self.n_ubatch = min(n_ubatch, n_batch)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
        self._rng = random.Random(seed)  # llama-bench uses std::rand(): content does not matter
        llama_cpp.llama_set_n_threads(self.ctx, threads, threads)
        self.interrupt_check: Callable[[], None] | None = None

    # ---- steps ----------------------------------------------------------------------
    def clear(self) -> None:
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self.ctx), False)

    def _token(self, first: bool) -> int:
        if first and self.bos is not None:
            return self.bos
        return self._rng.randrange(self.n_vocab)

    def _decode(self, tokens: list[int]) -> None:
        if self.interrupt_check is not None:
            self.interrupt_check()  # a pending Ctrl-C stops between decodes (see edge.interrupt)
        arr = (ctypes.c_int32 * len(tokens))(*tokens)
        rc = self._ll.llama_decode(self.ctx, self._ll.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise BenchRunError(
                f"llama_decode failed (code {rc}) on a {len(tokens)}-token batch; "
                "raise --ctx or lower --pp/--tg"
            )

    def prompt(self, n_prompt: int) -> float:
        """Decode `n_prompt` tokens in n_batch chunks; return the seconds it took."""
        t0 = time.perf_counter_ns()
        done = 0
        while done < n_prompt:
            n = min(n_prompt - done, self.n_batch)
            self._decode([self._token(done == 0 and i == 0) for i in range(n)])
            done += n
        self._ll.llama_synchronize(self.ctx)
        return (time.perf_counter_ns() - t0) / 1e9

    def first_token(self) -> int:
        """Greedy pick from the last logits: what a user waits for after the prompt."""
        logits = self._ll.llama_get_logits_ith(self.ctx, -1)
        import numpy as np

        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def generate(self, n_gen: int) -> float:
        """Decode `n_gen` tokens one at a time; return the seconds it took."""
        token = self._token(True)
        t0 = time.perf_counter_ns()
        for _ in range(n_gen):
            self._decode([token])
            self._ll.llama_synchronize(self.ctx)
            token = self._rng.randrange(self.n_vocab)
        return (time.perf_counter_ns() - t0) / 1e9

    # ---- llama.cpp's own timers -----------------------------------------------------
    def perf_reset(self) -> None:
        self._ll.llama_perf_context_reset(self.ctx)

    def perf(self) -> PerfCounters:
        p = self._ll.llama_perf_context(self.ctx)
        return PerfCounters(int(p.n_p_eval), float(p.t_p_eval_ms), int(p.n_eval), float(p.t_eval_ms))

    def close(self) -> None:
        from edge.llamacpp import free_context

        free_context(self.ctx)
        self.ctx = None

    def __enter__(self) -> BenchContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

