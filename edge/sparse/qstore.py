"""The container of quantized rows: one file, a JSON header, 64-byte aligned sections,
memory-mapped when read, so pages come from the page cache and RSS holds what was touched.

    b"EDGEQRW1" | u64 header length | header JSON | zero padding to 64 | data

The header lists every tensor: quantized row matrices (values, float16 scales and, for
the model's projections, float32 channel norms) and plain float32 arrays. `QStore` gives
the kernels one flat buffer in three views and the matrix table (edge.sparse.qkernels).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edge.errors import EdgeError
from edge.sparse.qformat import BLOCK, FORMATS, RowFormat, padded

MAGIC = b"EDGEQRW1"
ALIGN = 64
# columns of the matrix table the kernels read (QStore.mats); SOFF is -1 when the matrix
# has no per-output scales
FMT, NROWS, NCOLS, OFF, STRIDE, ROWB, NBLK, COFF, SOFF = range(9)
NCOL = 9


class QRowsError(EdgeError):
    """A quantized-rows file is missing, truncated or from another version."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Layout:
    """Where each tensor goes, planned before any data is written."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: int = 0

    def _take(self, nbytes: int) -> int:
        off = self.size
        self.size = _align(off + nbytes)
        return off

    def rows(self, name: str, fmt: RowFormat, n_rows: int, n_cols: int, norms: bool = False,
             out_scales: bool = False) -> None:
        """`norms`: float32 per row (the mask's channel norms); `out_scales`: float32 per
        column (padded) that the kernels multiply each finished output by (qformat)."""
        n = padded(n_cols)
        rb, nb = fmt.row_bytes(n), n // BLOCK
        stride = rb + 2 * nb  # a row is its values then its scales: one contiguous run
        e = {"kind": "rows", "fmt": fmt.name, "n_rows": n_rows, "n_cols": n_cols, "row_bytes": rb,
             "n_blocks": nb, "stride": stride, "off": self._take(n_rows * stride)}
        if norms:
            e["c_off"] = self._take(n_rows * 4)
        if out_scales:
            e["s_off"] = self._take(n * 4)
        self.tensors[name] = e

    def f32(self, name: str, shape: tuple[int, ...]) -> None:
        self.tensors[name] = {"kind": "f32", "shape": list(shape),
                              "off": self._take(int(np.prod(shape)) * 4)}


class Writer:
    """Writes a planned layout's sections in any order to an open binary file."""

    def __init__(self, f: BinaryIO, layout: Layout, header: dict[str, Any], reserve: int = 0) -> None:
        self.f, self.layout = f, layout
        self.header = {**header, "tensors": layout.tensors, "data_size": layout.size}
        # `reserve` spare bytes (JSON whitespace) let finish() add figures known only at the end
        blob = json.dumps(self.header).encode() + b" " * reserve
        self.header_len = len(blob)
        self.data_start = _align(len(MAGIC) + 8 + len(blob))
        f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
        f.seek(self.data_start + layout.size - 1)  # the final size from the start (sparse)
        f.write(b"\0")

    def finish(self, **extra: Any) -> None:
        """Rewrite the header with `extra` fields, inside the space reserved for them."""
        blob = json.dumps({**self.header, **extra}).encode()
        if len(blob) > self.header_len:
            raise ValueError("the header outgrew its reserved space")
        self.f.seek(len(MAGIC) + 8)
        self.f.write(blob + b" " * (self.header_len - len(blob)))

    def _put(self, off: int, a: np.ndarray) -> None:
        self.f.seek(self.data_start + off)
        self.f.write(np.ascontiguousarray(a).tobytes())

    def rows(self, name: str, q: np.ndarray, d: np.ndarray, row0: int = 0,
             norms: np.ndarray | None = None) -> None:
        """Rows [row0, row0 + len(q)) of matrix `name` (from qformat.quantize_rows)."""
        e = self.layout.tensors[name]
        both = np.concatenate([q.view(np.uint8), d.view(np.uint8)], axis=1)
        self._put(e["off"] + row0 * e["stride"], both)
        if norms is not None:
            self._put(e["c_off"] + row0 * 4, norms.astype(np.float32))

    def raw(self, name: str, row0: int, rows: np.ndarray, norms: np.ndarray | None = None) -> None:
        """Rows already in the store's layout (values then scales, `stride` bytes each)."""
        e = self.layout.tensors[name]
        self._put(e["off"] + row0 * e["stride"], rows)
        if norms is not None:
            self._put(e["c_off"] + row0 * 4, norms.astype(np.float32))

    def f32(self, name: str, a: np.ndarray) -> None:
        self._put(self.layout.tensors[name]["off"], np.asarray(a, dtype=np.float32))

    def norms(self, name: str, c: np.ndarray) -> None:
        self._put(self.layout.tensors[name]["c_off"], np.asarray(c, dtype=np.float32))

    def out_scales(self, name: str, s: np.ndarray) -> None:
        """Per-column output scales, padded with ones to the stored column count."""
        e = self.layout.tensors[name]
        full = np.ones(padded(e["n_cols"]), np.float32)
        full[: len(s)] = s
        self._put(e["s_off"], full)


class QStore:
    """A quantized-rows file opened read-only: views for the kernels, arrays by name."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, buffer: Any = None,
                 header: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if buffer is None:
            self.header, buffer = _open(self.path)  # type: ignore[arg-type]
        else:
            self.header = header or {}
        self._buf = buffer
        self.u8 = np.frombuffer(buffer, dtype=np.uint8)
        self.i8 = self.u8.view(np.int8)
        self.u16 = self.u8.view(np.uint16)
        self.f32 = self.u8.view(np.float32)
        t = self.header["tensors"]
        self.names = [n for n, e in t.items() if e["kind"] == "rows"]
        self.ids = {n: i for i, n in enumerate(self.names)}
        table = []
        for n in self.names:
            e = t[n]
            table.append([FORMATS[e["fmt"]].code, e["n_rows"], padded(e["n_cols"]), e["off"],
                          e["stride"], e["row_bytes"], e["n_blocks"], e.get("c_off", 0) // 4,
                          e["s_off"] // 4 if "s_off" in e else -1])
        self.mats = np.array(table, dtype=np.int64).reshape(-1, NCOL)

    def entry(self, name: str) -> dict[str, Any]:
        e = self.header["tensors"].get(name)
        if e is None:
            raise QRowsError(f"{self.path} has no tensor '{name}'; rebuild it (delete the file)")
        return e

    def array(self, name: str) -> np.ndarray:
        """A float32 tensor (a view into the map)."""
        e = self.entry(name)
        n = int(np.prod(e["shape"]))
        return self.f32[e["off"] // 4 : e["off"] // 4 + n].reshape(e["shape"])

    def f32_offset(self, name: str) -> int:
        return self.entry(name)["off"] // 4

    def matrix(self, name: str) -> tuple[np.ndarray, np.ndarray, RowFormat]:
        """(values (n_rows, row_bytes), scales (n_rows, n_blocks) uint16, format) views."""
        e = self.entry(name)
        fmt = FORMATS[e["fmt"]]
        n, rb, st = e["n_rows"], e["row_bytes"], e["stride"]
        rows = self.u8[e["off"] : e["off"] + n * st].reshape(n, st)
        q, d = rows[:, :rb], rows[:, rb:].view(np.uint16)
        return (q.view(np.int8) if fmt.bits == 8 else q), d, fmt

    def norms(self, name: str) -> np.ndarray:
        e = self.entry(name)
        return self.f32[e["c_off"] // 4 : e["c_off"] // 4 + e["n_rows"]]

    def out_scales(self, name: str) -> np.ndarray | None:
        """The per-output scales (padded length), or None when the matrix has none."""
        e = self.entry(name)
        if "s_off" not in e:
            return None
        return self.f32[e["s_off"] // 4 : e["s_off"] // 4 + padded(e["n_cols"])]

    def nbytes(self, name: str) -> int:
        e = self.entry(name)
        return e["n_rows"] * e["stride"]

    def close(self) -> None:
        # views keep the map alive; dropping ours lets it close when the last one goes
        self.u8 = self.i8 = self.u16 = self.f32 = None  # type: ignore[assignment]
        self._buf = None


def _open(path: Path) -> tuple[dict[str, Any], Any]:
    if not path.is_file():
        raise QRowsError(f"no quantized rows at {path}; build them with `edge sparsify --weights`")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise QRowsError(f"{path} is not an edge quantized-rows file; delete it to rebuild")
        (n,) = struct.unpack("<Q", head[len(MAGIC) :])
        size = os.fstat(f.fileno()).st_size
        try:
            if n > size:  # a length read from a damaged file is not trusted
                raise ValueError
            header = json.loads(f.read(n))
        except ValueError:
            raise QRowsError(f"{path} has a corrupt header; delete it to rebuild") from None
        start = _align(len(MAGIC) + 8 + n)
        if size < start + header.get("data_size", 0):
            raise QRowsError(f"{path} is truncated ({size} bytes); delete it to rebuild")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the file object
    return header, memoryview(mm)[start : start + header["data_size"]]


def in_memory(layout: Layout, header: dict[str, Any], fill) -> QStore:
    """Build a store in RAM (tests, small factors): `fill(writer)` writes the sections."""
    import io

    bio = io.BytesIO()
    w = Writer(bio, layout, header)
    fill(w)
    raw = bio.getbuffer()
    hdr = json.loads(bytes(raw[len(MAGIC) + 8 : len(MAGIC) + 8 + struct.unpack("<Q", raw[8:16])[0]]))
    # immutable bytes: read-only views, the same compiled kernels as a memory-mapped file
    return QStore(buffer=bytes(raw[w.data_start : w.data_start + layout.size]), header=hdr)


def iter_chunks(n_rows: int, n_cols: int, budget: int = 1 << 22) -> Iterator[tuple[int, int]]:
    """Row ranges with at most ~budget values each (bounded temporaries while quantizing)."""
    step = max(1, budget // max(1, n_cols))
    for r in range(0, n_rows, step):
        yield r, min(n_rows, r + step)
