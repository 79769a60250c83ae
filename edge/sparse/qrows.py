"""Build the quantized row store of a model (and a profile's low-rank factors) from its GGUF.

Each projection W (out, in) is read from the GGUF, dequantized alone, transposed to one row
per input channel and block-quantized along the row (edge.sparse.qformat); its channel
norms c_j = ‖W[:, j]‖ (the R-Sparse mask's weights, as the profile was calibrated with)
are kept beside it. Only one tensor is ever in float32: a 7B model never needs its 27 GB
f32 copy. The token embeddings are stored per token (8-bit: only the rows of tokens seen
are read), the output layer as Wᵀ rows like the projections.

Files live in cache_dir()/qrows: the rows keyed by the model file and the format; a
profile's low-rank factors (8-bit, whatever the rows' format) keyed by model and profile.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import InvalidModelFileError, SparseProfileError
from edge.gguf_file import ModelInfo, inspect
from edge.paths import atomic_write, cache_dir
from edge.sparse.qformat import (
    Q8,
    RowFormat,
    dequantize_rows,
    output_scales,
    quantize_rows,
    row_format,
)
from edge.sparse.qstore import Layout, QRowsError, QStore, Writer, iter_chunks

FORMAT = "edge-qrows/2"  # /2: per-output scales on the projections (qformat)
Progress = Callable[[str, int, int], None]


@dataclass
class QRowsResult:
    """What building (or finding) a model's quantized rows produced and cost."""

    path: str
    lowrank_path: str | None
    weights: str
    output_weights: str
    nbytes: int  # the store's data (rows, scales, norms, embeddings, output)
    bits_per_weight: float  # over the projections (the rows the decode kernels skip)
    output_bits_per_weight: float
    worst_error: float  # largest relative RMS error of one tensor's rows
    worst_tensor: str
    seconds: float
    built: bool  # False when a cached file was used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_key(info: ModelInfo) -> str:
    """The fingerprint reads only the first 16 MiB: path, size and mtime go in the key too
    (as edge.dequant does), so two fine-tunes of one base do not share a store."""
    st = os.stat(info.path)
    ident = f"{info.fingerprint}|{Path(info.path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def rows_path(info: ModelInfo, weights: str, output_weights: str) -> Path:
    return cache_dir() / "qrows" / f"{Path(info.path).stem}.{model_key(info)}.{weights}-out{output_weights}.qrows"


def lowrank_path(info: ModelInfo, profile_sha: str) -> Path:
    return cache_dir() / "qrows" / f"{Path(info.path).stem}.{model_key(info)}.{profile_sha[:12]}.lowrank.qrows"


def file_sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Source:
    """A GGUF's tensors by name, dequantized to float32 one at a time."""

    def __init__(self, info: ModelInfo) -> None:
        from gguf import GGUFReader

        from edge.engine.weights import _tensor_keys, read_args

        if info.arch != "llama":
            raise InvalidModelFileError(
                f"{info.path} is a '{info.arch}' model; the native engine runs Llama-architecture GGUFs only")
        self.info = info
        reader = GGUFReader(info.path)
        self.args, self.rope_scale = read_args(reader, info)
        self.tensors = {t.name: t for t in reader.tensors}
        self.keys = _tensor_keys()

    def name(self, key: str, il: int | None = None) -> str:
        from gguf import MODEL_TENSOR, TENSOR_NAMES

        if il is not None:
            return self.keys[key].format(bid=il) + ".weight"
        return TENSOR_NAMES[getattr(MODEL_TENSOR, key)] + ".weight"

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise InvalidModelFileError(f"{self.info.path} has no tensor '{name}'; is it a complete Llama GGUF?")
        a = dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a.reshape([int(d) for d in reversed(t.shape)]), dtype=np.float32)


def _quantize_into(w: Writer, name: str, mat: np.ndarray, transposed: bool, fmt: RowFormat,
                   norms: bool) -> float:
    """Quantize the rows of `mat` (its columns when `transposed`: Wᵀ's rows out of W, no
    transposed copy) into `name` a chunk at a time; return the relative RMS error. The C
    kernels do it when they are built (~10× numpy, the same rounding: tests hold them
    equal), numpy otherwise."""
    from edge.sparse import qnative

    n_rows, n_cols = (mat.shape[1], mat.shape[0]) if transposed else mat.shape
    lib = qnative.library()
    if lib is None:
        return _quantize_numpy(w, name, mat, transposed, fmt, norms)
    from edge.system import default_threads

    e = w.layout.tensors[name]
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    rs, cs = (1, mat.shape[1]) if transposed else (mat.shape[1], 1)
    err = np.zeros(2, np.float64)
    for r0, r1 in iter_chunks(n_rows, n_cols, budget=1 << 24):
        buf = np.zeros((r1 - r0) * e["stride"], np.uint8)
        c = np.empty(r1 - r0, np.float32) if norms else None
        lib.edge_quantize(mat.ctypes.data + 4 * r0 * rs, rs, cs, r1 - r0, n_cols, fmt.code, e["n_blocks"],
                          e["row_bytes"], e["stride"], buf.ctypes.data,
                          c.ctypes.data if c is not None else None, err.ctypes.data, default_threads())
        w.raw(name, r0, buf, c)
    return float(np.sqrt(err[0] / err[1])) if err[1] else 0.0


def _quantize_numpy(w: Writer, name: str, mat: np.ndarray, transposed: bool, fmt: RowFormat,
                    norms: bool) -> float:
    n_rows, n_cols = (mat.shape[1], mat.shape[0]) if transposed else mat.shape
    err = tot = 0.0
    for r0, r1 in iter_chunks(n_rows, n_cols):
        a = np.ascontiguousarray(mat[:, r0:r1].T) if transposed else mat[r0:r1]
        q, d = quantize_rows(a, fmt)
        c = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64)).astype(np.float32) if norms else None
        w.rows(name, q, d, r0, c)
        back = dequantize_rows(q, d, fmt)[:, :n_cols]
        err += float(np.sum(np.square(back - a, dtype=np.float64)))
        tot += float(np.sum(np.square(a, dtype=np.float64)))
    return float(np.sqrt(err / tot)) if tot else 0.0


def _write_rows(src: _Source, out: Path, fmt: RowFormat, out_fmt: RowFormat,
                progress: Progress | None) -> dict[str, float]:
    from edge.engine.weights import LINEAR_NAMES

    a = src.args
    embd = src.get(src.name("TOKEN_EMBD"))  # (n_vocab, n_embd)
    out_name = src.name("OUTPUT")
    tied = not src.has(out_name)
    shapes = {m: src.tensors[src.name(m, 0)].shape for m in LINEAR_NAMES}  # GGUF order: (in, out)
    lay = Layout()
    for il in range(a.n_layers):
        for m in LINEAR_NAMES:
            n_in, n_out = (int(x) for x in shapes[m])
            lay.rows(f"blk.{il}.{m}", fmt, n_in, n_out, norms=True, out_scales=True)
        lay.f32(f"blk.{il}.attn_norm", (a.n_embd,))
        lay.f32(f"blk.{il}.ffn_norm", (a.n_embd,))
    lay.rows("token_embd", Q8, a.n_vocab, a.n_embd)
    lay.rows("output", out_fmt, a.n_embd, a.n_vocab)
    lay.f32("output_norm", (a.n_embd,))
    freqs = src.name("ROPE_FREQS")
    if src.has(freqs):
        lay.f32("rope_freqs", tuple(int(x) for x in src.tensors[freqs].shape))
    header = {"format": FORMAT, "model_fingerprint": src.info.fingerprint, "model": str(src.info.path),
              "weights": fmt.name, "output_weights": out_fmt.name, "args": asdict(a),
              "rope_freq_scale": src.rope_scale, "tied_output": tied}
    errors: dict[str, float] = {}
    total = a.n_layers * len(LINEAR_NAMES) + 2
    done = 0
    with atomic_write(out, "wb") as f:
        w = Writer(f, lay, header, reserve=64 * (len(lay.tensors) + 4))
        for il in range(a.n_layers):
            for m in LINEAR_NAMES:
                wm = src.get(src.name(m, il))  # (out, in); stored as Wᵀ rows
                name = f"blk.{il}.{m}"
                w.norms(name, np.sqrt(np.einsum("ij,ij->j", wm, wm, dtype=np.float64)))  # ‖W[:, j]‖
                sc = output_scales(wm)
                w.out_scales(name, sc)
                wm = wm / sc[:, None]
                errors[name] = _quantize_into(w, name, wm, True, fmt, norms=False)
                done += 1
                if progress:
                    progress("quantizing rows", done, total)
            w.f32(f"blk.{il}.attn_norm", src.get(src.name("attn_norm", il)))
            w.f32(f"blk.{il}.ffn_norm", src.get(src.name("ffn_norm", il)))
        errors["token_embd"] = _quantize_into(w, "token_embd", embd, False, Q8, norms=False)
        wo = embd if tied else src.get(out_name)
        errors["output"] = _quantize_into(w, "output", wo, True, out_fmt, norms=False)
        if progress:
            progress("quantizing rows", total, total)
        w.f32("output_norm", src.get(src.name("OUTPUT_NORM")))
        if src.has(freqs):
            w.f32("rope_freqs", src.get(freqs))
        w.finish(errors={k: round(v, 6) for k, v in errors.items()})
    return errors


def _write_lowrank(src: _Source, prof: Any, out: Path, progress: Progress | None) -> None:
    """A = V_r and B = S_r U_rᵀ of every module with rank r > 0, as 8-bit rows. B's columns
    are divided by the module's output scales, as its rows are: the kernels sum both into
    one accumulator and multiply the total by the scales."""
    from edge.sparse.svd import cache_path_for, max_rank

    svd_file = cache_path_for(src.info.path, src.info.fingerprint)
    cached = np.load(svd_file) if svd_file.is_file() else None  # the factors the search used
    mods = [m for m in prof.modules if m.r > 0]
    lay = Layout()
    for m in mods:
        n_in, n_out = (int(x) for x in src.tensors[src.name(m.name, m.layer)].shape)
        lay.rows(f"blk.{m.layer}.{m.name}.a", Q8, n_in, m.r)
        lay.rows(f"blk.{m.layer}.{m.name}.b", Q8, m.r, n_out)
    try:
        with atomic_write(out, "wb") as f:
            w = Writer(f, lay, {"format": FORMAT, "model_fingerprint": src.info.fingerprint, "lowrank": True})
            for i, m in enumerate(mods):
                key = f"{m.layer}.{m.name}"
                wm = src.get(src.name(m.name, m.layer))
                if cached is not None and f"{key}.a" in cached.files:
                    fa = cached[f"{key}.a"][:, : m.r].astype(np.float32)
                    fb = cached[f"{key}.b"][: m.r].astype(np.float32)
                else:  # the same factors svd.SvdCache computes, one tensor at a time
                    wt = np.ascontiguousarray(wm.T)
                    v, s, ut = np.linalg.svd(wt, full_matrices=False)
                    r = min(m.r, max_rank(*wt.shape))
                    fa = v[:, :r].astype(np.float16).astype(np.float32)
                    fb = (s[:r, None] * ut[:r]).astype(np.float16).astype(np.float32)
                fb = fb / output_scales(wm)[None, :]
                for name, fac in ((f"blk.{key}.a", fa), (f"blk.{key}.b", fb)):
                    q, d = quantize_rows(fac, Q8)
                    w.rows(name, q, d)
                if progress:
                    progress("low-rank factors", i + 1, len(mods))
    finally:
        if cached is not None:
            cached.close()


def load_profile(profile_path: str | os.PathLike[str], info: ModelInfo) -> Any:
    from edge.sparse.profile import SparseProfile

    prof = SparseProfile.load(profile_path)
    prof.check_fingerprint(info.fingerprint, profile_path)
    return prof


def build_qrows(model_path: str | os.PathLike[str], profile_path: str | os.PathLike[str] | None = None,
                *, weights: str = "q8", output_weights: str | None = None, force: bool = False,
                progress: Progress | None = None) -> QRowsResult:
    """The quantized rows of `model_path` in format `weights` (q8 | q4), and the low-rank
    factors of `profile_path` when it has any; built once into cache_dir()/qrows, reused
    after. `output_weights` is the output layer's format (default: q8, as llama.cpp keeps
    its output layer at ≥ 6 bits in Q4_0 files)."""
    t0 = time.perf_counter()
    fmt = row_format(weights)
    out_fmt = row_format(output_weights or "q8")
    info = inspect(model_path)
    prof = load_profile(profile_path, info) if profile_path is not None else None
    path = rows_path(info, fmt.name, out_fmt.name)
    built = False
    src: _Source | None = None
    if force or not _valid(path):
        src = _Source(info)
        _write_rows(src, path, fmt, out_fmt, progress)
        built = True
    lr_path = None
    if prof is not None and prof.needs_svd:
        lr_path = lowrank_path(info, file_sha256(profile_path))  # type: ignore[arg-type]
        if force or not _valid(lr_path):
            _write_lowrank(src or _Source(info), prof, lr_path, progress)
            built = True
    store = QStore(path)
    res = summarize(store, str(lr_path) if lr_path else None, time.perf_counter() - t0, built)
    store.close()
    return res


def _valid(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return QStore(path).header.get("format") == FORMAT
    except QRowsError:
        return False


def summarize(store: QStore, lr_path: str | None, seconds: float, built: bool) -> QRowsResult:
    h = store.header
    lin = [n for n in store.names if n.startswith("blk.")]

    def bits(names: list[str]) -> float:
        n_w = sum(store.entry(n)["n_rows"] * store.entry(n)["n_cols"] for n in names)
        return 8 * sum(store.nbytes(n) for n in names) / max(1, n_w)

    errors = h.get("errors", {})
    worst = max(errors, key=errors.get) if errors else ""
    return QRowsResult(path=str(store.path), lowrank_path=lr_path, weights=h["weights"],
                       output_weights=h["output_weights"], nbytes=int(h["data_size"]),
                       bits_per_weight=bits(lin), output_bits_per_weight=bits(["output"]),
                       worst_error=float(errors.get(worst, 0.0)), worst_tensor=worst,
                       seconds=seconds, built=built)


def check_profile_shape(prof: Any, store: QStore) -> None:
    a = store.header["args"]
    for m in prof.modules:
        if not (0 <= m.layer < a["n_layers"]) or f"blk.{m.layer}.{m.name}" not in store.ids:
            raise SparseProfileError(f"the profile names module {m.layer}.{m.name}, which this model lacks")
