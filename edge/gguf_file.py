"""GGUF pre-flight validation and metadata: one reader for catalog, runtime and engine.

llama.cpp trusts the offsets in a GGUF header; a truncated or corrupt file can crash the
process. `inspect()` walks the whole header itself (gguf's GGUFReader builds a numpy view
per array element and trusts counts past the end of the file), bounds-checking every
count against the bytes left and skipping the vocabulary arrays, with gguf's constants and
its writer's struct table; it checks every tensor lies inside the file *before* llama.cpp
is handed the path.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
)

from edge.errors import InvalidModelFileError, ModelNotFoundError

FINGERPRINT_BYTES = 16 * 1024 * 1024


class _Corrupt(Exception):
    """Raised by the header walk; turned into InvalidModelFileError with the path."""


# struct format of each fixed-size value type: gguf's writer table, not a copy of it.
_STRUCT: dict[int, str] = dict(GGUFWriter._simple_value_packing)
# Arrays we only count, never decode (a Llama-3 vocab has 128k strings and 280k merges).
_SKIP_ARRAYS = {Keys.Tokenizer.LIST, Keys.Tokenizer.MERGES, Keys.Tokenizer.SCORES,
                Keys.Tokenizer.TOKEN_TYPE}


class _HeaderWalk:
    """A bounds-checked walk of a GGUF header over a memory map.

    gguf's GGUFReader builds a numpy view per array element (13 s for SmolLM2's header
    on a busy 2-core box) and trusts counts past EOF; this walk only decodes the keys
    edge needs, checks every count against the bytes left, and takes milliseconds.
    """

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def take(self, fmt: str, count: int = 1) -> tuple:
        n = struct.calcsize("<" + fmt) * count
        if count < 0 or self.pos + n > self.size:
            raise _Corrupt(f"header runs past the end of the file (byte {self.pos + n:,} of {self.size:,})")
        out = struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos)
        self.pos += n
        return out

    def need(self, count: int, min_size: int, what: str) -> None:
        if count * min_size > self.size - self.pos:
            raise _Corrupt(f"{what} count {count:,} cannot fit in a {self.size:,}-byte file")

    def string(self) -> str:
        (n,) = self.take("Q")
        self.need(n, 1, "string byte")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"a string at byte {self.pos - n:,} is not UTF-8") from e

    def value(self, vtype: int, keep: bool = True) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _STRUCT:
            return self.take(_STRUCT[vtype])[0]
        if vtype == GGUFValueType.ARRAY:
            item_type, length = self.take("I")[0], self.take("Q")[0]
            self.need(length, struct.calcsize(_STRUCT.get(item_type, "Q")), "array element")
            if item_type in _STRUCT:
                fmt = _STRUCT[item_type]
                if not keep:
                    self.pos += struct.calcsize(fmt) * length
                    return length
                return list(self.take(fmt, length))
            if item_type == GGUFValueType.STRING and not keep:
                for _ in range(length):
                    (n,) = self.take("Q")
                    self.need(n, 1, "string byte")
                    self.pos += n
                return length
            return [self.value(item_type, keep) for _ in range(length)]
        raise _Corrupt(f"unknown metadata value type {vtype} at byte {self.pos:,}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """What `edge models info` shows and what telemetry records about a model file."""

    path: str
    file_size: int
    arch: str
    name: str | None
    params: int
    quant: str
    context_length: int | None
    n_layers: int | None
    n_embd: int | None
    n_head: int | None
    n_head_kv: int | None
    n_ff: int | None
    n_vocab: int | None
    chat_template: str | None
    fingerprint: str  # sha256 of the first 16 MiB and the size: cheap identity for big files
    tensors: tuple[TensorInfo, ...] = field(repr=False, default=())
    n_merges: int | None = None  # BPE merge rules: llama.cpp's vocab memory grows with them
    # llama-quantize's record of an importance matrix (file, dataset, entries_count, chunks_count)
    imatrix: dict[str, Any] | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def summary(self) -> dict[str, Any]:
        """Plain dict for JSON output and telemetry (no tensor list, no template text)."""
        d = asdict(self)
        d.pop("tensors")
        d["chat_template"] = self.has_chat_template
        return d


def fingerprint(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
    h.update(str(size).encode())
    return h.hexdigest()


def _quant_name(ftype: Any, tensors: list[TensorInfo]) -> str:
    if ftype is not None:
        try:
            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No (known) file type: name the type holding most of the 2-D weights.
    counts = Counter(t.type for t in tensors if len(t.shape) > 1)
    return counts.most_common(1)[0][0] if counts else "unknown"


def _read(path: Path) -> ModelInfo:
    size = path.stat().st_size
    if size < 24:
        raise _Corrupt(f"it is only {size} bytes long, too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _walk(path, size, _HeaderWalk(buf))
        finally:
            buf.release()


def _walk(path: Path, size: int, w: _HeaderWalk) -> ModelInfo:
    magic, version = w.take("I", 2)
    if magic != GGUF_MAGIC:
        raise _Corrupt("it does not start with the GGUF magic bytes, so it is not a GGUF model")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors, n_kv = w.take("Q", 2)
    w.need(n_kv, 8 + 4 + 1, "metadata key")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = w.string()
        (vtype,) = w.take("I")
        keep = key not in _SKIP_ARRAYS
        meta[key] = w.value(vtype, keep)
        if not keep:
            meta[key] = int(meta[key]) if isinstance(meta[key], int) else len(meta[key])
    tensors = _tensors(w, n_tensors, int(meta.get(Keys.General.ALIGNMENT, 32)), size)
    return _model_info(path, size, meta, tensors)


def _tensors(w: _HeaderWalk, n_tensors: int, alignment: int, size: int) -> list[TensorInfo]:
    """The tensor table, each tensor checked to lie inside the file."""
    w.need(n_tensors, 8 + 4 + 4 + 8, "tensor")
    raw = []
    for _ in range(n_tensors):
        name = w.string()
        (n_dims,) = w.take("I")
        if n_dims > 4:
            raise _Corrupt(f"tensor {name} claims {n_dims} dimensions (at most 4)")
        dims = w.take("Q", n_dims)
        (ttype,) = w.take("I")
        (offset,) = w.take("Q")
        raw.append((name, dims, ttype, offset))
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"alignment {alignment} is not a power of two")
    data_start = -(-w.pos // alignment) * alignment
    tensors = []
    for name, dims, ttype, offset in raw:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name} has unknown type {ttype}") from None
        n = int(np.prod(dims, dtype=object)) if dims else 1
        if n % block:
            raise _Corrupt(f"tensor {name} has {n} elements, not a whole number of blocks")
        n_bytes = n // block * type_size
        if offset % alignment:
            raise _Corrupt(f"tensor {name} is not aligned to {alignment} bytes")
        end = data_start + offset + n_bytes
        if end > size:
            raise _Corrupt(
                f"tensor {name} ends at byte {end:,} but the file has {size:,} (truncated?)"
            )
        tensors.append(TensorInfo(name, qtype.name, tuple(int(d) for d in dims), n, n_bytes))
    if not tensors:
        raise _Corrupt("it holds no tensors")
    return tensors


IMATRIX_PREFIX = "quantize.imatrix."


def _model_info(path: Path, size: int, meta: dict[str, Any], tensors: list[TensorInfo]) -> ModelInfo:
    arch = meta.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise _Corrupt("general.architecture is missing")

    def hp(key: str) -> int | None:
        v = meta.get(key.format(arch=arch))
        if isinstance(v, list):  # per-layer arrays: report the first
            v = v[0] if v else None
        return int(v) if isinstance(v, (int, float)) else None

    template = meta.get(Keys.Tokenizer.CHAT_TEMPLATE)
    name = meta.get(Keys.General.NAME)
    return ModelInfo(
        path=str(path),
        file_size=size,
        arch=arch,
        name=name if isinstance(name, str) else None,
        params=sum(t.n_elements for t in tensors),
        quant=_quant_name(meta.get(Keys.General.FILE_TYPE), tensors),
        context_length=hp(Keys.LLM.CONTEXT_LENGTH),
        n_layers=hp(Keys.LLM.BLOCK_COUNT),
        n_embd=hp(Keys.LLM.EMBEDDING_LENGTH),
        n_head=hp(Keys.Attention.HEAD_COUNT),
        n_head_kv=hp(Keys.Attention.HEAD_COUNT_KV),
        n_ff=hp(Keys.LLM.FEED_FORWARD_LENGTH),
        n_vocab=meta.get(Keys.Tokenizer.LIST),
        chat_template=template if isinstance(template, str) else None,
        fingerprint=fingerprint(path),
        tensors=tuple(tensors),
        n_merges=meta.get(Keys.Tokenizer.MERGES),
        imatrix={k.removeprefix(IMATRIX_PREFIX): v for k, v in meta.items() if k.startswith(IMATRIX_PREFIX)}
        or None,
    )


@lru_cache(maxsize=16)
def _inspect_cached(path: str, size: int, mtime_ns: int) -> ModelInfo:
    try:
        return _read(Path(path))
    except _Corrupt as e:
        raise InvalidModelFileError(
            f"{path} is not a usable GGUF file: {e}. Re-download or re-convert it."
        ) from None


def inspect(path: str | os.PathLike[str]) -> ModelInfo:
    """Validate a GGUF file and return its metadata; raise InvalidModelFileError if corrupt."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise InvalidModelFileError(f"{p} is a directory, not a GGUF file")
    st = p.stat()
    return _inspect_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)
