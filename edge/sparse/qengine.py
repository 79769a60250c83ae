"""The quantized engine: a Llama GGUF run from its quantized rows, R-Sparse in decode.

Prefill is dense and batched: each projection is dequantized a slab of columns at a time
(a few MB, never the f32 model) and multiplied with BLAS. Decode runs one compiled call per
token (edge.sparse.qdecode) through the fused sparse kernels; embeddings and the output
layer are quantized too. Tokenization is llama.cpp's own, through a vocabulary-only model,
exactly as the reference engine (edge.engine.model.Engine) does it.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.engine.config import ModelArgs
from edge.engine.model import Engine
from edge.engine.weights import LINEAR_NAMES
from edge.errors import BadOptionError, ContextOverflowError
from edge.gguf_file import ModelInfo, inspect
from edge.sparse import qnative
from edge.sparse import qstore as K
from edge.sparse.qrows import Progress, build_qrows, check_profile_shape, load_profile
from edge.sparse.qstore import QStore

SLAB_VALUES = 1 << 21  # prefill dequantizes ≤ 2M values (8 MB f32) of a matrix at a time


class QCache:
    """Keys (after RoPE) and values of every layer, and the RoPE angles of each position."""

    def __init__(self, args: ModelArgs, n_ctx: int, inv_freq: np.ndarray) -> None:
        shape = (args.n_layers, n_ctx, args.n_head_kv, args.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        ang = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
        self.cos = np.cos(ang).astype(np.float32)
        self.sin = np.sin(ang).astype(np.float32)
        self.n_ctx = n_ctx
        self.n_past = 0

    def clear(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        self.n_past = min(self.n_past, max(0, n))


@dataclass
class ReadStats:
    """Weight bytes the decode steps since the last reset actually read, per token."""

    tokens: int
    read_bytes: float  # per token: active rows, low-rank factors, output layer, one embedding row
    dense_bytes: float  # per token for the same engine with every row active
    active: float  # share of projection input channels that were active

    @property
    def fraction(self) -> float:
        return self.read_bytes / self.dense_bytes if self.dense_bytes else 1.0


class QuantizedEngine:
    """A model's quantized rows (memory-mapped) plus an optional R-Sparse profile."""

    # llama.cpp's tokenizer through a vocabulary-only model: the reference engine's methods
    _llama_vocab = Engine._llama_vocab
    tokenize = Engine.tokenize
    detokenize = Engine.detokenize
    token_piece = Engine.token_piece
    is_eog = Engine.is_eog
    eos_token = Engine.eos_token
    vocab = Engine.vocab

    def __init__(self, info: ModelInfo, store: QStore, lowrank: QStore | None = None,
                 profile: Any = None, profile_path: str | None = None, kernels: str = "auto") -> None:
        self.info, self.path, self.store, self.lowrank = info, info.path, store, lowrank
        self.profile, self.profile_path = profile, profile_path
        self._vocab: Any = None
        h = store.header
        self.config = a = ModelArgs.from_dict(h["args"])
        self.weights, self.output_weights = h["weights"], h["output_weights"]
        n_rot = a.n_rot or a.head_dim
        inv = a.rope_theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        if "rope_freqs" in h["tensors"]:
            inv = inv / store.array("rope_freqs").astype(np.float64)[: n_rot // 2]
        self._inv_freq = inv * float(h.get("rope_freq_scale", 1.0))
        L = a.n_layers
        self.lin = np.array([[store.ids[f"blk.{il}.{m}"] for m in LINEAR_NAMES] for il in range(L)], np.int64)
        self.norms = np.array([[store.f32_offset(f"blk.{il}.attn_norm"), store.f32_offset(f"blk.{il}.ffn_norm")]
                               for il in range(L)], np.int64)
        self.glob = np.array([store.ids["token_embd"], store.ids["output"], store.f32_offset("output_norm")], np.int64)
        self.hp = np.array([L, a.n_embd, a.n_head, a.n_head_kv, a.head_dim, n_rot, a.n_ff, a.n_vocab], np.int64)
        self.thr = np.full((L, len(LINEAR_NAMES)), -1.0, np.float32)
        self.lr = np.full((L, len(LINEAR_NAMES), 2), -1, np.int64)
        self.ranks = np.zeros((L, len(LINEAR_NAMES)), np.int64)
        names = {n: i for i, n in enumerate(LINEAR_NAMES)}
        for m in (profile.modules if profile is not None else []):
            if m.t < 0:
                continue
            self.thr[m.layer, names[m.name]] = m.t
            if m.r > 0 and lowrank is not None:
                self.lr[m.layer, names[m.name]] = (lowrank.ids[f"blk.{m.layer}.{m.name}.a"],
                                                   lowrank.ids[f"blk.{m.layer}.{m.name}.b"])
                self.ranks[m.layer, names[m.name]] = m.r
        lrs = lowrank or store  # the kernels need some arrays even when no module has a rank
        self._w = (store.u8, store.i8, store.u16, store.f32, store.mats)
        self._lr = (lrs.u8, lrs.i8, lrs.u16, lrs.mats, self.lr, self.ranks)
        self._model = (self.lin, self.norms, self.glob, self.thr, self.hp)
        self._eps = np.float32(a.rms_eps)
        self._scratch: dict[str, np.ndarray] = {}
        self._scratch_key: tuple[int, int] | None = None
        self._scratch_ctx = 0
        vocab_p = int(store.mats[self.glob[1], K.NCOLS])
        self._logits = np.zeros(max(vocab_p, a.n_embd), np.float32)
        if kernels not in ("auto", "c", "numba"):
            raise BadOptionError(f"kernels={kernels!r}: use auto, c or numba")
        self._lib = None if kernels == "numba" else qnative.library(required=kernels == "c")
        self._cdec = qnative.CDecoder(self._lib, self) if self._lib is not None else None
        self.kernels = "c" if self._lib is not None else "numba"  # numba: the portable fallback
        self.reset_counts()

    # ---- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike[str], profile: str | os.PathLike[str] | None = None, *,
             weights: str = "q8", output_weights: str | None = None, threads: int | None = None,
             kernels: str = "auto", progress: Progress | None = None) -> QuantizedEngine:
        """Open (building on first use) the quantized rows of `model` in format `weights`
        (q8 | q4), with `profile`'s thresholds and low-rank factors when given."""
        info = inspect(model)
        prof = load_profile(profile, info) if profile is not None else None  # wrong model: fails first
        res = build_qrows(info.path, profile, weights=weights, output_weights=output_weights,
                          progress=progress)
        store = QStore(res.path)
        if prof is not None:
            check_profile_shape(prof, store)
        lowrank = QStore(res.lowrank_path) if res.lowrank_path else None
        if threads:
            set_threads(threads)
        return cls(info, store, lowrank, prof, str(profile) if profile is not None else None, kernels)

    def with_profile(self, profile: str | os.PathLike[str] | None) -> QuantizedEngine:
        """The same rows under another profile (or dense with None): only the thresholds and
        low-rank factors change, the memory-mapped rows are shared."""
        if profile is None:
            return QuantizedEngine(self.info, self.store, kernels=self.kernels)
        prof = load_profile(profile, self.info)
        check_profile_shape(prof, self.store)
        res = build_qrows(self.path, profile, weights=self.weights, output_weights=self.output_weights)
        lowrank = QStore(res.lowrank_path) if res.lowrank_path else None
        return QuantizedEngine(self.info, self.store, lowrank, prof, str(profile), self.kernels)

    @property
    def sparse(self) -> bool:
        return bool((self.thr >= 0).any())

    def new_cache(self, n_ctx: int | None = None) -> QCache:
        return QCache(self.config, n_ctx or min(self.config.context_length, 2048), self._inv_freq)

    # ---- decode -----------------------------------------------------------------------
    def _buffers(self, n_ctx: int) -> tuple:
        """The numba decode step's scratch arrays (one tuple), remade when the thread count
        or the largest context changes."""
        P = threads()
        key = (P, max(n_ctx, self._scratch_ctx))
        if self._scratch_key != key:
            a, mats = self.config, self.store.mats
            max_in = int(mats[:, K.NROWS].max())
            max_out = int(max(mats[self.lin.ravel(), K.NCOLS].max(), a.n_embd))
            max_r = int(max(32, self._lr[3][:, K.NCOLS].max()))
            f32, i32, i64 = np.float32, np.int32, np.int64
            self._scratch_ctx = key[1]
            self._buf = (np.zeros(a.n_embd, f32), np.zeros(a.n_embd, f32), np.zeros((3, max_in), f32),
                         np.zeros((3, max_in), i32), np.zeros((3, max_in), i32), np.zeros((3, max_out), f32),
                         np.zeros((3, max_r), f32), np.zeros(a.n_embd, f32), np.zeros(key[1], f32),
                         np.arange(max_r, dtype=i32), np.zeros((P, 3, max_out), f32),
                         self._logits[None, :], np.zeros(3, i64), np.zeros(3, i64),
                         np.zeros(3, i64), np.zeros(3, i64))
            self._scratch_key = key
        return self._buf

    def decode(self, token: int, cache: QCache) -> np.ndarray:
        """One token through the sparse (or dense) decode path; the next-token logits (a view
        into a buffer the next call overwrites)."""
        if cache.n_past >= cache.n_ctx:
            raise ContextOverflowError(f"the {cache.n_ctx}-token KV cache is full; make a larger cache")
        if not 0 <= token < self.config.n_vocab:
            raise BadOptionError(f"token id {token} is outside [0, {self.config.n_vocab})")
        if self._cdec is not None:
            self._cdec.decode(token, cache, self._logits, threads())
        else:
            from edge.sparse.qdecode import decode_step

            decode_step(token, cache.n_past, self._w, self._lr, self._model, self._eps,
                        (cache.cos, cache.sin, cache.k, cache.v), self._buffers(cache.n_ctx),
                        self.counts, threads())
        cache.n_past += 1
        self.n_decoded += 1
        return self._logits[: self.config.n_vocab]

    def _dequant(self, mat: np.ndarray, r0: int, r1: int, b0: int, b1: int, out: np.ndarray) -> None:
        st = self.store
        if self._lib is not None:
            self._lib.edge_dequant(st.u8.ctypes.data, mat.ctypes.data, r0, r1, b0, b1, out.ctypes.data)
        else:
            from edge.sparse.qkernels import dequant_rows

            dequant_rows(st.u8, st.i8, st.u16, mat, r0, r1, b0, b1, out)

    # ---- what decode read -------------------------------------------------------------
    def reset_counts(self) -> None:
        self.counts = np.zeros((self.config.n_layers, len(LINEAR_NAMES), 2), np.int64)
        self.n_decoded = 0

    def read_stats(self) -> ReadStats:
        """Bytes per token from the active counts since reset_counts() (dense if none)."""
        st, n = self.store, max(1, self.n_decoded)
        stride = st.mats[self.lin, K.STRIDE].astype(np.float64)  # (L, 7)
        rows = st.mats[self.lin, K.NROWS].astype(np.float64)
        act = self.counts[..., 0] / n if self.n_decoded else rows
        read = float((act * stride).sum())
        if self.lowrank is not None:
            lm = self.lowrank.mats
            for (il, m), r in np.ndenumerate(self.ranks):
                if r > 0:
                    a_id, b_id = self.lr[il, m]
                    read += self.counts[il, m, 1] / n * lm[a_id, K.STRIDE] + r * lm[b_id, K.STRIDE]
        fixed = float(st.nbytes("output") + st.entry("token_embd")["stride"])
        return ReadStats(tokens=self.n_decoded, read_bytes=read + fixed,
                         dense_bytes=float((rows * stride).sum()) + fixed,
                         active=float(act.sum() / rows.sum()))

    # ---- prefill (dense, batched) -----------------------------------------------------
    def _matmul(self, x: np.ndarray, mat: int) -> np.ndarray:
        """x (T, in) @ the matrix's rows, dequantized a slab of columns at a time."""
        st = self.store
        m = st.mats[mat]
        n_in, nb, n_cols = int(m[K.NROWS]), int(m[K.NBLK]), int(m[K.NCOLS])
        step = max(1, SLAB_VALUES // (n_in * 32))
        out = np.empty((x.shape[0], n_cols), np.float32)
        buf = self._scratch.get("slab")
        if buf is None or buf.size < n_in * min(nb, step) * 32:
            buf = self._scratch["slab"] = np.empty(max(SLAB_VALUES, n_in * 32), np.float32)
        for b0 in range(0, nb, step):
            b1 = min(nb, b0 + step)
            w = buf[: n_in * (b1 - b0) * 32].reshape(n_in, (b1 - b0) * 32)
            self._dequant(m, 0, n_in, b0, b1, w)
            if b1 - b0 == nb:
                np.matmul(x, w, out=out)
            else:
                out[:, b0 * 32 : b1 * 32] = x @ w
        if m[K.SOFF] >= 0:  # the per-output scales the rows were divided by (qformat)
            out *= st.f32[m[K.SOFF] : m[K.SOFF] + n_cols]
        return out

    def prefill(self, tokens: list[int] | np.ndarray, cache: QCache, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` after what `cache` holds, every projection dense; logits of the last
        position (n_vocab,), or of every position (T, n_vocab) with all_logits."""
        from edge.engine.model import rms_norm, silu

        a = self.config
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T, start = toks.shape[0], cache.n_past
        if T == 0:
            raise BadOptionError("prefill() needs at least one token")
        if toks.min() < 0 or toks.max() >= a.n_vocab:
            raise BadOptionError(f"token ids must be in [0, {a.n_vocab}); got {toks.min()}..{toks.max()}")
        if start + T > cache.n_ctx:
            raise ContextOverflowError(f"{start + T} tokens do not fit the {cache.n_ctx}-token KV cache; make a larger cache")
        st = self.store
        emb = st.mats[self.glob[0]]
        x = np.empty((T, int(emb[K.NCOLS])), np.float32)
        for i, t in enumerate(toks):
            self._dequant(emb, int(t), int(t) + 1, 0, int(emb[K.NBLK]), x[i : i + 1])
        x = x[:, : a.n_embd].copy()
        pos = np.arange(start, start + T)
        cos, sin = cache.cos[pos][:, None, :], cache.sin[pos][:, None, :]
        for il in range(a.n_layers):
            lin = self.lin[il]
            h = rms_norm(x, st.array(f"blk.{il}.attn_norm"), a.rms_eps)
            q = _rope(self._matmul(h, lin[0])[:, : a.n_embd].reshape(T, a.n_head, a.head_dim), cos, sin)
            k = _rope(self._matmul(h, lin[1])[:, : a.n_head_kv * a.head_dim].reshape(T, a.n_head_kv, a.head_dim), cos, sin)
            v = self._matmul(h, lin[2])[:, : a.n_head_kv * a.head_dim].reshape(T, a.n_head_kv, a.head_dim)
            cache.k[il, start : start + T] = k
            cache.v[il, start : start + T] = v
            att = _attention(q, cache.k[il, : start + T], cache.v[il, : start + T], start)
            x += self._matmul(att, lin[3])[:, : a.n_embd]
            h = rms_norm(x, st.array(f"blk.{il}.ffn_norm"), a.rms_eps)
            gu = silu(self._matmul(h, lin[4])[:, : a.n_ff]) * self._matmul(h, lin[5])[:, : a.n_ff]
            x += self._matmul(gu, lin[6])[:, : a.n_embd]
        cache.n_past = start + T
        h = rms_norm(x if all_logits else x[-1:], st.array("output_norm"), a.rms_eps)
        return self._matmul(h, self.glob[1])[:, : a.n_vocab] if all_logits else self._matmul(h, self.glob[1])[0, : a.n_vocab]


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """llama.cpp's NORM rope on (T, heads, hd): adjacent pairs rotated by pos·θ_i."""
    n_rot = 2 * cos.shape[-1]
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def _attention(q: np.ndarray, keys: np.ndarray, vals: np.ndarray, start: int) -> np.ndarray:
    """Causal GQA attention of T queries (T, n_head, hd) over cached (S, n_kv, hd)."""
    T, n_head, hd = q.shape
    S, nkv = keys.shape[0], keys.shape[1]
    g = n_head // nkv
    qh = q.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3)  # head h uses kv head h // g
    scores = (qh @ keys.transpose(1, 2, 0)[:, None]) * np.float32(1.0 / np.sqrt(hd))  # (nkv, g, T, S)
    if T > 1:
        scores = np.where(np.arange(S)[None, :] <= start + np.arange(T)[:, None], scores, np.float32(-np.inf))
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ vals.transpose(1, 0, 2)[:, None]  # (nkv, g, T, hd)
    return out.transpose(2, 0, 1, 3).reshape(T, n_head * hd).astype(np.float32, copy=False)


_THREADS: int | None = None


def threads() -> int:
    """Threads of the decode kernels: set_threads()'s value, else the physical cores."""
    if _THREADS is None:
        return _default_threads()
    return _THREADS


@functools.lru_cache(maxsize=1)
def _default_threads() -> int:
    # psutil reads sysfs on every call (~0.8 ms): once per process, not once per token
    from edge.system import default_threads

    return default_threads()


def set_threads(n: int) -> int:
    """Threads for the decode kernels (C/OpenMP or numba); the value in force is returned."""
    global _THREADS
    _THREADS = max(1, int(n))
    if "numba" in sys.modules:  # the numba fallback's pool (never imported by the C path)
        import numba

        _THREADS = max(1, min(_THREADS, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(_THREADS)
    return _THREADS


def model_path(model: str | os.PathLike[str] | None) -> Path:
    from edge.catalog import resolve_model

    return Path(resolve_model(str(model) if model else None))
