"""One llama.cpp session: a loaded model and one context, behind edge's Generator interface.

Built on llama-cpp-python's `Llama` (model, context, batch, KV-cache prefix reuse); the
sampling and the text stream are edge's own (edge.sampling, edge.generation), so the
native engine samples exactly the same way. Timings come from llama.cpp's own counters
(llama_perf_context).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge import llamacpp
from edge.errors import BadOptionError, ContextOverflowError, InvalidModelFileError
from edge.generation import ChatFormat, GenerationStats, Message, plan, stream_text, token_stream
from edge.gguf_file import ModelInfo, inspect
from edge.sampling import Sampling
from edge.system import default_threads, peak_rss_bytes


@dataclass
class RuntimeConfig:
    n_ctx: int = 2048
    threads: int | None = None  # None: physical cores
    n_batch: int = 512
    use_mmap: bool = True
    use_mlock: bool = False
    rpc: list[str] | None = None  # HOST:PORT of `edge worker`s that get the layers (edge.rpc)
    tensor_split: list[float] | None = None  # share of the layers per RPC device (with rpc)
    n_ubatch: int = 512  # llama.cpp's physical batch (capped at n_batch)
    type_k: str = "f16"  # KV cache types: f16, q8_0, q4_0, ... (a quantized V needs flash_attn)
    type_v: str = "f16"
    flash_attn: bool = False
    repack: bool = True  # llama.cpp's interleaved weight copies (extra buffer types); off saves RAM
    check_memory: bool = True  # open_runtime refuses a session edge.memory says would swap or OOM

    def validate(self) -> None:
        if self.n_ctx < 16:
            raise BadOptionError(f"--ctx {self.n_ctx} is too small; use at least 16 (e.g. 2048)")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise BadOptionError(f"--threads {self.threads} is out of range; use 1 to 256")
        for name in (self.type_k, self.type_v):
            if name not in llamacpp.KV_CACHE_TYPES:
                raise BadOptionError(f"KV cache type {name!r} is not one of {', '.join(llamacpp.KV_CACHE_TYPES)}")
        if self.type_v not in ("f32", "f16", "bf16") and not self.flash_attn:
            raise BadOptionError(f"a {self.type_v} V cache needs flash attention; turn it on or keep V at f16")


class Runtime:
    """A loaded model and one context. Not thread-safe: one generation at a time."""

    engine = "llama"

    def __init__(self, model_path: str | os.PathLike[str], config: RuntimeConfig | None = None):
        self.config = config or RuntimeConfig()
        self.config.validate()
        self.info: ModelInfo = inspect(model_path)  # pre-flight: llama.cpp never sees a bad file
        self.path = Path(self.info.path)
        if self.info.context_length and self.config.n_ctx > self.info.context_length:
            self.config.n_ctx = self.info.context_length  # never beyond what the model was trained on
        self.threads = self.config.threads or default_threads()
        t0 = time.perf_counter()
        self.llm = _load(self.path, self.config, self.threads)
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.vocab = self.llm._model.vocab
        self.model = self.llm._model.model  # the llama_model, for second contexts (bias, bench)
        self.bos = int(self.llm.token_bos())
        self.n_vocab = int(self.llm.n_vocab())
        # llama.cpp pads its context to a multiple of 256; llama-cpp-python's token buffer
        # keeps the size asked for, and that is the limit that holds.
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self._chat: ChatFormat | None = None
        self.last: GenerationStats | None = None
        self.control_vector: np.ndarray | None = None  # (n_layers, n_embd) as applied
        self.correction: dict[str, Any] | None = None  # file and scale, for the run log

    # ---- tokens ---------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def token_piece(self, token: int, special: bool = False) -> bytes:
        return llamacpp.token_piece(self.vocab, token, special)

    def is_eog(self, token: int) -> bool:
        return llamacpp.is_eog(self.vocab, token)

    # ---- chat -----------------------------------------------------------------------
    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            piece = self.token_piece
            self._chat = ChatFormat(self.info.chat_template,
                                    bos=piece(self.bos, special=True).decode("utf-8", "replace"),
                                    eos=piece(self.llm.token_eos(), special=True).decode("utf-8", "replace"))
        return self._chat

    def format_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self.chat.render(messages, add_generation_prompt)

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        return self.chat.tokens(self.tokenize, self.bos, messages)

    # ---- generation -----------------------------------------------------------------
    def stream(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield text pieces as they are generated; `self.last` holds the stats after.

        Stops at an end-of-generation token, `max_tokens`, a full context, or a stop string.
        Closing the iterator early or Ctrl-C (KeyboardInterrupt) still records the stats.
        """
        import llama_cpp

        tokens = list(tokens)
        sampling, budget = plan(len(tokens), self.n_ctx, max_tokens, sampling, self.info.context_length)
        stats = GenerationStats(n_prompt_tokens=len(tokens), load_ms=self.load_ms)
        stats.stop_reason = "length" if budget == max_tokens else "context"
        self.last = stats
        llama_cpp.llama_perf_context_reset(self.llm._ctx.ctx)
        t0 = time.perf_counter()
        steps = token_stream(lambda: self._prefill(tokens), self._advance, sampling, budget)
        try:
            yield from stream_text(steps, self.token_piece, self.is_eog, stats, t0, stop)
        finally:
            self._finish(stats, t0)

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        """Evaluate what the KV cache does not already hold of `tokens`; the last logits."""
        llm = self.llm
        keep = llm.longest_token_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens)
        keep = min(keep, len(tokens) - 1)  # the last token is always evaluated, for its logits
        if keep <= 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
            llm.reset()
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        return self._logits()

    def _advance(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._logits()

    def _finish(self, stats: GenerationStats, t0: float) -> None:
        import llama_cpp

        perf = llama_cpp.llama_perf_context(self.llm._ctx.ctx)
        stats.total_ms = (time.perf_counter() - t0) * 1000
        stats.n_prompt_evaluated = int(perf.n_p_eval)
        stats.prompt_ms = float(perf.t_p_eval_ms)
        stats.gen_ms = float(perf.t_eval_ms)
        if perf.n_p_eval and perf.t_p_eval_ms > 0:
            stats.prompt_tps = perf.n_p_eval / perf.t_p_eval_ms * 1000
        if perf.n_eval and perf.t_eval_ms > 0:
            stats.gen_tps = perf.n_eval / perf.t_eval_ms * 1000
        stats.peak_rss_bytes = peak_rss_bytes()

    def generate(self, prompt: str, *, max_tokens: int = 256, sampling: Sampling | None = None,
                 stop: Sequence[str] = ()) -> GenerationStats:
        """Plain-text completion of `prompt`, without streaming."""
        for _ in self.stream(self.tokenize(prompt), max_tokens=max_tokens, sampling=sampling, stop=stop):
            pass
        assert self.last is not None
        return self.last

    # ---- logits and log-probabilities -------------------------------------------------
    def logits(self, tokens: Sequence[int], first: int = 0) -> np.ndarray:
        """Logits at positions ≥ `first` of `tokens`, (T - first, n_vocab) float32, from an
        empty KV cache. llama.cpp computes outputs only where asked, as llama-perplexity does."""
        tokens = list(tokens)
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit the {self.n_ctx}-token context")
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        out = np.empty((max(0, len(tokens) - first), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), llm.n_batch):
            part = tokens[start : start + llm.n_batch]
            llm._batch.set_batch(batch=part, n_past=start, logits_all=True)
            wanted = [start + k >= first for k in range(len(part))]
            for k, w in enumerate(wanted):
                llm._batch.batch.logits[k] = w
            llm._ctx.decode(llm._batch)
            n_out = sum(wanted)
            if n_out:
                row = max(start, first) - first
                out[row : row + n_out] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out, self.n_vocab))
        llm.reset()  # llama-cpp-python's prefix cache no longer matches the KV cache
        return out

    def token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i ≥ 1, from one pass over the sequence."""
        tokens = list(tokens)
        if len(tokens) < 2:
            return np.zeros(0, dtype=np.float64)
        rows = self.logits(tokens[:-1]).astype(np.float64)
        m = rows.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]
        return rows[np.arange(len(rows)), tokens[1:]] - lse

    # ---- control vectors ------------------------------------------------------------
    def set_control_vector(self, directions: np.ndarray | None, scale: float = 1.0) -> None:
        """Add `scale * directions[il]` to the residual stream after layer il (il ≥ 1).

        `directions` has shape (n_layers, n_embd); row 0 is ignored, as in llama.cpp.
        None clears it. The KV cache is dropped: cached keys were computed without it.
        """
        n_layers, n_embd = self.info.n_layers or 0, self.info.n_embd or 0
        m = None if directions is None else np.asarray(directions, dtype=np.float32) * np.float32(scale)
        llamacpp.set_control_vector(self.llm._ctx.ctx, m, n_layers, n_embd)
        self.control_vector = m
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    # ---- the run log ----------------------------------------------------------------
    def config_record(self, **extra: object) -> dict[str, object]:
        """This session's `config` for a telemetry record."""
        return {"threads": self.threads, "n_ctx": self.n_ctx, "n_batch": self.llm.n_batch,
                "sparse_profile": None, "correction": None, "correction_scale": None, "rpc": self.config.rpc,
                **(self.correction or {}), **extra}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def _load(path: Path, config: RuntimeConfig, threads: int) -> Any:
    devices: Any = contextlib.nullcontext()
    extra: dict[str, Any] = {}
    if config.rpc:
        from edge.rpc import offload_to

        devices = offload_to(config.rpc, config.tensor_split)
        extra["n_gpu_layers"] = -1  # every layer to the RPC devices
        if config.tensor_split:
            extra["tensor_split"] = config.tensor_split
    if config.type_k != "f16" or config.type_v != "f16":
        extra["type_k"] = llamacpp.ggml_type(config.type_k)
        extra["type_v"] = llamacpp.ggml_type(config.type_v)
    n_batch = min(config.n_batch, config.n_ctx)
    try:
        with devices:
            return llamacpp.open_llama(
                path, repack=config.repack, n_ctx=config.n_ctx, n_batch=n_batch,
                n_ubatch=min(config.n_ubatch, n_batch), flash_attn=config.flash_attn,
                n_threads=threads, n_threads_batch=threads, use_mmap=config.use_mmap,
                use_mlock=config.use_mlock, **extra)
    except (ValueError, RuntimeError, OSError) as e:
        raise InvalidModelFileError(
            f"llama.cpp could not load {path} ({e}); check it is a Llama-family GGUF this "
            "llama.cpp supports, and that there is enough memory"
        ) from None
