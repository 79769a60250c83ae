"""`edge run`: open a session, stream one answer, log what it cost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge import telemetry
from edge.generation import GenerationStats, prompt_tokens
from edge.runtime import RuntimeConfig
from edge.sampling import Sampling
from edge.session import open_session


@dataclass
class RunResult:
    stats: GenerationStats
    prompt_mode: str  # "chat" (template applied) or "raw"
    model_name: str | None


def run_prompt(
    model: str | None,
    prompt: str,
    *,
    max_tokens: int = 256,
    sampling: Sampling | None = None,
    config: RuntimeConfig | None = None,
    mode: str = "auto",
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
    correction: str | None = None,
    correction_scale: float = 1.0,
    sparse_profile: str | None = None,
) -> RunResult:
    """Generate an answer to `prompt`; `on_text` receives each piece as it streams.

    mode "auto" applies the model's chat template when the GGUF has one (as Ollama does)
    and sends the text as-is otherwise; "chat" and "raw" force either. `sparse_profile`
    runs edge's native engine with that R-Sparse profile instead of llama.cpp.
    """
    gen = open_session(model, config, sparse_profile=sparse_profile, correction=correction,
                       correction_scale=correction_scale)
    try:
        tokens, use_chat = prompt_tokens(gen, prompt, mode, system)
        sampling = sampling or Sampling()
        try:
            for piece in gen.stream(tokens, max_tokens=max_tokens, sampling=sampling):
                if on_text:
                    on_text(piece)
        finally:
            if gen.last is not None and gen.last.n_gen_tokens:
                telemetry.log("latency", telemetry.latency_metrics(gen.last, "run"), model=gen.info,
                              config=gen.config_record(temp=sampling.temp, seed=sampling.seed))
        assert gen.last is not None
        return RunResult(gen.last, "chat" if use_chat else "raw", gen.info.name)
    finally:
        gen.close()
