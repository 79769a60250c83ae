"""`edge serve`: an OpenAI-compatible HTTP API over one loaded model (FastAPI + uvicorn).

Everything a Runtime does applies: runtime options, corrections, telemetry (one latency
record per request). See edge/serve/app.py for the routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import BadOptionError
from edge.netaddr import is_loopback


def check_bind(host: str, api_key: str | None, allow_no_key: bool) -> None:
    """Refuse to put an unauthenticated API on a network unless the user says so."""
    if not is_loopback(host) and not api_key and not allow_no_key:
        raise BadOptionError(
            f"--host {host} would open the API to the network without a key; give "
            "--api-key KEY (clients send 'Authorization: Bearer KEY'), or --no-auth-ok if "
            "the network is trusted")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    allow_no_key: bool = False
    max_queue: int = 8
    correction: str | None = None
    correction_scale: float = 1.0
    log_level: str = "warning"
    seed: int | None = None  # for requests that send no seed
    model_file: str | None = None  # load this file (a tuned copy) but name the model as given


def model_id_for(model: str | None, path: Path) -> tuple[str, tuple[str, ...]]:
    """The id /v1/models shows, and other names a request may use for the same model."""
    from edge.catalog import default_entry

    if model is None:
        name = default_entry().name
    elif Path(model).expanduser().is_file():
        name = path.stem
    else:
        name = model
    aliases = {path.name, path.stem, str(path)}
    if model:
        aliases.add(model)
    return name, tuple(sorted(aliases - {name}))


def build_app(model: str | None, config: Any, opts: ServeOptions) -> Any:
    """Load the model and return (app, engine); the caller runs and closes them."""
    from edge.serve.app import create_app
    from edge.serve.engine import ServeEngine
    from edge.session import open_session

    if opts.max_queue < 0:
        raise BadOptionError(f"--queue {opts.max_queue} must be ≥ 0")
    check_bind(opts.host, opts.api_key, opts.allow_no_key)
    gen = open_session(opts.model_file or model, config, correction=opts.correction, correction_scale=opts.correction_scale)
    try:
        name, aliases = model_id_for(model, gen.path)
        engine = ServeEngine(gen, model_id=name, max_queue=opts.max_queue, seed=opts.seed)
    except BaseException:
        gen.close()
        raise
    return create_app(engine, api_key=opts.api_key, aliases=aliases), engine


def serve(model: str | None, config: Any, opts: ServeOptions,
          on_ready: Any = None) -> None:
    """Load the model and serve until Ctrl-C / SIGTERM."""
    import uvicorn

    app, engine = build_app(model, config, opts)
    try:
        server = uvicorn.Server(uvicorn.Config(
            app, host=opts.host, port=opts.port, log_level=opts.log_level, access_log=False,
            timeout_graceful_shutdown=5, lifespan="off"))
        if on_ready:
            on_ready(engine)
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        if not server.started:
            raise BadOptionError(
                f"could not listen on {opts.host}:{opts.port} (in use, or not an address of "
                "this machine); choose another --port or --host")
    finally:
        engine.close()
