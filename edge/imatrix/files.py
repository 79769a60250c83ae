"""Importance-matrix files: llama.cpp's GGUF format (`.in_sum2` / `.counts` tensors)
written and read, its legacy `.dat` read, and the C array llama_model_quantize takes."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.paths import atomic_path


class ImatrixError(EdgeError):
    """The importance matrix file cannot be read or does not fit the model."""


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # tensor name → Σ x² per input channel
    counts: dict[str, int]  # tensor name → rows (tokens) summed
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self) -> dict[str, np.ndarray]:
        """The mean x² per input channel: what llama.cpp's quantizer weighs rounding by."""
        return {n: (s / self.counts[n]).astype(np.float32) if self.counts[n] > 0 else np.ones_like(s, np.float32)
                for n, s in self.sums.items()}


# ---- files ----------------------------------------------------------------------------
def write_imatrix(im: Imatrix, path: str | os.PathLike[str]) -> None:
    """llama.cpp's GGUF imatrix: `<tensor>.in_sum2` (1, n_in) and `<tensor>.counts` (1, 1)."""
    from gguf import GGUFWriter, Keys

    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), arch="imatrix")
        w.add_type("imatrix")
        w.add_array(Keys.IMatrix.DATASETS, im.datasets or [""])
        w.add_uint32(Keys.IMatrix.CHUNK_COUNT, im.chunk_count)
        w.add_uint32(Keys.IMatrix.CHUNK_SIZE, im.chunk_size)
        for name in sorted(im.sums):
            w.add_tensor(name + ".in_sum2", np.asarray(im.sums[name], dtype=np.float32)[None, :])
            w.add_tensor(name + ".counts", np.array([[im.counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Either of llama.cpp's formats; raises ImatrixError with what to do."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ImatrixError(f"cannot read the importance matrix {p} ({e.strerror})") from None
    return _read_gguf(p) if head == b"GGUF" else _read_legacy(p)


def _read_gguf(p: Path) -> Imatrix:
    from gguf import GGUFReader, Keys

    try:
        r = GGUFReader(str(p))
    except (ValueError, OSError) as e:
        raise ImatrixError(f"{p} is not a readable GGUF imatrix ({e}); make one with `edge imatrix`") from None

    def scalar(key: str) -> int:
        f = r.fields.get(key)
        return int(f.contents()) if f is not None else 0

    ds = r.fields.get(Keys.IMatrix.DATASETS)
    im = Imatrix({}, {}, list(ds.contents()) if ds is not None else [],
                 scalar(Keys.IMatrix.CHUNK_COUNT), scalar(Keys.IMatrix.CHUNK_SIZE))
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            im.sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    if not im.sums:
        raise ImatrixError(f"{p} holds no `.in_sum2` tensors: it is not an importance matrix")
    for name in list(im.sums):
        c = counts.get(name)
        if c is None or c.size != 1:  # several counts: a MoE's per-expert matrices
            raise ImatrixError(f"{p}: {name} has {0 if c is None else c.size} counts; edge reads dense "
                               "models' imatrices (one count per tensor)")
        im.counts[name] = int(c[0])
    return im


def _read_legacy(p: Path) -> Imatrix:
    """llama-imatrix's `.dat`: entries of (name, ncall, values = mean·ncall), then chunks and dataset."""
    data = p.read_bytes()
    bad = ImatrixError(f"{p} is neither a GGUF nor a legacy .dat importance matrix; make one with `edge imatrix`")
    try:
        (n,), at = struct.unpack_from("<i", data, 0), 4
        if not 0 < n < 1_000_000:
            raise bad
        im = Imatrix({}, {})
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, at)
            name = data[at + 4 : at + 4 + ln].decode("utf-8")
            at += 4 + ln
            ncall, nval = struct.unpack_from("<ii", data, at)
            at += 8
            if nval < 1 or at + 4 * nval > len(data):
                raise bad
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=at).astype(np.float64)
            at += 4 * nval
            # stored as mean·ncall: keep (sum, count) = (stored, ncall) so values() gives the mean
            im.sums[name], im.counts[name] = vals, max(ncall, 0)
            if ncall <= 0:  # llama.cpp then uses the stored values as they are
                im.counts[name] = 1
        if at + 8 <= len(data):
            im.chunk_count, ln = struct.unpack_from("<ii", data, at)
            if ln > 0:
                im.datasets = [data[at + 8 : at + 8 + ln].decode("utf-8", "replace")]
    except (struct.error, UnicodeDecodeError):
        raise bad from None
    return im


# ---- quantize's view ------------------------------------------------------------------
class QuantizeImatrix:
    """The NULL-terminated llama_model_imatrix_data array llama_model_quantize reads; the
    buffers it points into live as long as this object."""

    def __init__(self, im: Imatrix, file: str = "") -> None:
        import llama_cpp

        self.im, self.file = im, file
        vals = im.values()
        bad = [n for n, v in vals.items() if not np.all(np.isfinite(v))]
        if bad:
            raise ImatrixError(f"the importance matrix has non-finite values for {bad[0]}; make it again")
        self._names = [n.encode() for n in vals]
        self._bufs = [np.ascontiguousarray(v, dtype=np.float32) for v in vals.values()]
        arr = (llama_cpp.llama_model_imatrix_data * (len(vals) + 1))()
        for i, (name, buf) in enumerate(zip(self._names, self._bufs, strict=True)):
            arr[i].name = name
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(vals)].name = None  # the terminator
        self.array = arr
        self.entries = len(vals)
        self.metadata = self._metadata()

    def _metadata(self) -> ctypes.Array:
        """llama-quantize's record of the imatrix in the output GGUF (`quantize.imatrix.*`),
        as llama_model_kv_override entries ending with an empty key."""
        import llama_cpp

        kv: list[tuple[str, object]] = [("quantize.imatrix.file", self.file)]
        if self.im.datasets:
            kv.append(("quantize.imatrix.dataset", self.im.datasets[0]))
        kv.append(("quantize.imatrix.entries_count", self.entries))
        if self.im.chunk_count > 0:
            kv.append(("quantize.imatrix.chunks_count", self.im.chunk_count))
        arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for o, (key, val) in zip(arr, kv, strict=False):
            o.key = key.encode()
            if isinstance(val, str):
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                o.value.val_str = val.encode()[:127]
            else:
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                o.value.val_i64 = int(val)  # type: ignore[call-overload]
        return arr  # the last entry's key is empty: the terminator

    def check(self, shapes: dict[str, int]) -> None:
        """Each entry must match its tensor's input width (shapes: name → n_in)."""
        for name, buf in zip(self._names, self._bufs, strict=True):
            n_in = shapes.get(name.decode())
            if n_in is not None and n_in != buf.size:
                raise ImatrixError(
                    f"the importance matrix's {name.decode()} has {buf.size} values but the tensor takes "
                    f"{n_in} inputs: it was made for another model; make one for this model with `edge imatrix`")
        if not any(name.decode() in shapes for name in self._names):
            raise ImatrixError("no tensor of this model is in the importance matrix: it was made for "
                               "another model; make one with `edge imatrix`")
