"""Text generation, whatever the engine: the Generator interface, chat templates, and the
streaming loop both engines run.

Three layers, as mlx-lm has them: `token_stream` samples one token at a time from the
logits an engine returns (the engine's `prefill` and `advance`), `stream_text` turns those
tokens into text pieces with stop strings and the stats, and `Generator.stream` (the
llama.cpp session, edge.runtime.Runtime, and the native engine, edge.engine.generate)
wraps them with its own timers. `prompt_tokens` makes the one chat-or-raw choice.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.errors import BadOptionError, ContextOverflowError
from edge.gguf_file import ModelInfo
from edge.sampling import Sampling, sample

Message = dict[str, str]

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

    def finish(self, t0: float, n_steps: int, step_s: float) -> None:
        """Totals and rates once a stream ends: `n_steps` decode steps took `step_s` seconds."""
        self.total_ms = (time.perf_counter() - t0) * 1000
        self.gen_ms = step_s * 1000
        if self.prompt_ms > 0:
            self.prompt_tps = self.n_prompt_evaluated / self.prompt_ms * 1000
        if step_s > 0:
            self.gen_tps = n_steps / step_s

    def to_dict(self, with_tokens: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_tokens:
            d.pop("token_ids")
        return d


class Generator(Protocol):
    """What run, chat, serve and bench need from an engine; both engines implement it."""

    engine: str  # "llama" (llama.cpp) or "native" (edge's numpy engine)
    info: ModelInfo
    path: Path
    n_ctx: int
    threads: int
    load_ms: float
    last: GenerationStats | None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]: ...

    def stream(self, tokens: Sequence[int], *, max_tokens: int = 256, sampling: Sampling | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]: ...

    def config_record(self, **extra: object) -> dict[str, object]: ...

    def close(self) -> None: ...


# ---- chat templates ----------------------------------------------------------------------
class ChatFormat:
    """A GGUF's Jinja chat template (the Llama-2 one when it has none), rendered to text."""

    def __init__(self, template: str | None, bos: str, eos: str) -> None:
        self.template, self.bos, self.eos = template or LLAMA2_TEMPLATE, bos, eos
        self._fmt: dict[bool, Any] = {}

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if add_generation_prompt not in self._fmt:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._fmt[add_generation_prompt] = Jinja2ChatFormatter(
                self.template, eos_token=self.eos, bos_token=self.bos,
                add_generation_prompt=add_generation_prompt)
        return self._fmt[add_generation_prompt](messages=list(messages)).prompt

    def tokens(self, tokenize: Callable[..., list[int]], bos_id: int, messages: Sequence[Message]) -> list[int]:
        """The rendered conversation as tokens, with one BOS even if the template wrote its own."""
        tokens = tokenize(self.render(messages), add_bos=True, special=True)
        if len(tokens) > 1 and tokens[0] == bos_id and tokens[1] == bos_id:
            tokens = tokens[1:]
        return tokens


def prompt_tokens(gen: Generator, prompt: str, mode: str = "auto",
                  system: str | None = None) -> tuple[list[int], bool]:
    """The one chat-or-raw choice: "auto" applies the model's chat template when the GGUF
    has one (as Ollama does) and sends the text as-is otherwise; "chat"/"raw" force it.
    Returns (tokens, whether the template was applied)."""
    use_chat = mode == "chat" or (mode == "auto" and gen.info.has_chat_template)
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else [])
        return gen.chat_tokens(messages + [{"role": "user", "content": prompt}]), True
    return gen.tokenize((system + "\n\n" if system else "") + prompt), False


# ---- the loop ----------------------------------------------------------------------------
def plan(n_prompt: int, n_ctx: int, max_tokens: int, sampling: Sampling | None,
         context_length: int | None = None) -> tuple[Sampling, int]:
    """Validate a generation request; (sampling, token budget)."""
    sampling = sampling or Sampling()
    sampling.validate()
    if max_tokens < 1:
        raise BadOptionError(f"-n {max_tokens}: the number of tokens to generate must be ≥ 1")
    if n_prompt >= n_ctx:
        raise ContextOverflowError(
            f"the prompt is {n_prompt} tokens but the context holds {n_ctx}; "
            f"raise --ctx (this model allows {context_length or 'unknown'}) or shorten it")
    return sampling, min(max_tokens, n_ctx - n_prompt)


def token_stream(prefill: Callable[[], np.ndarray], advance: Callable[[int], np.ndarray],
                 sampling: Sampling, budget: int) -> Iterator[int]:
    """Sample from the prompt's logits, then feed each token back: up to `budget` tokens.
    The penalty looks at generated tokens only, as llama.cpp's sampler does."""
    rng = sampling.rng()
    recent: list[int] = []
    logits = prefill()
    for i in range(budget):
        tok = sample(logits, sampling, recent, rng)
        yield tok
        recent.append(tok)
        if i + 1 < budget:
            logits = advance(tok)


def stream_text(tokens: Iterator[int], piece: Callable[[int], bytes], is_eog: Callable[[int], bool],
                stats: GenerationStats, t0: float, stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces of `tokens` as they come; stops at an end-of-generation token or a stop
    string (text that could start one is held back). Fills `stats` (ttft, tokens, text,
    stop reason; "interrupted" on Ctrl-C or when the caller closes the stream early)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    pending = ""
    hold = max((len(s) for s in stop), default=1) - 1
    try:
        for tok in tokens:
            if stats.n_gen_tokens == 0 and not stats.ttft_ms:
                stats.ttft_ms = (time.perf_counter() - t0) * 1000
            if is_eog(tok):
                stats.stop_reason = "eos"
                break
            stats.n_gen_tokens += 1
            stats.token_ids.append(tok)
            pending += decoder.decode(piece(tok))
            hit = min((i for s in stop if (i := pending.find(s)) >= 0), default=-1)
            cut = hit if hit >= 0 else len(pending) - hold
            if cut > 0:
                parts.append(pending[:cut])
                yield parts[-1]
            if hit >= 0:
                stats.stop_reason, pending = "stop", ""
                break
            pending = pending[max(cut, 0):]
        tail = "" if stats.stop_reason == "stop" else pending + decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            yield tail
    except (KeyboardInterrupt, GeneratorExit):
        stats.stop_reason = "interrupted"
        raise
    finally:
        stats.text = "".join(parts)
