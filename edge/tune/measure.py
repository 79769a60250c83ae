"""One candidate's speed (llama-bench's way, edge.bench.llama_ops) and quality (KL to the
source model on held-out text, edge.evaluate's llama-perplexity scheme)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.device import probe_state
from edge.evaluate import score_chunks, summarize
from edge.tune.space import Candidate


@dataclass
class Speed:
    pp_tps: float  # prompt tokens/s (n_prompt tokens in n_batch chunks)
    tg_tps: float  # generated tokens/s, one token per decode
    ttft_ms: float  # the prompt's time: when the first token's logits are ready
    reps: int
    n_prompt: int
    n_gen: int
    seconds: float
    temp_c: float | None
    throttled: bool | None  # a throttle flag appeared during the measurement (Pi)

    def value(self, objective: str) -> float:
        """Higher is better for every objective (ttft is negated)."""
        return {"tg": self.tg_tps, "pp": self.pp_tps, "ttft": -self.ttft_ms}[objective]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedModels:
    """One llama_model per load key (file, repack, mmap, mlock), loaded when first needed
    and freed when another key is needed: a 7B on a Pi has room for one at a time."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.key: tuple[str, bool, bool, bool] | None = None
        self.model: Any = None

    def get(self, c: Candidate) -> Any:
        from edge.llamacpp import load_model

        if self.key != c.load_key:
            self.close()
            self.model = load_model(self.files[c.quant], use_mmap=c.use_mmap, use_mlock=c.use_mlock,
                                    repack=c.repack)
            self.key = c.load_key
        return self.model

    def close(self) -> None:
        from edge.llamacpp import free_model

        if self.model is not None:
            free_model(self.model)
        self.model, self.key = None, None


def measure_speed(model: Any, c: Candidate, *, n_ctx: int, n_prompt: int, n_gen: int, reps: int,
                  check: Callable[[], None] | None = None) -> Speed:
    """Warm-up (a full prompt and one token), then `reps` × (prompt, n_gen tokens) from an
    empty cache; medians. `check` runs between decodes (a pending Ctrl-C stops there)."""
    from edge.bench.llama_ops import BenchContext

    t0 = time.perf_counter()
    before = probe_state()
    with BenchContext(model, n_ctx=n_ctx, threads=c.threads, n_batch=c.n_batch, n_ubatch=c.n_ubatch,
                      flash_attn=int(c.flash_attn), type_k=c.type_k, type_v=c.type_v) as b:
        b.interrupt_check = check
        b.clear()
        b.prompt(n_prompt)
        b.generate(1)
        pp, tg = [], []
        for _ in range(reps):
            b.clear()
            pp.append(b.prompt(n_prompt))
            tg.append(b.generate(n_gen))
    after = probe_state()
    throttled = None
    if before.throttled_raw is not None and after.throttled_raw is not None:
        throttled = bool(after.throttled_raw & 0xF)  # "now" bits: under-voltage, capped, throttled, soft limit
    t_pp, t_tg = statistics.median(pp), statistics.median(tg)
    return Speed(pp_tps=n_prompt / t_pp, tg_tps=n_gen / t_tg, ttft_ms=t_pp * 1000, reps=reps,
                 n_prompt=n_prompt, n_gen=n_gen, seconds=time.perf_counter() - t0,
                 temp_c=after.temp_c, throttled=throttled)


class BaseLogits:
    """The source model's logits per chunk, computed once and reused for every candidate."""

    def __init__(self, source: Path, *, n_ctx: int, threads: int):
        self.source, self.n_ctx, self.threads = source, n_ctx, threads
        self._cache: dict[int, np.ndarray] = {}
        self._rt: Any = None

    def _runtime(self) -> Any:
        from edge.runtime import Runtime, RuntimeConfig

        if self._rt is None:
            self._rt = Runtime(self.source, RuntimeConfig(n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                                          threads=self.threads))
        return self._rt

    def tokens(self, text: str) -> tuple[list[int], int | None]:
        rt = self._runtime()
        bos = rt.llm.token_bos() if rt.llm._model.add_bos_token() else None
        return rt.tokenize(text, add_bos=True), bos

    def __call__(self, tokens: Sequence[int], first: int) -> np.ndarray:
        key = hash((tuple(tokens), first))
        if key not in self._cache:
            self._cache[key] = self._runtime().logits(tokens, first)
        return self._cache[key]

    def close(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None


def measure_quality(path: Path, c: Candidate, base: BaseLogits, tokens: list[int], bos: int | None, *,
                    n_chunks: int) -> dict[str, float]:
    """KL(source ‖ candidate), top-1 agreement and PPL on `tokens` (n_chunks chunks of base.n_ctx)."""
    from edge.runtime import Runtime, RuntimeConfig

    t0 = time.perf_counter()
    cfg = RuntimeConfig(n_ctx=base.n_ctx, n_batch=base.n_ctx, threads=base.threads, type_k=c.type_k,
                        type_v=c.type_v, flash_attn=c.flash_attn)
    rt = Runtime(path, cfg)
    try:
        scores = score_chunks(tokens, base.n_ctx, rt.logits, bos=bos, base_fn=base, max_chunks=n_chunks)
    finally:
        rt.close()
    r = summarize(scores, model=str(path), n_ctx=base.n_ctx, n_tokens=len(tokens), base=str(base.source))
    return {"kld": float(r.kld_mean or 0.0), "kld_err": float(r.kld_err or 0.0), "kld_p99": float(r.kld_p99 or 0.0),
            "top1": float(r.top1_agreement or 0.0), "ppl": r.ppl, "base_ppl": float(r.base_ppl or 0.0),
            "n_scored": r.n_scored, "seconds": time.perf_counter() - t0}


def tune_texts(text: str | None) -> tuple[str, str]:
    """(search text, held-out text): the file's two halves, or Python's documentation
    (pydoc_data, shipped with CPython) split by topic: the search never sees the second."""
    if text is None:
        from pydoc_data.topics import topics

        keys = sorted(topics)
        half = len(keys) // 2
        return ("\n\n".join(topics[k] for k in keys[:half]), "\n\n".join(topics[k] for k in keys[half:]))
    mid = len(text) // 2
    cut = text.find("\n", mid)
    cut = mid if cut < 0 else cut
    return text[:cut], text[cut:]
