"""llama.cpp's C API, the parts edge uses in several places: one definition each.

Opening a model (after the host check), creating a context, applying a control vector,
a token's text piece and the end-of-generation test. The session (edge.runtime), the
batch scorer and sampler (bias), the benchmark contexts and the native engine's tokenizer
all come through here.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np

from edge.errors import InvalidModelFileError

FLASH_ATTN_AUTO = -1  # LLAMA_FLASH_ATTN_TYPE_AUTO


def open_llama(path: str | os.PathLike[str], **params: Any) -> Any:
    """llama-cpp-python's Llama on `path`, once the host check says llama.cpp runs here."""
    import llama_cpp

    from edge.hostcheck import ensure_llama_works

    ensure_llama_works()  # a library that traps on this CPU fails here, in one line
    return llama_cpp.Llama(model_path=str(path), verbose=False, **params)


def load_model(path: str | os.PathLike[str], *, vocab_only: bool = False) -> Any:
    """A bare llama_model (no context): another file of a loaded model, or a vocabulary."""
    import llama_cpp

    if not vocab_only:
        from edge.hostcheck import ensure_llama_works

        ensure_llama_works()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = vocab_only
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
                flash_attn: int = 0, perf: bool = False, cb_eval: Any = None) -> Any:
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

