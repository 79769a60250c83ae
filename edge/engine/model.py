"""The numpy forward pass of a Llama GGUF: logits, per-layer hidden states, KV cache.

It follows llama.cpp's LLAMA graph: RMSNorm, RoPE in "normal" (adjacent-pair) style on
GGUF-layout q/k weights (the converter permuted HF's halves into pairs), grouped-query
attention, SwiGLU MLP, and `hidden[il]` is the residual stream leaving layer il — the point
where llama.cpp adds control-vector direction il.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge.engine.config import ModelArgs
from edge.engine.weights import Weights, load_weights, rope_inv_freq
from edge.errors import BadOptionError, ContextOverflowError


class Backend(Protocol):
    """Computes a layer's projections; the dense one is BLAS, the sparse one R-Sparse."""

    def project(self, il: int, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]: ...


class DenseBackend:
    def __init__(self, weights: Weights) -> None:
        self.layers = weights.layers

    def project(self, il: int, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        wt = self.layers[il].wt
        return [x @ wt[n] for n in names]


class KVCache:
    """Keys (after RoPE) and values of every layer for the positions seen so far."""

    def __init__(self, args: ModelArgs, n_ctx: int) -> None:
        shape = (args.n_layers, n_ctx, args.n_head_kv, args.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.n_ctx = n_ctx
        self.n_past = 0

    def clear(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget every position from n on (e.g. to re-run a shared prefix's continuation)."""
        self.n_past = min(self.n_past, max(0, n))


@dataclass
class ForwardResult:
    logits: np.ndarray  # (T, n_vocab) float32, or (1, n_vocab) with last_only
    hidden: np.ndarray | None = None  # (n_layers, T, n_embd) residual stream after each layer


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


class Engine:
    """A Llama GGUF in float32 numpy. `forward` is the reference; backends make it fast."""

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.config: ModelArgs = weights.args
        self.info = weights.info
        self.path = weights.info.path
        self.dense = DenseBackend(weights)
        self._inv_freq = rope_inv_freq(self.config, weights.rope_freqs, weights.rope_freq_scale)
        self._vocab: Any = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Engine:
        return cls(load_weights(path))

    # ---- tokens (llama.cpp's tokenizer, vocabulary only) -------------------------------
    def _llama_vocab(self) -> Any:
        # The model's vocabulary alone (no weights, no context): llama.cpp's own tokenizer.
        if self._vocab is None:
            import llama_cpp
            from llama_cpp._internals import LlamaModel

            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            self._vocab = LlamaModel(path_model=str(self.path), params=params, verbose=False)
        return self._vocab

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llama_vocab().tokenize(text.encode("utf-8"), add_bos, special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llama_vocab().detokenize(list(tokens)).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> Any:
        from edge.llamacpp import model_vocab

        return model_vocab(self._llama_vocab().model)

    def token_piece(self, token: int, special: bool = False) -> bytes:
        from edge.llamacpp import token_piece

        return token_piece(self.vocab, token, special)

    def is_eog(self, token: int) -> bool:
        from edge.llamacpp import is_eog

        return is_eog(self.vocab, token)

    def eos_token(self) -> int:
        return int(self._llama_vocab().token_eos())

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        return KVCache(self.config, n_ctx or min(self.config.context_length, 2048))

    # ---- forward ---------------------------------------------------------------------
    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rotate adjacent pairs (x[2i], x[2i+1]) by pos·θ_i — llama.cpp's NORM rope."""
        ang = pos[:, None].astype(np.float64) * self._inv_freq[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        n_rot = 2 * self._inv_freq.shape[0]
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out = x.copy()
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
        return out

    def _attention(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                   cache: KVCache, start: int) -> np.ndarray:
        a = self.config
        T, hd, nkv = q.shape[0], a.head_dim, a.n_head_kv
        g = a.n_head // nkv
        cache.k[il, start : start + T] = k
        cache.v[il, start : start + T] = v
        S = start + T
        keys = cache.k[il, :S].transpose(1, 2, 0)  # (nkv, hd, S)
        vals = cache.v[il, :S].transpose(1, 0, 2)  # (nkv, S, hd)
        qh = q.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3)  # head h uses kv head h // g
        scores = (qh @ keys[:, None]) * np.float32(1.0 / np.sqrt(hd))  # (nkv, g, T, S)
        if T > 1:
            qpos = start + np.arange(T)[:, None]
            scores = np.where(np.arange(S)[None, :] <= qpos, scores, np.float32(-np.inf))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ vals[:, None]  # (nkv, g, T, hd)
        return out.transpose(2, 0, 1, 3).reshape(T, a.n_embd)

    def forward(
        self,
        tokens: Sequence[int],
        *,
        return_hidden: bool = False,
        cache: KVCache | None = None,
        backend: Backend | None = None,
        control: np.ndarray | None = None,
        last_only: bool = False,
    ) -> ForwardResult:
        """Run `tokens` after whatever `cache` holds (a fresh context when None).

        `control` (n_layers, n_embd) is added to the residual stream after each layer, as
        llama.cpp's control vectors are (the caller zeroes rows it does not want).
        """
        a = self.config
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = toks.shape[0]
        if T == 0:
            raise BadOptionError("forward() needs at least one token")
        if toks.min() < 0 or toks.max() >= a.n_vocab:
            raise BadOptionError(f"token ids must be in [0, {a.n_vocab}); got {toks.min()}..{toks.max()}")
        cache = cache if cache is not None else KVCache(a, T)
        start = cache.n_past
        if start + T > cache.n_ctx:
            raise ContextOverflowError(
                f"{start + T} tokens do not fit the {cache.n_ctx}-token KV cache; make a larger cache"
            )
        be = backend or self.dense
        pos = np.arange(start, start + T)
        x = self.weights.tok_embd[toks]
        hidden = np.empty((a.n_layers, T, a.n_embd), dtype=np.float32) if return_hidden else None
        for il, lw in enumerate(self.weights.layers):
            h = rms_norm(x, lw.attn_norm, a.rms_eps)
            q, k, v = be.project(il, ("q", "k", "v"), h)
            q = self._rope(q.reshape(T, a.n_head, a.head_dim), pos)
            k = self._rope(k.reshape(T, a.n_head_kv, a.head_dim), pos)
            att = self._attention(il, q, k, v.reshape(T, a.n_head_kv, a.head_dim), cache, start)
            x = x + be.project(il, ("o",), att)[0]
            h = rms_norm(x, lw.ffn_norm, a.rms_eps)
            gate, up = be.project(il, ("gate", "up"), h)
            x = x + be.project(il, ("down",), silu(gate) * up)[0]
            if control is not None:
                x = x + control[il]
            if hidden is not None:
                hidden[il] = x
        cache.n_past = start + T
        if last_only:
            x = x[-1:]
        logits = rms_norm(x, self.weights.output_norm, a.rms_eps) @ self.weights.output.T
        return ForwardResult(logits=np.asarray(logits, dtype=np.float32), hidden=hidden)
