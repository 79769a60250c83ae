"""Where edge keeps its state: $EDGE_HOME (default ~/.local/share/edge)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def edge_home() -> Path:
    env = os.environ.get("EDGE_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "edge"


def cache_dir() -> Path:
    """Derived files that can be rebuilt (f16 copies, SVDs): $EDGE_CACHE, else under
    $EDGE_HOME when that is set, else the XDG cache folder."""
    env = os.environ.get("EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("EDGE_HOME"):
        return edge_home() / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edge"


def logs_dir() -> Path:
    return edge_home() / "logs"


def models_dir() -> Path:
    return edge_home() / "models"


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds.

    A crash, Ctrl-C or full disk leaves no partial file at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like atomic_write, for writers that need a file *name* (e.g. a C library).

    Yields a temp path beside `path`; renames it over `path` only if the block succeeds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
