"""One llama.cpp session: load, tokenize, stream, chat templates, log-probs, control vectors.

Built on llama-cpp-python's `Llama` (model, context, sampler chain, KV-cache prefix reuse)
with edge's own generation loop around it, so that timing, stop reasons, Ctrl-C and
telemetry are ours. Timings come from llama.cpp's own counters (llama_perf_context).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BadOptionError, ContextOverflowError, InvalidModelFileError
from edge.gguf_file import ModelInfo, inspect
from edge.system import default_threads, peak_rss_bytes

# The Llama-2 chat format, for GGUFs that carry no tokenizer.chat_template.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@dataclass
class RuntimeConfig:
    n_ctx: int = 2048
    threads: int | None = None  # None: physical cores
    n_batch: int = 512
    use_mmap: bool = True
    use_mlock: bool = False
    seed: int = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
    rpc: list[str] | None = None  # HOST:PORT of `edge worker`s that get the layers (edge.rpc)
    tensor_split: list[float] | None = None  # share of the layers per RPC device (with rpc)

    def validate(self) -> None:
        if self.n_ctx < 16:
            raise BadOptionError(f"--ctx {self.n_ctx} is too small; use at least 16 (e.g. 2048)")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise BadOptionError(f"--threads {self.threads} is out of range; use 1 to 256")


@dataclass
class Sampling:
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None

    def validate(self) -> None:
        checks = [
            (self.temp >= 0, f"--temp {self.temp} must be ≥ 0 (0 = greedy)"),
            (0 < self.top_p <= 1, f"--top-p {self.top_p} must be in (0, 1]"),
            (self.top_k >= 0, f"--top-k {self.top_k} must be ≥ 0 (0 = off)"),
            (0 <= self.min_p <= 1, f"--min-p {self.min_p} must be in [0, 1]"),
            (self.repeat_penalty > 0, f"--repeat-penalty {self.repeat_penalty} must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BadOptionError(msg)


@dataclass
class GenerationStats:
    """What one generation cost; rendered by `edge run --json` and logged as telemetry."""

    text: str = ""
    n_prompt_tokens: int = 0
    n_prompt_evaluated: int = 0  # prompt tokens not reused from the KV cache
    n_gen_tokens: int = 0
    load_ms: float = 0.0
    ttft_ms: float = 0.0
    prompt_ms: float = 0.0
    gen_ms: float = 0.0
    prompt_tps: float = 0.0
    gen_tps: float = 0.0
    total_ms: float = 0.0
    peak_rss_bytes: int = 0
    stop_reason: str = ""  # eos | length | context | stop | interrupted
    token_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self, with_tokens: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_tokens:
            d.pop("token_ids")
        return d


class Runtime:
    """A loaded model and one context. Not thread-safe: one generation at a time."""

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
        # llama.cpp pads its context to a multiple of 256; llama-cpp-python's token buffer
        # keeps the size asked for, and that is the limit that holds.
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self._formatter: Any = None
        self.last: GenerationStats | None = None
        self.control_vector: np.ndarray | None = None

    # ---- tokens ---------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def token_piece(self, token: int, special: bool = False) -> bytes:
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:  # piece longer than the buffer
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # ---- chat -----------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        return self.info.chat_template or LLAMA2_TEMPLATE

    def format_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._formatter is None or self._formatter.add_generation_prompt != add_generation_prompt:
            bos = self.token_piece(self.llm.token_bos(), special=True).decode("utf-8", "replace")
            eos = self.token_piece(self.llm.token_eos(), special=True).decode("utf-8", "replace")
            self._formatter = Jinja2ChatFormatter(
                self.chat_template, eos_token=eos, bos_token=bos,
                add_generation_prompt=add_generation_prompt,
            )
        return self._formatter(messages=list(messages)).prompt

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        prompt = self.format_chat(messages)
        tokens = self.tokenize(prompt, add_bos=True, special=True)
        bos = self.llm.token_bos()
        if len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the template wrote its own BOS
        return tokens

    # ---- generation -----------------------------------------------------------------
    def stream(
        self,
        tokens: Sequence[int],
        *,
        max_tokens: int = 256,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; `self.last` holds the stats after.

        Stops at an end-of-generation token, `max_tokens`, a full context, or a stop string.
        Closing the iterator early or Ctrl-C (KeyboardInterrupt) still records the stats.
        """
        import llama_cpp

        sampling = sampling or Sampling()
        sampling.validate()
        if max_tokens < 1:
            raise BadOptionError(f"-n {max_tokens}: the number of tokens to generate must be ≥ 1")
        tokens = list(tokens)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}; "
                f"raise --ctx (this model allows {self.info.context_length or 'unknown'}) or shorten it"
            )
        budget = min(max_tokens, self.n_ctx - len(tokens))
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        stats = GenerationStats(n_prompt_tokens=len(tokens), load_ms=self.load_ms)
        self.last = stats
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text_parts: list[str] = []
        pending = ""  # text held back while it could be the start of a stop string
        max_stop = max((len(s) for s in stop), default=0)
        ctx = self.llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        stats.stop_reason = "length" if budget == max_tokens else "context"
        gen = self.llm.generate(
            tokens, temp=sampling.temp, top_p=sampling.top_p, top_k=sampling.top_k,
            min_p=sampling.min_p, repeat_penalty=sampling.repeat_penalty,
        )
        try:
            for tok in gen:
                if stats.n_gen_tokens == 0:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1000
                if self.is_eog(tok):
                    stats.stop_reason = "eos"
                    break
                stats.n_gen_tokens += 1
                stats.token_ids.append(tok)
                pending += decoder.decode(self.token_piece(tok))
                if stop:
                    hit = min((i for s in stop if (i := pending.find(s)) >= 0), default=-1)
                    if hit >= 0:
                        text_parts.append(pending[:hit])
                        pending = ""
                        stats.stop_reason = "stop"
                        yield text_parts[-1]
                        break
                    safe = len(pending) - (max_stop - 1)
                    if safe > 0:
                        text_parts.append(pending[:safe])
                        pending = pending[safe:]
                        yield text_parts[-1]
                elif pending:
                    text_parts.append(pending)
                    pending = ""
                    yield text_parts[-1]
                if stats.n_gen_tokens >= budget:
                    break
            tail = pending + decoder.decode(b"", final=True)
            if tail and stats.stop_reason != "stop":
                text_parts.append(tail)
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            stats.stop_reason = "interrupted"
            raise
        finally:
            gen.close()
            stats.text = "".join(text_parts)
            self._finish(stats, t0)

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
        n_vocab = llm.n_vocab()
        out = np.empty((max(0, len(tokens) - first), n_vocab), dtype=np.float32)
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
                out[row : row + n_out] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out, n_vocab))
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
        import llama_cpp

        ctx = self.llm._ctx.ctx
        n_layers, n_embd = self.info.n_layers or 0, self.info.n_embd or 0
        if directions is None:
            rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, 0, 0)
            self.control_vector = None
        else:
            d = np.asarray(directions, dtype=np.float32)
            if d.shape != (n_layers, n_embd):
                raise InvalidModelFileError(
                    f"control vector has shape {d.shape} but the model needs ({n_layers}, {n_embd})"
                )
            buf = np.ascontiguousarray(d[1:] * np.float32(scale))
            ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = llama_cpp.llama_set_adapter_cvec(ctx, ptr, buf.size, n_embd, 1, n_layers - 1)
            self.control_vector = buf
        if rc != 0:
            raise InvalidModelFileError(f"llama.cpp rejected the control vector (code {rc})")
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def _load(path: Path, config: RuntimeConfig, threads: int) -> Any:
    import llama_cpp

    from edge.hostcheck import ensure_llama_works

    ensure_llama_works()  # a library that traps on this CPU fails here, in one line

    devices: Any = contextlib.nullcontext()
    extra: dict[str, Any] = {}
    if config.rpc:
        from edge.rpc import offload_to

        devices = offload_to(config.rpc, config.tensor_split)
        extra["n_gpu_layers"] = -1  # every layer to the RPC devices
        if config.tensor_split:
            extra["tensor_split"] = config.tensor_split
    try:
        with devices:
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=config.n_ctx, n_batch=min(config.n_batch, config.n_ctx),
                n_threads=threads, n_threads_batch=threads, use_mmap=config.use_mmap,
                use_mlock=config.use_mlock, seed=config.seed, verbose=False, **extra,
            )
    except (ValueError, RuntimeError, OSError) as e:
        raise InvalidModelFileError(
            f"llama.cpp could not load {path} ({e}); check it is a Llama-family GGUF this "
            "llama.cpp supports, and that there is enough memory"
        ) from None
