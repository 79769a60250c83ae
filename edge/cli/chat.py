"""edge chat: the interactive REPL."""

from __future__ import annotations

import sys
from typing import Any

import click

from edge.chat import ChatSession, repl
from edge.cli.options import (
    correction_options,
    model_argument,
    rpc_option,
    runtime_config,
    runtime_options,
    sampling,
    sampling_options,
)
from edge.generate import load_runtime


@click.command("chat")
@model_argument
@click.option("--system", help="System prompt for the whole conversation.")
@click.option("-n", "--max-tokens", type=click.IntRange(1, 1 << 20), default=512, show_default=True,
              help="Tokens per answer at most.")
@runtime_options
@rpc_option
@sampling_options
@correction_options
def chat_cmd(model: str | None, system: str | None, max_tokens: int, correction: str | None,
             correction_scale: float, **kw: Any) -> None:
    """Chat with MODEL (a .gguf path, a catalog name, or the bundled SmolLM2-135M-Instruct).

    Answers stream as they are generated. The oldest turns are dropped when the
    conversation outgrows the context, so a chat never fails for length. Type /help
    inside for commands (/stats, /reset, /save FILE, /exit). Ctrl-C stops an answer,
    Ctrl-D leaves. With stdin not a terminal, every line is one turn and only the
    answers are printed.

    \b
    Examples:
      edge chat
      edge chat --system "Answer in one sentence." --temp 0.3
      printf 'Hi!\\nWhat is 2+2?\\n' | edge chat --temp 0
      edge chat --correction fair.gguf          # with a bias-correction vector
    """
    cfg = runtime_config(kw)
    smp = sampling(kw)
    rt = load_runtime(model, cfg)
    try:
        extra: dict[str, Any] = {}
        if correction:
            from bias.cvec import load_correction

            load_correction(rt, correction, correction_scale)
            extra = {"correction": correction, "correction_scale": correction_scale}
        session = ChatSession(rt, system=system, max_tokens=max_tokens, sampling=smp,
                              config_extra=extra)
        i = rt.info
        banner = (f"edge chat · {rt.path.name} ({i.params / 1e6:.0f}M params, {i.quant}) · "
                  f"ctx {rt.n_ctx} · {rt.threads} threads\n"
                  "/help for commands · Ctrl-C stops an answer · Ctrl-D exits")
        code = repl(session, interactive=sys.stdin.isatty(), banner=banner)
    finally:
        rt.close()
    sys.exit(code)


def register(cli: click.Group) -> None:
    cli.add_command(chat_cmd)
