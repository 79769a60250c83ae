"""llama.cpp's C API, the parts edge uses in several places: one definition each.

Opening a model (after the host check), creating a context, applying a control vector,
a token's text piece and the end-of-generation test. The session (edge.runtime), the
batch scorer and sampler (bias), the benchmark contexts and the native engine's tokenizer
all come through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from edge.errors import InvalidModelFileError

FLASH_ATTN_AUTO = -1  # LLAMA_FLASH_ATTN_TYPE_AUTO
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


def ggml_type(name: str) -> int:
    """GGML_TYPE_* of a KV cache type name (one of KV_CACHE_TYPES)."""
    import llama_cpp

    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


def open_llama(path: str | os.PathLike[str], *, repack: bool = True, **params: Any) -> Any:
    """llama-cpp-python's Llama on `path`, once the host check says llama.cpp runs here.

    repack=False turns off llama.cpp's extra buffer types (the interleaved weight copies
    that stay resident beside the mapped file): less memory, slower matmuls on some CPUs.
    """
    import llama_cpp

    from edge.hostcheck import ensure_llama_works

    ensure_llama_works()  # a library that traps on this CPU fails here, in one line
    with model_params(use_extra_bufts=repack):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **params)


_params_lock = threading.Lock()


@contextlib.contextmanager
def model_params(**fields: Any) -> Iterator[None]:
    """Set llama_model_params fields llama-cpp-python's Llama() has no argument for: the
    default params it starts from are patched while the model loads (as edge.rpc does for
    devices; that patch, when active, is the one wrapped here)."""
    import llama_cpp.llama_cpp as C

    if all(getattr(C.llama_model_default_params(), k) == v for k, v in fields.items()):
        yield
        return
    with _params_lock:
        original = C.llama_model_default_params

        def params() -> Any:
            p = original()
            for k, v in fields.items():
                setattr(p, k, v)
            return p

        C.llama_model_default_params = params
        try:
            yield
        finally:
            C.llama_model_default_params = original


def load_model(path: str | os.PathLike[str], *, vocab_only: bool = False, use_mmap: bool = True,
               use_mlock: bool = False, repack: bool = True) -> Any:
    """A bare llama_model (no context): another file of a loaded model, or a vocabulary.
    repack as in open_llama (llama.cpp's extra buffer types)."""
    import llama_cpp

    if not vocab_only:
        from edge.hostcheck import ensure_llama_works

        ensure_llama_works()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = vocab_only
    mp.use_mmap, mp.use_mlock, mp.use_extra_bufts = use_mmap, use_mlock, repack
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise InvalidModelFileError(f"llama.cpp could not load {path}; check it is a GGUF this "
                                    "llama.cpp supports, and that there is enough memory")
    return model


def free_model(model: Any) -> None:
    import llama_cpp

    if model:
        llama_cpp.llama_model_free(model)


def new_context(model: Any, *, n_ctx: int, threads: int, n_batch: int = 512,
                n_ubatch: int | None = None, n_seq: int = 1, kv_unified: bool = False,
                flash_attn: int = 0, perf: bool = False, type_k: str = "f16", type_v: str = "f16",
                cb_eval: Any = None) -> Any:
    """A context on a loaded model, or None when llama.cpp cannot make it (memory).

    flash_attn 0 (off) is what the Runtime and the scorer use: on the CPU, flash attention
    shifts log-probs by up to 0.5 nats; FLASH_ATTN_AUTO is llama-bench's default.
    cb_eval: a ggml_backend_sched_eval_callback that sees every graph tensor (edge.hidden
    reads each layer's output through it); the caller keeps it alive.
    """
    import llama_cpp

    p = llama_cpp.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_ubatch = min(n_ubatch or n_batch, n_batch)
    p.n_seq_max = n_seq
    p.kv_unified = kv_unified  # one cell stream: a cell can belong to many sequences
    p.flash_attn_type = flash_attn
    p.type_k, p.type_v = ggml_type(type_k), ggml_type(type_v)
    p.n_threads = p.n_threads_batch = threads
    p.no_perf = not perf
    if cb_eval is not None:
        p.cb_eval = cb_eval
        p.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, p)
    return ctx or None


def free_context(ctx: Any) -> None:
    import llama_cpp

    if ctx:
        llama_cpp.llama_free(ctx)


def set_control_vector(ctx: Any, matrix: np.ndarray | None, n_layers: int, n_embd: int) -> np.ndarray | None:
    """Add matrix[il] to the residual stream after layer il (il ≥ 1; row 0 is ignored, as
    in llama.cpp); None clears it. Returns the buffer llama.cpp reads: keep it alive."""
    import llama_cpp

    if matrix is None:
        rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, 0, 0)
        buf = None
    else:
        m = np.asarray(matrix, dtype=np.float32)
        if m.shape != (n_layers, n_embd):
            raise InvalidModelFileError(
                f"control vector has shape {m.shape} but the model needs ({n_layers}, {n_embd})")
        buf = np.ascontiguousarray(m[1:])
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(ctx, ptr, buf.size, n_embd, 1, n_layers - 1)
    if rc != 0:
        raise InvalidModelFileError(f"llama.cpp rejected the control vector (code {rc})")
    return buf


def model_vocab(model: Any) -> Any:
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(model)


def token_piece(vocab: Any, token: int, special: bool = False) -> bytes:
    """The bytes a token stands for (special tokens as text only when `special`)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:  # piece longer than the buffer
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def is_eog(vocab: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(vocab, token))


@functools.lru_cache(maxsize=1)
def ggml_base() -> ctypes.CDLL:
    """ggml's base library as llama-cpp-python ships it (tensor names and data, the
    quantizers), for what llama-cpp-python's bindings do not expose. Callers declare the
    signatures of the functions they use."""
    from pathlib import Path

    import llama_cpp

    from edge.errors import EdgeError

    libdir = Path(llama_cpp.__file__).parent / "lib"
    names = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
    if not names:
        raise EdgeError(f"ggml's base library is not in {libdir}; reinstall llama-cpp-python")
    return ctypes.CDLL(str(names[0]))


def ggml_tensor_lib() -> ctypes.CDLL:
    """ggml_base with the tensor accessors graph callbacks use (edge.hidden, edge.imatrix)
    declared: name, element count, f32 data, contiguity, an op's name."""
    lib = ggml_base()
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    return lib



@contextlib.contextmanager
def log_lines(echo: bool = False) -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs, kept in the yielded list instead of
    printed (echoed to stderr too with `echo`); llama-cpp-python's own logger is back after."""
    import sys

    import llama_cpp.llama_cpp as C
    from llama_cpp._logger import llama_log_callback as default_log

    lines: list[str] = []

    @C.llama_log_callback
    def collect(_level: int, text: bytes, _ud: Any) -> None:
        lines.append(text.decode("utf-8", "replace"))
        if echo:
            print(lines[-1], end="", file=sys.stderr, flush=True)

    C.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        C.llama_log_set(default_log, ctypes.c_void_p(0))
