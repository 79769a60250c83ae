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
    tuned,
)
from edge.session import open_session


@click.command("chat")
@model_argument
@click.option("--system", help="System prompt for the whole conversation.")
@click.option("-n", "--max-tokens", type=click.IntRange(1, 1 << 20), default=512, show_default=True,
              help="Tokens per answer at most.")
@runtime_options
@rpc_option
@sampling_options
@click.option("--sparse-profile", type=click.Path(dir_okay=False), default=None,
              help="Chat on edge's native engine with this R-Sparse profile (see `edge sparsify`).")
@correction_options
def chat_cmd(model: str | None, system: str | None, max_tokens: int, correction: str | None,
             correction_scale: float, sparse_profile: str | None, **kw: Any) -> None:
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
      edge chat --sparse-profile smol-50.json   # native engine, R-Sparse decode
    """
    cfg = runtime_config(kw)
    model, cfg = tuned(model, cfg, kw, sparse_profile=sparse_profile)
    smp = sampling(kw)
    gen = open_session(model, cfg, sparse_profile=sparse_profile, correction=correction,
                       correction_scale=correction_scale)
    try:
        session = ChatSession(gen, system=system, max_tokens=max_tokens, sampling=smp)
        i = gen.info
        engine = " · native engine" if gen.engine == "native" else ""
        banner = (f"edge chat · {gen.path.name} ({i.params / 1e6:.0f}M params, {i.quant}){engine} · "
                  f"ctx {gen.n_ctx} · {gen.threads} threads\n"
                  "/help for commands · Ctrl-C stops an answer · Ctrl-D exits")
        code = repl(session, interactive=sys.stdin.isatty(), banner=banner)
    finally:
        gen.close()
    sys.exit(code)


def register(cli: click.Group) -> None:
    cli.add_command(chat_cmd)
