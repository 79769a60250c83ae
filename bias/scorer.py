"""Batched log-likelihood scoring on llama.cpp: many sequences per llama_decode.

Each request is a token list and the index of its first scored token. The requests of one
batch are merged into a prefix tree: a token shared by several requests (the BOS, a
CrowS-Pairs pair's common start, a BBQ context and its question) is decoded once and
tagged with all their sequence ids, so its KV-cache cell serves every continuation
(llama.cpp's unified KV cache masks attention by sequence id). Logits are requested only
at the positions whose next token is scored. `share_prefix=False` gives each request its
own copy of every token: the from-scratch baseline the benchmarks compare against.

llama.cpp's CPU kernels work on tiles of rows, so a token's logits shift slightly (up to
~0.06 nats here) with its row offset in the batch. Each token is therefore placed at a row
≡ its position (mod ALIGN), padding with tokens of a spare sequence: every request then
scores exactly as it would alone, whatever else shares its batch (reproducible audits).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.errors import ContextOverflowError, EdgeError, InvalidModelFileError
from edge.runtime import Runtime

Request = tuple[Sequence[int], int]  # (tokens, first scored index ≥ 1)
ALIGN = 8


@dataclass
class _Batch:
    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    seqs: list[list[int]] = field(default_factory=list)
    out: list[bool] = field(default_factory=list)
    index: dict[tuple[int, int], int] = field(default_factory=dict)
    paths: list[list[int]] = field(default_factory=list)  # node per token, per request
    members: list[int] = field(default_factory=list)  # request index per sequence slot
    n_pad: int = 0


class BatchScorer:
    """A second llama.cpp context on a Runtime's model, built for multi-sequence scoring."""

    def __init__(self, rt: Runtime, *, n_batch: int = 512, n_seq: int = 64):
        import llama_cpp

        self.rt = rt
        self.n_batch, self.n_seq = n_batch, n_seq
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_batch  # the cache is cleared between batches: one batch must fit
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = n_seq
        p.kv_unified = True  # one cell stream, so a cell can belong to many sequences
        p.flash_attn_type = 0  # as the Runtime: CPU flash attention shifts log-probs by up to 0.5 nats
        p.n_threads = p.n_threads_batch = rt.threads
        self.ctx = llama_cpp.llama_init_from_model(rt.llm._model.model, p)
        if not self.ctx:
            raise EdgeError("llama.cpp could not create a scoring context; free some memory")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)
        self.n_vocab = rt.llm.n_vocab()
        self.tokens_decoded = 0  # real tokens through llama_decode (padding counted apart)
        self.pad_tokens = 0
        self._cvec: object = None  # the Runtime control vector last applied here
        self._own_cvec = False

    # ---- control vectors ------------------------------------------------------------
    def set_control_vector(self, directions: np.ndarray | None, scale: float = 1.0) -> None:
        """As Runtime.set_control_vector, for this scoring context only."""
        self._apply(None if directions is None else np.asarray(directions, np.float32)[1:] * scale,
                    directions is None or np.asarray(directions).shape)
        self._own_cvec = directions is not None

    def _apply(self, rows: np.ndarray | None, shape: object) -> None:
        import llama_cpp

        n_layers, n_embd = self.rt.info.n_layers or 0, self.rt.info.n_embd or 0
        if rows is None:
            rc = llama_cpp.llama_set_adapter_cvec(self.ctx, None, 0, n_embd, 0, 0)
            self._buf = None
        else:
            if shape != (n_layers, n_embd):
                raise InvalidModelFileError(
                    f"control vector has shape {shape} but the model needs ({n_layers}, {n_embd})")
            self._buf = np.ascontiguousarray(rows, dtype=np.float32)
            ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = llama_cpp.llama_set_adapter_cvec(self.ctx, ptr, self._buf.size, n_embd, 1, n_layers - 1)
        if rc != 0:
            raise InvalidModelFileError(f"llama.cpp rejected the control vector (code {rc})")

    def _sync_runtime_cvec(self) -> None:
        # A correction loaded into the Runtime (edge bias audit --correction) applies here too.
        cv = self.rt.control_vector
        if not self._own_cvec and cv is not self._cvec:
            n_layers, n_embd = self.rt.info.n_layers or 0, self.rt.info.n_embd or 0
            self._apply(None if cv is None else cv.reshape(-1, n_embd), None if cv is None else
                        (n_layers, n_embd))
            self._cvec = cv

    # ---- scoring --------------------------------------------------------------------
    def score(self, requests: Sequence[Request], *, share_prefix: bool = True,
              on_progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Per request, log p(tokens[i] | tokens[:i]) for i from its start to the end."""
        self._sync_runtime_cvec()
        results: list[np.ndarray] = [np.empty(0)] * len(requests)
        b = _Batch()
        for r, (toks, start) in enumerate(requests):
            if not 1 <= start <= len(toks):
                raise ValueError(f"request {r}: start {start} outside 1..{len(toks)}")
            if len(toks) > self.n_batch:
                raise ContextOverflowError(
                    f"a scored text is {len(toks)} tokens; the scorer holds {self.n_batch} at most")
            if not self._fits(b, toks, r, share_prefix):
                self._run(b, requests, results)
                if on_progress:
                    on_progress(len(b.members))
                b = _Batch()
            self._insert(b, toks, start, r, share_prefix)
        if b.members:
            self._run(b, requests, results)
            if on_progress:
                on_progress(len(b.members))
        return results

    def _key(self, parent: int, tok: int, r: int, share: bool) -> tuple[int, int]:
        return (parent if parent >= 0 or share else -2 - r, tok)

    def _fits(self, b: _Batch, toks: Sequence[int], r: int, share: bool) -> bool:
        if len(b.members) >= self.n_seq - 1:  # the last sequence id pads
            return False
        node, depth = -1, len(toks)
        for d, t in enumerate(toks):
            node = b.index.get(self._key(node, t, r, share), -1)
            if node < 0:
                depth = d
                break
        new = len(toks) - depth + (depth - len(b.tokens)) % ALIGN
        return len(b.tokens) + new <= self.n_batch

    def _insert(self, b: _Batch, toks: Sequence[int], start: int, r: int, share: bool) -> None:
        slot = len(b.members)
        b.members.append(r)
        node, path = -1, []
        for d, t in enumerate(toks):
            key = self._key(node, t, r, share)
            nxt = b.index.get(key, -1)
            if nxt < 0:
                while len(b.tokens) % ALIGN != d % ALIGN:
                    self._pad(b)
                nxt = len(b.tokens)
                b.index[key] = nxt
                b.tokens.append(t)
                b.depth.append(d)
                b.seqs.append([])
                b.out.append(False)
            b.seqs[nxt].append(slot)
            if start - 1 <= d < len(toks) - 1:
                b.out[nxt] = True  # its logits predict a scored token
            path.append(nxt)
            node = nxt
        b.paths.append(path)

    def _pad(self, b: _Batch) -> None:
        b.tokens.append(self.rt.llm.token_bos())
        b.depth.append(b.n_pad)
        b.seqs.append([self.n_seq - 1])
        b.out.append(False)
        b.n_pad += 1

    def _run(self, b: _Batch, requests: Sequence[Request], results: list[np.ndarray]) -> None:
        import llama_cpp

        n = len(b.tokens)
        bt = self.batch
        bt.n_tokens = n
        np.ctypeslib.as_array(bt.token, shape=(n,))[:] = b.tokens
        np.ctypeslib.as_array(bt.pos, shape=(n,))[:] = b.depth
        np.ctypeslib.as_array(bt.logits, shape=(n,))[:] = b.out
        nseq = np.ctypeslib.as_array(bt.n_seq_id, shape=(n,))
        for i, seqs in enumerate(b.seqs):
            nseq[i] = len(seqs)
            row = bt.seq_id[i]
            for j, s in enumerate(seqs):
                row[j] = s
        llama_cpp.llama_memory_clear(self.mem, True)
        rc = llama_cpp.llama_decode(self.ctx, bt)
        if rc != 0:
            raise EdgeError(f"llama_decode failed (code {rc}) while scoring; try a smaller batch")
        self.tokens_decoded += n - b.n_pad
        self.pad_tokens += b.n_pad
        out_nodes = np.flatnonzero(b.out)
        row_of = np.full(n, -1)
        row_of[out_nodes] = np.arange(len(out_nodes))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx),
                                       shape=(len(out_nodes), self.n_vocab))
        mx = logits.max(axis=1)
        lse = mx.astype(np.float64) + np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64))
        for slot, r in enumerate(b.members):
            toks, start = requests[r]
            rows = row_of[b.paths[slot][start - 1 : len(toks) - 1]]
            tgt = np.asarray(toks[start:])
            results[r] = logits[rows, tgt].astype(np.float64) - lse[rows]

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> BatchScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
