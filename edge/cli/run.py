"""edge run: one prompt, one streamed answer."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

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
from edge.generate import run_prompt


@click.command("run")
@model_argument
@click.option("-p", "--prompt", help="The prompt; '-' or omitted reads it from stdin.")
@click.option("-n", "--max-tokens", type=click.IntRange(1, 1 << 20), default=256, show_default=True,
              help="Tokens to generate at most.")
@click.option("--system", help="System prompt (chat mode).")
@click.option("--raw", "mode", flag_value="raw", help="Send the prompt as-is, no chat template.")
@click.option("--chat", "mode", flag_value="chat", help="Always apply the chat template (Llama-2 fallback).")
@runtime_options
@rpc_option
@sampling_options
@click.option("--sparse-profile", type=click.Path(dir_okay=False), default=None,
              help="Run on edge's native engine with this R-Sparse profile (see `edge sparsify`).")
@correction_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text and timings.")
def run_cmd(model: str | None, prompt: str | None, max_tokens: int, system: str | None,
            mode: str | None, sparse_profile: str | None, as_json: bool, correction: str | None = None,
            correction_scale: float = 1.0, **kw: Any) -> None:
    """Generate an answer to PROMPT with MODEL (a .gguf path, a catalog name, or the
    bundled SmolLM2-135M-Instruct when omitted), streaming it as it comes.

    Chat models get their chat template applied (as Ollama does); --raw sends the text
    as-is. Timings are logged to the run log (see `edge logs`).

    \b
    Examples:
      edge run -p "Name three rivers in Africa."
      edge run --temp 0 --seed 1 -p "Once upon a time" -n 64 --raw
      edge run llama2-7b-chat-q4km -p "Hello" --threads 4 --json
      echo "Summarise: ..." | edge run
      edge run --correction fair.gguf -p "Describe a nurse."   # bias correction vector
      edge run --sparse-profile smol-50.json -p "Hello" --temp 0   # native engine, R-Sparse
      edge run --rpc 192.168.1.21:50052,192.168.1.22:50052 -p "Hello"  # layers on workers
    """
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give a prompt with -p TEXT (or pipe it on stdin)")
        prompt = sys.stdin.read()
    cfg = runtime_config(kw)
    model, cfg = tuned(model, cfg, kw, sparse_profile=sparse_profile)
    smp = sampling(kw)

    def echo(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    result = run_prompt(model, prompt, max_tokens=max_tokens, sampling=smp, config=cfg,
                        mode=mode or "auto", system=system, on_text=None if as_json else echo,
                        correction=correction, correction_scale=correction_scale,
                        sparse_profile=sparse_profile)
    if as_json:
        out = result.stats.to_dict() | {"prompt_mode": result.prompt_mode}
        if cfg.rpc:
            from edge.rpc import last_split

            split = last_split()
            out["rpc"] = split.to_dict() if split else None
        click.echo(json.dumps(out))
    else:
        click.echo()


def register(cli: click.Group) -> None:
    cli.add_command(run_cmd)
