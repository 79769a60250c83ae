"""`edge run`: load a model, stream one answer, log what it cost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge import telemetry
from edge.catalog import resolve_model
from edge.runtime import GenerationStats, Runtime, RuntimeConfig, Sampling


def load_runtime(model: str | None, config: RuntimeConfig | None = None) -> Runtime:
    """MODEL argument (path, catalog name or None) → a loaded, validated Runtime."""
    return Runtime(resolve_model(model), config or RuntimeConfig())


def runtime_config_record(rt: Runtime, **extra: object) -> dict[str, object]:
    return {"threads": rt.threads, "n_ctx": rt.n_ctx, "n_batch": rt.llm.n_batch,
            "sparse_profile": None, "correction": None, "rpc": rt.config.rpc, **extra}


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
) -> RunResult:
    """Generate an answer to `prompt`; `on_text` receives each piece as it streams.

    mode "auto" applies the model's chat template when the GGUF has one (as Ollama does)
    and sends the text as-is otherwise; "chat" and "raw" force either.
    """
    rt = load_runtime(model, config)
    try:
        if correction:  # a control vector (edge bias mitigate), checked against the model
            from bias.cvec import load_correction

            load_correction(rt, correction, correction_scale)
        use_chat = mode == "chat" or (mode == "auto" and rt.info.has_chat_template)
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else [])
            tokens = rt.chat_tokens(messages + [{"role": "user", "content": prompt}])
        else:
            tokens = rt.tokenize((system + "\n\n" if system else "") + prompt)
        sampling = sampling or Sampling()
        try:
            for piece in rt.stream(tokens, max_tokens=max_tokens, sampling=sampling):
                if on_text:
                    on_text(piece)
        finally:
            if rt.last is not None and rt.last.n_gen_tokens:
                telemetry.log(
                    "latency", telemetry.latency_metrics(rt.last, "run"),
                    model=rt.info,
                    config=runtime_config_record(rt, temp=sampling.temp, seed=sampling.seed,
                                                 correction=correction,
                                                 correction_scale=correction_scale if correction else None),
                )
        assert rt.last is not None
        return RunResult(rt.last, "chat" if use_chat else "raw", rt.info.name)
    finally:
        rt.close()
