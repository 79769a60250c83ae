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


def _file_mode() -> int:
    """What open() gives a new file: 0o666 less the umask (mkstemp's temp files are 0o600,
    which would leave a model or report unreadable to the other users of a shared board)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _file_mode())
    return fd, tmp


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds.

    A crash, Ctrl-C or full disk leaves no partial file at `path`. The file gets the mode
    open() would give it (the umask's), not the temp file's 0o600.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
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
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
