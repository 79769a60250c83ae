"""One way to open a model for generation, used by run, chat, serve, eval, bench and bias.

MODEL (a path, a catalog name, or None for the bundled model) → the engine it needs: the
llama.cpp session (edge.runtime.Runtime), or edge's native engine when a sparsity profile
is given; then the optional correction vector (a llama.cpp control vector) and its scale.
"""

from __future__ import annotations

import os

from edge.catalog import resolve_model
from edge.errors import BadOptionError
from edge.generation import Generator
from edge.runtime import Runtime, RuntimeConfig


def open_runtime(model: str | os.PathLike[str] | None, config: RuntimeConfig | None = None, *,
                 correction: str | os.PathLike[str] | None = None,
                 correction_scale: float = 1.0) -> Runtime:
    """The llama.cpp session on MODEL, with the correction vector applied if given.

    Before llama.cpp loads anything, edge.memory checks that the session fits this device
    (InsufficientMemoryError otherwise; config.check_memory=False skips it, and sessions
    whose layers go to RPC workers are not checked here)."""
    config = config or RuntimeConfig()
    path = resolve_model(None if model is None else str(model))
    if config.check_memory and not config.rpc:
        from edge.memory.checks import check_load

        check_load(path, config)
    rt = Runtime(path, config)
    if correction:
        from edge.cvec import load_correction

        try:
            load_correction(rt, correction, correction_scale)
        except BaseException:
            rt.close()
            raise
    return rt


def open_session(model: str | os.PathLike[str] | None, config: RuntimeConfig | None = None, *,
                 engine: str | None = None, sparse_profile: str | os.PathLike[str] | None = None,
                 correction: str | os.PathLike[str] | None = None,
                 correction_scale: float = 1.0) -> Generator:
    """A Generator on MODEL: `engine` "llama" (llama.cpp) or "native" (edge's numpy engine);
    by default the native engine when a sparsity profile is given, llama.cpp otherwise. A
    profile made with `edge sparsify --weights q8|q4` runs on those quantized rows
    (edge.sparse.qgenerate), any other on the f32 engine (edge.engine.generate)."""
    config = config or RuntimeConfig()
    engine = engine or ("native" if sparse_profile is not None else "llama")
    if engine == "llama":
        if sparse_profile is not None:
            raise BadOptionError("--sparse-profile runs on edge's own engine; add --engine native")
        return open_runtime(model, config, correction=correction, correction_scale=correction_scale)
    for flag, used in (("--rpc", config.rpc), ("--correction", correction)):
        if used:
            raise BadOptionError(f"edge's native engine (--sparse-profile) cannot use {flag}; drop one")
    if sparse_profile is not None:
        from edge.sparse.profile import SparseProfile

        weights = SparseProfile.load(sparse_profile).weights
        if weights is not None:
            from edge.sparse.qgenerate import QuantizedGenerator

            return QuantizedGenerator.load(model, sparse_profile, threads=config.threads,
                                           n_ctx=config.n_ctx, weights=weights)
    from edge.engine.generate import NativeGenerator

    return NativeGenerator.load(model, sparse_profile, threads=config.threads, n_ctx=config.n_ctx)
