"""`edge serve`: an OpenAI-compatible HTTP API over one loaded model (FastAPI + uvicorn).

Everything a Runtime does applies: runtime options, corrections, telemetry (one latency
record per request). See edge/serve/app.py for the routes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BadOptionError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it can be reached from elsewhere


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
    extra_config: dict[str, Any] = field(default_factory=dict)


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


def apply_correction(runtime: Any, path: str, scale: float) -> dict[str, Any]:
    """Apply a correction vector with issue 6's loader (bias.cvec.load_correction)."""
    try:
        from bias.cvec import load_correction
    except ImportError:
        raise BadOptionError(
            "--correction needs bias.cvec.load_correction, which this install lacks; "
            "update edge or run without --correction") from None
    load_correction(runtime, path, scale)
    return {"correction": str(path), "correction_scale": scale}


def build_app(model: str | None, config: Any, opts: ServeOptions) -> Any:
    """Load the model and return (app, engine); the caller runs and closes them."""
    from edge.generate import load_runtime
    from edge.serve.app import create_app
    from edge.serve.engine import ServeEngine

    if opts.max_queue < 0:
        raise BadOptionError(f"--queue {opts.max_queue} must be ≥ 0")
    check_bind(opts.host, opts.api_key, opts.allow_no_key)
    rt = load_runtime(model, config)
    try:
        extra = dict(opts.extra_config)
        if opts.correction:
            extra |= apply_correction(rt, opts.correction, opts.correction_scale)
        name, aliases = model_id_for(model, rt.path)
        engine = ServeEngine(rt, model_id=name, max_queue=opts.max_queue, config_extra=extra)
    except BaseException:
        rt.close()
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
