"""Text generation with the native engine (dense or an R-Sparse profile): prefill dense,
decode one token at a time through the backend, the same stats as the llama.cpp runtime."""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge.engine.model import Backend, Engine
from edge.errors import ContextOverflowError
from edge.runtime import GenerationStats, Sampling
from edge.system import peak_rss_bytes


def sample(logits: np.ndarray, s: Sampling, history: Sequence[int], rng: np.random.Generator) -> int:
    """llama.cpp's default chain in spirit: repeat penalty, top-k, top-p, min-p, temperature."""
    x = logits.astype(np.float64).copy()
    if s.repeat_penalty != 1.0 and history:
        seen = np.unique(np.asarray(history[-64:]))
        x[seen] = np.where(x[seen] > 0, x[seen] / s.repeat_penalty, x[seen] * s.repeat_penalty)
    if s.temp <= 0:
        return int(np.argmax(x))
    order = np.argsort(-x)
    if s.top_k > 0:
        order = order[: s.top_k]
    p = np.exp((x[order] - x[order[0]]) / s.temp)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1) if s.top_p < 1 else len(p)
    keep = max(1, min(keep, int(np.count_nonzero(p >= s.min_p * p[0])) if s.min_p > 0 else keep))
    p = p[:keep] / p[:keep].sum()
    return int(order[rng.choice(keep, p=p)])


@dataclass
class NativeSession:
    engine: Engine
    backend: Backend | None
    load_ms: float
    profile: str | None = None


def load_native(model: str | os.PathLike[str] | None, sparse_profile: str | os.PathLike[str] | None,
                threads: int | None = None) -> NativeSession:
    """The engine, plus the profile's backend when given (its model sha is checked)."""
    from edge.catalog import resolve_model
    from edge.gguf_file import inspect
    from edge.sparse.profile import SparseProfile

    t0 = time.perf_counter()
    path = resolve_model(model)
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
    return NativeSession(engine, backend, (time.perf_counter() - t0) * 1000,
                         str(sparse_profile) if sparse_profile else None)


def prompt_tokens(engine: Engine, prompt: str, mode: str = "auto", system: str | None = None) -> tuple[list[int], bool]:
    tmpl = engine.info.chat_template
    use_chat = mode == "chat" or (mode == "auto" and bool(tmpl))
    if not use_chat:
        return engine.tokenize((system + "\n\n" if system else "") + prompt), False
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from edge.runtime import LLAMA2_TEMPLATE

    fmt = Jinja2ChatFormatter(tmpl or LLAMA2_TEMPLATE, eos_token="", bos_token="", add_generation_prompt=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return engine.tokenize(fmt(messages=messages).prompt, special=True), True


def generate(sess: NativeSession, tokens: Sequence[int], *, max_tokens: int = 256,
             sampling: Sampling | None = None, n_ctx: int = 2048,
             on_text: Callable[[str], None] | None = None) -> GenerationStats:
    """Prefill `tokens` dense, then decode up to `max_tokens` through the session's backend."""
    engine, s = sess.engine, sampling or Sampling()
    s.validate()
    tokens = list(tokens)
    n_ctx = min(n_ctx, engine.config.context_length)
    if len(tokens) >= n_ctx:
        raise ContextOverflowError(f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; raise --ctx or shorten it")
    budget = min(max_tokens, n_ctx - len(tokens))
    rng = np.random.default_rng(s.seed)
    stats = GenerationStats(n_prompt_tokens=len(tokens), n_prompt_evaluated=len(tokens), load_ms=sess.load_ms)
    stats.stop_reason = "length" if budget == max_tokens else "context"
    cache = engine.new_cache(len(tokens) + budget)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    t0 = time.perf_counter()
    try:
        logits = engine.forward(tokens, cache=cache, last_only=True).logits[-1]
        stats.prompt_ms = (time.perf_counter() - t0) * 1000
        history = list(tokens)
        t1 = time.perf_counter()
        for i in range(budget):
            tok = sample(logits, s, history, rng)
            if i == 0:
                stats.ttft_ms = (time.perf_counter() - t0) * 1000
            if engine.is_eog(tok):
                stats.stop_reason = "eos"
                break
            history.append(tok)
            stats.token_ids.append(tok)
            stats.n_gen_tokens += 1
            piece = decoder.decode(engine.token_piece(tok))
            if piece:
                parts.append(piece)
                if on_text:
                    on_text(piece)
            if i + 1 < budget:
                logits = engine.forward([tok], cache=cache, backend=sess.backend, last_only=True).logits[-1]
        stats.gen_ms = (time.perf_counter() - t1) * 1000
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
        raise
    finally:
        stats.text = "".join(parts)
        stats.total_ms = (time.perf_counter() - t0) * 1000
        if stats.prompt_ms > 0:
            stats.prompt_tps = len(tokens) / stats.prompt_ms * 1000
        if stats.gen_ms > 0 and stats.n_gen_tokens > 1:
            stats.gen_tps = (stats.n_gen_tokens - 1) / stats.gen_ms * 1000  # first came from prefill
        stats.peak_rss_bytes = peak_rss_bytes()
    return stats


def run_native_prompt(model: str | None, prompt: str, *, sparse_profile: str | None,
                      max_tokens: int = 256, sampling: Sampling | None = None, n_ctx: int = 2048,
                      threads: int | None = None, mode: str = "auto", system: str | None = None,
                      on_text: Callable[[str], None] | None = None):
    """`edge run --sparse-profile`: one prompt on the native engine, logged like llama.cpp runs."""
    from edge import telemetry
    from edge.generate import RunResult

    sess = load_native(model, sparse_profile, threads)
    tokens, chat = prompt_tokens(sess.engine, prompt, mode, system)
    sampling = sampling or Sampling()
    stats = generate(sess, tokens, max_tokens=max_tokens, sampling=sampling, n_ctx=n_ctx, on_text=on_text)
    if stats.n_gen_tokens:
        telemetry.log("latency", telemetry.latency_metrics(stats, "run"), model=sess.engine.info,
                      config={"engine": "native", "threads": threads, "n_ctx": n_ctx,
                              "sparse_profile": sess.profile, "correction": None,
                              "temp": sampling.temp, "seed": sampling.seed})
    return RunResult(stats, "chat" if chat else "raw", sess.engine.info.name)
