"""Importance matrices (llama.cpp's imatrix) for `edge quantize --imatrix`.

An importance matrix holds, for every weight matrix, the mean of x² per input channel over
a calibration text: the quantizer then spends its rounding error where the activations
are small. llama.cpp collects it with a graph-evaluation callback that sees each matrix
product's input; `collect_imatrix` does the same through llama-cpp-python, so it works on
any GGUF llama.cpp loads (a quantized 7B on a Pi included: no f32 copy is made).
Files are read and written in both of llama.cpp's formats (GGUF with `.in_sum2` and
`.counts` tensors, and the legacy `.dat`), so imatrices made by llama-imatrix work too.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BadOptionError, EdgeError
from edge.paths import atomic_path

MIN_ROWS = 16  # llama-imatrix ignores smaller products (single-token decodes)


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


@dataclass
class ImatrixResult:
    path: str
    model: str
    entries: int
    chunks: int
    chunk_size: int
    tokens: int
    seconds: float
    dataset: str
    interrupted: bool = False  # Ctrl-C: the chunks finished by then were written


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
        head = p.open("rb").read(4)
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

    def __init__(self, im: Imatrix) -> None:
        import llama_cpp

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


# ---- collection -----------------------------------------------------------------------
class _Tensor(ctypes.Structure):
    pass


# ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_NAME 64); the
# layout is checked against ggml's own accessors on the first tensor seen
_Tensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_Tensor) * 10), ("view_src", ctypes.POINTER(_Tensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _weight_name(raw: bytes) -> str:
    """`CUDA0#blk.0.attn_k.weight#0` → `blk.0.attn_k.weight` (as llama-imatrix filters)."""
    s = raw.decode("utf-8", "replace")
    if "#" in s:
        s = s.split("#")[1]
    return s


class _Collector:
    """The cb_eval callback: Σ x² of every weight product's input (src1), by weight name."""

    def __init__(self, include_output: bool) -> None:
        from edge.llamacpp import ggml_base

        lib = ggml_base()
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_nelements.restype = ctypes.c_int64
        lib.ggml_nelements.argtypes = [ctypes.c_void_p]
        self.lib, self.include_output = lib, include_output
        self.mul_mat = next(i for i in range(200) if lib.ggml_op_name(i) == b"MUL_MAT")
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self.checked = False

    def _check_layout(self, ptr: int, t: _Tensor) -> None:
        n = 1
        for d in t.ne:
            n *= d
        if t.name != (self.lib.ggml_get_name(ptr) or b"") or n != self.lib.ggml_nelements(ptr):
            raise ImatrixError("this llama.cpp's ggml_tensor layout differs from the one edge knows; "
                               "reinstall edge with its pinned llama-cpp-python")
        self.checked = True

    def __call__(self, ptr: int, ask: bool, _user: Any) -> bool:
        try:
            return self._on(ptr, ask)
        except BaseException as e:  # an exception must not cross into C: keep it, stop collecting
            self.error = self.error or e
            return not ask

    def _on(self, ptr: int, ask: bool) -> bool:
        t = ctypes.cast(ptr, ctypes.POINTER(_Tensor)).contents
        if not self.checked:
            self._check_layout(ptr, t)
        if t.op != self.mul_mat or not t.src[0] or not t.src[1]:
            return not ask
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = _weight_name(src0.name)
        wanted = name.startswith("blk.") or (self.include_output and name == "output.weight")
        if ask:
            return wanted and src1.ne[1] >= MIN_ROWS and src1.type == 0  # GGML_TYPE_F32
        ne0, rows = int(src1.ne[0]), int(src1.ne[1] * src1.ne[2] * src1.ne[3])
        if src1.nb[0] != 4 or src1.nb[2] != src1.nb[1] * src1.ne[1] or src1.nb[3] != src1.nb[2] * src1.ne[2]:
            raise ImatrixError(f"llama.cpp handed {name}'s input in a layout edge does not read")
        x = np.lib.stride_tricks.as_strided(
            np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_float)),
                                  shape=((rows - 1) * src1.nb[1] // 4 + ne0,)),
            shape=(rows, ne0), strides=(src1.nb[1], 4))
        sq = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        if name in self.sums:
            if self.sums[name].size != ne0:
                raise ImatrixError(f"{name} was used with inputs of two widths; edge cannot collect it")
            self.sums[name] += sq
            self.counts[name] += rows
        else:
            self.sums[name], self.counts[name] = sq, rows
        return True


def collect_imatrix(model: str | os.PathLike[str], text: str | Sequence[int], out: str | os.PathLike[str], *,
                    n_ctx: int = 512, max_chunks: int | None = None, threads: int | None = None,
                    include_output: bool = False, dataset: str = "", force: bool = False,
                    force_memory: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    check: Callable[[], None] | None = None) -> ImatrixResult:
    """Run `model` over `text` (a string, or token ids without BOS) in chunks of n_ctx
    tokens (each starting with BOS, as llama-imatrix does) and write the importance matrix to `out`. A KeyboardInterrupt from
    `check` after the first chunk writes the chunks finished so far (result.interrupted)."""
    import llama_cpp

    from edge.errors import OutputExistsError
    from edge.gguf_file import inspect
    from edge.llamacpp import (
        free_context,
        free_model,
        load_model,
        log_lines,
        model_vocab,
        new_context,
    )
    from edge.system import default_threads

    if n_ctx < MIN_ROWS * 2:
        raise BadOptionError(f"--ctx {n_ctx} is too small; use 512 (llama-imatrix's default) or at least 32")
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it or choose another -o")
    info = inspect(model)
    if not force_memory:  # refuse before loading, like run and bench
        from edge.memory import SessionParams, fit
        from edge.memory.checks import this_cpu

        fit(info, params=SessionParams(n_ctx=n_ctx, n_batch=n_ctx, process="resident"),
            cpu=this_cpu()).require(Path(info.path).name)
    t0 = time.perf_counter()
    col = _Collector(include_output)
    cb = llama_cpp.ggml_backend_sched_eval_callback(col)  # kept alive for the context's life
    with log_lines() as log:  # llama.cpp's chatter, kept for an error message only
        m = load_model(info.path)
        ctx = None
        batch = None
        try:
            vocab = model_vocab(m)
            if isinstance(text, str):
                raw = text.encode("utf-8")
                buf = (llama_cpp.llama_token * (len(raw) + 2))()
                n_tok = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
                tokens = list(buf[: max(n_tok, 0)])
            else:
                tokens = [int(t) for t in text]
            bos = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
            step = n_ctx - (1 if bos is not None else 0)
            n_chunks = len(tokens) // step
            if max_chunks:
                n_chunks = min(n_chunks, max_chunks)
            if n_chunks < 1:
                raise BadOptionError(f"the text is {len(tokens)} tokens; one chunk needs {step}: give a longer "
                                     f"text or a smaller --ctx")
            # one ubatch per chunk, and every row's logits: each product sees the whole chunk
            ctx = new_context(m, n_ctx=n_ctx, threads=threads or default_threads(), n_batch=n_ctx, cb_eval=cb)
            if not ctx:
                raise EdgeError(f"llama.cpp could not create a {n_ctx}-token context ({''.join(log[-1:]).strip()}); "
                                "free some memory or lower --ctx")
            mem = llama_cpp.llama_get_memory(ctx)
            batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            done, interrupted = 0, False
            for c in range(n_chunks):
                try:
                    if check:
                        check()
                except KeyboardInterrupt:
                    if done == 0:
                        raise
                    interrupted = True
                    break
                piece = ([bos] if bos is not None else []) + tokens[c * step : (c + 1) * step]
                n = len(piece)
                batch.n_tokens = n
                np.ctypeslib.as_array(batch.token, shape=(n,))[:] = piece
                np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(n, dtype=np.int32)
                np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = 1  # keep every row to the last layer
                np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
                for i in range(n):
                    batch.seq_id[i][0] = 0
                llama_cpp.llama_memory_clear(mem, True)
                rc = llama_cpp.llama_decode(ctx, batch)
                if col.error is not None:
                    raise col.error
                if rc != 0:
                    raise EdgeError(f"llama_decode failed (code {rc}) on chunk {c + 1}")
                done = c + 1
                if progress:
                    progress(done, n_chunks)
        finally:
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
            free_context(ctx)
            free_model(m)
    if not col.sums:
        raise ImatrixError(f"llama.cpp ran no weight product of {MIN_ROWS}+ rows on {Path(info.path).name}; "
                           "is it a transformer llama.cpp builds a graph for?")
    im = Imatrix({n: s.astype(np.float32) for n, s in col.sums.items()}, col.counts,
                 [dataset or "text"], done, n_ctx)
    write_imatrix(im, out)
    return ImatrixResult(path=str(out), model=str(info.path), entries=len(im.sums), chunks=done,
                         chunk_size=n_ctx, tokens=done * n_ctx, seconds=time.perf_counter() - t0,
                         dataset=dataset or "text", interrupted=interrupted)
