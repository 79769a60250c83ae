"""edge serve: an OpenAI-compatible HTTP API over one model."""

from __future__ import annotations

from typing import Any

import click

from edge.cli.options import (
    CORRECTION_SCALE,
    model_argument,
    rpc_option,
    runtime_config,
    runtime_options,
    tuned,
)


@click.command("serve")
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key (or --no-auth-ok).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="TCP port to listen on.")
@click.option("--api-key", envvar="EDGE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health [env: EDGE_API_KEY].")
@click.option("--no-auth-ok", "allow_no_key", is_flag=True,
              help="Allow a non-loopback --host without --api-key (trusted networks only).")
@click.option("--queue", "max_queue", type=click.IntRange(0, 1024), default=8, show_default=True,
              help="Requests that may wait behind the running one; more get HTTP 429.")
@click.option("--correction", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Apply this correction vector (see `edge bias mitigate`).")
@CORRECTION_SCALE
@runtime_options
@rpc_option
@click.option("--seed", type=click.IntRange(0, 2**32 - 2), default=None,
              help="Sampling seed for requests that send no 'seed' of their own.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="warning", show_default=True, help="uvicorn's log level.")
def serve_cmd(model: str | None, host: str, port: int, api_key: str | None, allow_no_key: bool,
              max_queue: int, correction: str | None, correction_scale: float, log_level: str,
              seed: int | None, **kw: Any) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API until Ctrl-C.

    Routes: POST /v1/chat/completions and /v1/completions (set "stream": true for
    server-sent events), GET /v1/models, /health, /metrics (Prometheus). One generation
    runs at a time; up to --queue more wait, and beyond that requests get 429. Requests
    use edge's sampling defaults (temperature 0.8, top_k 40, min_p 0.05, repeat_penalty
    1.1, max_tokens 256) unless they say otherwise. Every request is logged (edge logs).

    \b
    Examples:
      edge serve                                  # bundled model on 127.0.0.1:8080
      edge serve llama2-7b-chat-q4km --port 9000 --ctx 4096
      edge serve --host 0.0.0.0 --api-key "$(cat ~/.edge-key)"
      edge serve --rpc 192.168.1.21:50052,192.168.1.22:50052   # layers on two workers
      curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}'
    """
    from edge.serve import ServeOptions, serve

    cfg = runtime_config(kw)
    model_file, cfg = tuned(model, cfg, kw)
    opts = ServeOptions(host=host, port=port, api_key=api_key, allow_no_key=allow_no_key,
                        max_queue=max_queue, correction=correction,
                        correction_scale=correction_scale, log_level=log_level, seed=seed,
                        model_file=model_file if model_file != model else None)

    def ready(engine: Any) -> None:
        click.echo(f"edge serve: {engine.model_id} on http://{host}:{port}/v1 "
                   f"(ctx {engine.gen.n_ctx}, queue {max_queue}); Ctrl-C stops", err=True)

    serve(model, cfg, opts, on_ready=ready)


def register(cli: click.Group) -> None:
    cli.add_command(serve_cmd)
