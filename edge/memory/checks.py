"""The fit checks commands run: before a download (pull) and before llama.cpp loads a model.

Both raise InsufficientMemoryError with one line (needed, available, the largest context
that would fit) unless forced; the CLI turns it into exit 2. Nothing here downloads or
loads anything before the verdict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.catalog import CatalogEntry, ProgressFn, get_entry, load_catalog, pull
from edge.memory.cpu import CpuFeatures
from edge.memory.estimate import SessionParams
from edge.memory.fit import FitVerdict, MemorySnapshot, fit

_cpu: CpuFeatures | None = None


def this_cpu() -> CpuFeatures:
    """CpuFeatures.detect(), once per process (it asks llama.cpp for its build flags)."""
    global _cpu
    if _cpu is None:
        _cpu = CpuFeatures.detect()
    return _cpu


def check_load(model: str | os.PathLike[str], config: Any, *, force: bool = False,
               memory: MemorySnapshot | None = None) -> FitVerdict:
    """Refuse a session (RuntimeConfig `config`) on the GGUF at `model` that would swap or
    run out of memory here. Checked from the running process, whose own memory MemAvailable
    already leaves out."""
    params = SessionParams.from_config(config, process="resident")
    verdict = fit(model, params=params, cpu=this_cpu(), memory=memory)
    verdict.require(Path(model).name, force=force)
    return verdict


@dataclass(frozen=True)
class PullResult:
    path: Path
    digest: str
    verdict: FitVerdict


def pull_checked(name: str, *, force: bool = False, progress: ProgressFn | None = None,
                 memory: MemorySnapshot | None = None, n_ctx: int = 2048) -> PullResult:
    """`edge models pull`: the memory verdict at --ctx n_ctx first (from the catalog's shape,
    or its size), then the download, only when it fits or `force`."""
    entry = get_entry(name)
    verdict = fit(entry, params=SessionParams(n_ctx=n_ctx), cpu=this_cpu(), memory=memory)
    verdict.require(name, force=force)
    path, digest = pull(name, progress=progress)
    return PullResult(path, digest, verdict)


def catalog_fits(memory: MemorySnapshot | None = None, n_ctx: int = 2048) -> dict[str, FitVerdict]:
    """Every catalog entry's verdict at --ctx n_ctx on this device (the file when it is here)."""
    mem = memory or MemorySnapshot.read()
    out = {}
    for name, entry in load_catalog().items():
        target: CatalogEntry | Path = entry.local_path if entry.available else entry
        out[name] = fit(target, params=SessionParams(n_ctx=n_ctx), cpu=this_cpu(), memory=mem)
    return out
