"""Collecting an importance matrix through llama.cpp itself (`edge imatrix`).

llama-imatrix's method: a graph-evaluation callback (cb_eval) sees every matrix product as
it is computed; for each one whose weight is a `blk.*` tensor and whose input has at least
MIN_ROWS rows it adds Σx² per input channel and the row count. It works on any GGUF
llama.cpp loads (a quantized 7B on a Pi included: no f32 copy is made).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BadOptionError, EdgeError
from edge.imatrix.files import Imatrix, ImatrixError, write_imatrix

MIN_ROWS = 16  # llama-imatrix ignores smaller products (single-token decodes)


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
        from edge.llamacpp import ggml_tensor_lib

        lib = ggml_tensor_lib()
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


def _tokens(vocab: Any, text: str | Sequence[int]) -> list[int]:
    import llama_cpp

    if not isinstance(text, str):
        return [int(t) for t in text]
    raw = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(raw) + 2))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
    return list(buf[: max(n, 0)])


class _Chunks:
    """A llama.cpp context that decodes one chunk per llama_decode with every row's logits
    requested (else llama.cpp drops rows before the last layer and its products see one)."""

    def __init__(self, model: Any, n_ctx: int, threads: int, cb: Any, log: list[str]) -> None:
        import llama_cpp

        from edge.llamacpp import new_context

        self.ctx = new_context(model, n_ctx=n_ctx, threads=threads, n_batch=n_ctx, cb_eval=cb)
        if not self.ctx:
            raise EdgeError(f"llama.cpp could not create a {n_ctx}-token context ({''.join(log[-1:]).strip()}); "
                            "free some memory or lower --ctx")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def decode(self, piece: list[int]) -> int:
        import llama_cpp

        b, n = self.batch, len(piece)
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = piece
        np.ctypeslib.as_array(b.pos, shape=(n,))[:] = np.arange(n, dtype=np.int32)
        np.ctypeslib.as_array(b.logits, shape=(n,))[:] = 1
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):
            b.seq_id[i][0] = 0
        llama_cpp.llama_memory_clear(self.mem, True)
        return int(llama_cpp.llama_decode(self.ctx, b))

    def close(self) -> None:
        import llama_cpp

        from edge.llamacpp import free_context

        llama_cpp.llama_batch_free(self.batch)
        free_context(self.ctx)


def _check_fit(info: Any, n_ctx: int) -> None:
    """Refuse before loading, as run and bench do (InsufficientMemoryError, exit 2)."""
    from edge.memory import SessionParams, fit
    from edge.memory.checks import this_cpu

    fit(info, params=SessionParams(n_ctx=n_ctx, n_batch=n_ctx, process="resident"),
        cpu=this_cpu()).require(Path(info.path).name)


def collect_imatrix(model: str | os.PathLike[str], text: str | Sequence[int], out: str | os.PathLike[str], *,
                    n_ctx: int = 512, max_chunks: int | None = None, threads: int | None = None,
                    include_output: bool = False, dataset: str = "", force: bool = False,
                    force_memory: bool = False, progress: Callable[[int, int], None] | None = None,
                    check: Callable[[], None] | None = None) -> ImatrixResult:
    """Run `model` over `text` (a string, or token ids without BOS) in chunks of n_ctx
    tokens, each starting with BOS as llama-imatrix does, and write the importance matrix
    to `out`. A KeyboardInterrupt from `check` after the first chunk writes the chunks
    finished so far (result.interrupted); before it, nothing is written."""
    import llama_cpp

    from edge.errors import OutputExistsError
    from edge.gguf_file import inspect
    from edge.llamacpp import free_model, load_model, log_lines, model_vocab
    from edge.system import default_threads

    if n_ctx < MIN_ROWS * 2:
        raise BadOptionError(f"--ctx {n_ctx} is too small; use 512 (llama-imatrix's default) or at least 32")
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it or choose another -o")
    info = inspect(model)
    if not force_memory:
        _check_fit(info, n_ctx)
    t0 = time.perf_counter()
    col = _Collector(include_output)
    cb = llama_cpp.ggml_backend_sched_eval_callback(col)  # kept alive for the context's life
    done, interrupted = 0, False
    with log_lines() as log:  # llama.cpp's chatter, kept for an error message only
        m = load_model(info.path)
        chunks = None
        try:
            vocab = model_vocab(m)
            tokens = _tokens(vocab, text)
            bos = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
            head = [] if bos is None else [bos]
            step = n_ctx - len(head)
            n_chunks = min(len(tokens) // step, max_chunks or len(tokens))
            if n_chunks < 1:
                raise BadOptionError(f"the text is {len(tokens)} tokens; one chunk needs {step}: give a longer "
                                     "text or a smaller --ctx")
            chunks = _Chunks(m, n_ctx, threads or default_threads(), cb, log)
            for c in range(n_chunks):
                try:
                    if check:
                        check()
                except KeyboardInterrupt:
                    if done == 0:
                        raise
                    interrupted = True
                    break
                rc = chunks.decode(head + tokens[c * step : (c + 1) * step])
                if col.error is not None:
                    raise col.error
                if rc != 0:
                    raise EdgeError(f"llama_decode failed (code {rc}) on chunk {c + 1}")
                done = c + 1
                if progress:
                    progress(done, n_chunks)
        finally:
            if chunks is not None:
                chunks.close()
            free_model(m)
    if not col.sums:
        raise ImatrixError(f"llama.cpp ran no weight product of {MIN_ROWS}+ rows on {Path(info.path).name}; "
                           "is it a transformer llama.cpp builds a graph for?")
    write_imatrix(Imatrix({n: s.astype(np.float32) for n, s in col.sums.items()}, col.counts,
                          [dataset or "text"], done, n_ctx), out)
    return ImatrixResult(path=str(out), model=str(info.path), entries=len(col.sums), chunks=done,
                         chunk_size=n_ctx, tokens=done * n_ctx, seconds=time.perf_counter() - t0,
                         dataset=dataset or "text", interrupted=interrupted)
