"""An f16 copy of a quantized model's weights, for work that reads many logits.

On CPUs where llama.cpp has no batched kernel for a quant type (Q4_1 on AVX2 goes through
per-row dot products, while F16 uses the tiled sgemm), prompt processing of the same
weights in f16 is ~1.7-2.4× faster here. The copy holds the dequantized values rounded to
f16 (≤ 2^-11 of each tensor's range), and its kernels keep activations in f16 instead of
8 bits, so it scores the model's weights more precisely, not a different model. It costs
2 bytes per parameter of disk and RAM, so `auto` uses it only for small models.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge.errors import BadOptionError, EdgeError
from edge.gguf_file import ModelInfo, inspect
from edge.paths import cache_dir

PRECISIONS = ("auto", "file", "f16")
AUTO_MAX_BYTES = 1 << 30  # auto makes copies up to 1 GiB (~500M parameters)
FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class Compute:
    """Which weights a scoring run computes with."""

    precision: str   # "file" or "f16", after `auto` is resolved
    path: Path       # the GGUF that llama.cpp loads for scoring
    source: Path     # the model file the user named
    source_type: str  # its main weight type, e.g. Q4_1

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.precision, "path": str(self.path), "source_type": self.source_type}


def _main_type(info: ModelInfo) -> str:
    """The type holding most matrix weights (1-D norms are F32 in every file)."""
    sizes: dict[str, int] = {}
    for t in info.tensors:
        if len(t.shape) >= 2:
            sizes[t.type] = sizes.get(t.type, 0) + t.n_elements
    return max(sizes, key=sizes.__getitem__) if sizes else "F32"


def cache_path(info: ModelInfo) -> Path:
    """Where the copy of this file's weights lives. The fingerprint reads only the first
    16 MiB, so two fine-tunes of one base could share it: path and mtime go in the key too."""
    st = os.stat(info.path)
    ident = f"{info.fingerprint}|{Path(info.path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return cache_dir() / "f16" / f"{Path(info.path).stem}.{key}.f16.gguf"


def _info(model: str | os.PathLike[str] | ModelInfo) -> ModelInfo:
    # a loaded Runtime already has its ModelInfo: inspect() would hash 16 MiB again
    return model if isinstance(model, ModelInfo) else inspect(model)


def f16_copy(model: str | os.PathLike[str] | ModelInfo, *, threads: int | None = None) -> Path:
    """The cached f16 copy of `model`'s weights, made on first use (atomically)."""
    from edge.quantize import quantize

    info = _info(model)
    out = cache_path(info)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    need = 2 * (info.params or 0) + (64 << 20)
    free = shutil.disk_usage(out.parent).free
    hint = "free some disk space, set EDGE_CACHE to a roomier folder, or pass --precision file"
    if free < need:
        raise EdgeError(f"the f16 copy of {Path(info.path).name} needs {need / 2**30:.2f} GiB in "
                        f"{out.parent} but {free / 2**30:.2f} GiB is free; {hint}")
    try:
        quantize(info.path, out, qtype="F16", pure=True, threads=threads)
    except EdgeError as e:  # quantize's own advice is about quant types, not this
        raise EdgeError(f"could not write the f16 copy of {Path(info.path).name} to {out.parent} "
                        f"({e}); {hint}") from e
    return out


def resolve_compute(model: str | os.PathLike[str] | ModelInfo, precision: str = "auto", *,
                    threads: int | None = None, auto_max_bytes: int = AUTO_MAX_BYTES) -> Compute:
    """Pick the weights to score with. `auto`: an f16 copy of a quantized model whose copy
    takes ≤ auto_max_bytes; the file itself otherwise (a 7B on a Pi stays as it is)."""
    if precision not in PRECISIONS:
        raise BadOptionError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    info = _info(model)
    main = _main_type(info)
    src = Path(info.path)
    if precision == "auto":
        small = (info.params or 0) * 2 <= auto_max_bytes
        precision = "f16" if main not in FLOAT_TYPES and small else "file"
    if precision == "file" or main == "F16":
        return Compute("file", src, src, main)
    return Compute("f16", f16_copy(info, threads=threads), src, main)
