"""Batched log-likelihood scoring on llama.cpp: many sequences per llama_decode.

Each request is a token list and the index of its first scored token. The requests of one
batch are merged into a prefix tree: a token shared by several requests (the BOS, a
CrowS-Pairs pair's common start, a BBQ context and its question) is decoded once and
tagged with all their sequence ids, so its KV-cache cell serves every continuation
(llama.cpp's unified KV cache masks attention by sequence id). Logits are requested only
at the positions whose next token is scored. `share_prefix=False` gives each request its
own copy of every token: the from-scratch baseline the benchmarks compare against.

llama.cpp's CPU kernels work on tiles of rows, so a token's logits can shift with its row
offset in the batch. The scorer measures how much on a probe sentence (`Layout`): where
the shift exceeds LAYOUT_TOL (Q4_1 here: up to 0.17 nats), each token is placed at a row
≡ its position (mod the kernels' period: 8 rows on AVX2, 16 on AVX512, measured), any row after its parent's, interleaved with other requests'
tokens (llama.cpp only needs each sequence's positions to increase down the batch), with a
spare sequence's tokens in the rows left empty (~13% of rows on CrowS-Pairs); where it
does not (f16: 0.007 nats, below the ~0.02 that prefix sharing already causes), rows are
packed densely. From scratch (share_prefix=False) rows are always aligned, and every
request then scores exactly as it would alone, whatever shares its batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge import llamacpp
from edge.errors import ContextOverflowError, EdgeError
from edge.runtime import Runtime

Request = tuple[Sequence[int], int]  # (tokens, first scored index ≥ 1)
PERIODS = (8, 16)  # row periods the CPU kernels are tried for (AVX2 shows 8, AVX512 16)
LOOKAHEAD = 16  # requests considered for each place in a batch


LAYOUT_TOL = 0.05  # nats per token: row-offset effects below this are not worth padding for
LAYOUT_PROBE = ("The committee met on Tuesday to review the budget, and most members agreed "
                "that the new library should open before the winter holidays.")


@dataclass(frozen=True)
class Layout:
    """How much a token's log-probability moves with its row offset in a batch, measured.

    Shared-prefix scoring already moves scores by ~0.02 nats (attention sums shared cells in
    another order), so aligning rows (to the period, ~13% padding on CrowS-Pairs) is worth it only
    where the kernels move them more: on the probe, Q4_1 here moves 0.17 nats, f16 0.007.
    """

    max_shift: float  # largest |Δ log p| over offsets 1..max(PERIODS) of the probe text
    align: int        # period if max_shift > LAYOUT_TOL, else 1
    period: int = PERIODS[0]  # smallest row period after which the scores repeat exactly

    def to_dict(self) -> dict[str, float]:
        return {"max_shift_nats": round(self.max_shift, 4), "align": self.align, "period": self.period}


def row_period(shifts: Sequence[float]) -> int:
    """The smallest of PERIODS at whose multiples the probe's scores repeat exactly.

    `shifts[k]` is the largest |Δ log p| at row offset k against offset 0.
    """
    return next((p for p in PERIODS if all(shifts[k] <= 1e-6 for k in range(p, len(shifts), p))),
                PERIODS[-1])


@dataclass
class _Plan:
    end: int  # the batch's row count once this request is in
    shared: list[int] = field(default_factory=list)  # nodes already in the batch
    new: list[tuple[int, int]] = field(default_factory=list)  # (depth, row) to add


@dataclass
class _Batch:
    """One llama_decode: a prefix tree of requests laid out on batch rows.

    A token at depth d sits on a row ≡ d (mod align), after its parent's row; tokens of
    other requests fill the rows in between, so padding is needed only where a residue
    class runs short (a few % of rows instead of ~28% with sequential placement).
    """

    n_rows: int
    align: int = 8  # the kernels' row period, or 1 where the kernels barely depend on the row (Layout)
    used_rows: int = 0  # rows up to the last one holding a node
    node_row: list[int] = field(default_factory=list)
    row_node: dict[int, int] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    seqs: list[list[int]] = field(default_factory=list)
    out: list[bool] = field(default_factory=list)
    index: dict[tuple[int, int], int] = field(default_factory=dict)
    paths: list[list[int]] = field(default_factory=list)  # node per token, per request
    members: list[int] = field(default_factory=list)  # request index per sequence slot

    def place(self, parent_row: int, depth: int, also_taken: set[int]) -> int:
        """First free row after the parent's in the depth's residue class (≥ n_rows: full)."""
        r = parent_row + 1
        r += (depth - r) % self.align
        while r < self.n_rows and (r in self.row_node or r in also_taken):
            r += self.align
        return r

    def add(self, token: int, depth: int, row: int) -> int:
        """A new node on `row`; its index."""
        node = len(self.tokens)
        self.node_row.append(row)
        self.row_node[row] = node
        self.tokens.append(token)
        self.depth.append(depth)
        self.seqs.append([])
        self.out.append(False)
        self.used_rows = max(self.used_rows, row + 1)
        return node


def _logsumexp_rows(x: np.ndarray, chunk: int = 16) -> np.ndarray:
    """log Σ exp over each row, float64; in cache-sized chunks (1.5-3× faster than whole)."""
    out = np.empty(len(x))
    buf = np.empty((chunk, x.shape[1]), np.float32)
    for i in range(0, len(x), chunk):
        rows = x[i : i + chunk]
        mx = rows.max(axis=1)
        t = buf[: len(rows)]
        np.subtract(rows, mx[:, None], out=t)
        np.exp(t, out=t)
        out[i : i + chunk] = mx + np.log(t.sum(axis=1, dtype=np.float64))
    return out


class BatchScorer:
    """A second llama.cpp context on a Runtime's model, built for multi-sequence scoring."""

    def __init__(self, rt: Runtime, *, n_batch: int = 512, n_seq: int = 64, rows: int = 256,
                 model_path: str | os.PathLike[str] | None = None):
        """`model_path`: score with another file of the same model (edge.dequant's f16 copy);
        tokenizer, control vector and threads still come from `rt`."""
        import llama_cpp

        self.rt = rt
        self._model = None
        model = rt.model
        if model_path is not None:
            self._model = model = llamacpp.load_model(model_path)
        self.n_batch, self.n_seq = n_batch, n_seq
        # Rows per llama_decode when scoring: attention spans the cache cells in use (padded
        # to 256), so 256-row decodes cost ~5-10% less per token than 512 (measured, f16 and
        # Q4_1); texts up to n_batch tokens still fit (next_logits, long requests).
        self.rows = min(rows, n_batch)
        # The cache is cleared between batches: one batch must fit. One cell stream, so a
        # cell can belong to many sequences.
        self.ctx = llamacpp.new_context(model, n_ctx=n_batch, n_batch=n_batch, n_seq=n_seq,
                                        kv_unified=True, threads=rt.threads)
        if not self.ctx:
            self.close()
            raise EdgeError("llama.cpp could not create a scoring context; free some memory")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)
        self.n_vocab = rt.n_vocab
        self.tokens_decoded = 0  # real tokens through llama_decode (padding counted apart)
        self.pad_tokens = 0
        self._cvec: object = None  # the Runtime control vector last applied here
        self._own_cvec = False
        self.layout: Layout | None = None  # measured on the first shared-prefix score()
        self.compute: dict[str, str] = {}  # which weights these are (edge.dequant.Compute)

    # ---- control vectors ------------------------------------------------------------
    def set_control_vector(self, directions: np.ndarray | None, scale: float = 1.0) -> None:
        """As Runtime.set_control_vector, for this scoring context only."""
        m = None if directions is None else np.asarray(directions, np.float32) * np.float32(scale)
        self._apply(m)
        self._own_cvec = directions is not None

    def _apply(self, matrix: np.ndarray | None) -> None:
        info = self.rt.info
        self._buf = llamacpp.set_control_vector(self.ctx, matrix, info.n_layers or 0, info.n_embd or 0)

    def _sync_runtime_cvec(self) -> None:
        # A correction loaded into the Runtime (edge bias audit --correction) applies here too.
        cv = self.rt.control_vector
        if not self._own_cvec and cv is not self._cvec:
            self._apply(cv)
            self._cvec = cv

    # ---- scoring --------------------------------------------------------------------
    def score(self, requests: Sequence[Request], *, share_prefix: bool = True,
              on_progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Per request, log p(tokens[i] | tokens[:i]) for i from its start to the end."""
        self._sync_runtime_cvec()
        results: list[np.ndarray] = [np.empty(0)] * len(requests)
        for r, (toks, start) in enumerate(requests):
            if not 1 <= start <= len(toks):
                raise ValueError(f"request {r}: start {start} outside 1..{len(toks)}")
            if len(toks) > self.n_batch:
                raise ContextOverflowError(
                    f"a scored text is {len(toks)} tokens; the scorer holds {self.n_batch} at most")
        # In token order, requests that start alike meet in one batch and share their prefix
        # (11% fewer tokens on CrowS-Pairs than sharing within each pair only).
        pending = sorted(range(len(requests)), key=lambda r: list(requests[r][0])) if share_prefix \
            else list(range(len(requests)))
        layout = self.measure_layout()
        align = layout.align if share_prefix else layout.period
        b = _Batch(self.rows, align)
        while pending:
            # Of the next few requests, add the one that leaves the fewest empty rows behind
            # it: a chain whose depths fit the rows after the last one wastes none.
            best: tuple[int, int, _Plan] | None = None
            for w, r in enumerate(pending[:LOOKAHEAD]):
                plan = self._plan(b, requests[r][0], r, share_prefix)
                if plan is None:
                    continue
                waste = plan.end - b.used_rows - sum(row >= b.used_rows for _, row in plan.new)
                if best is None or waste < best[0]:
                    best = (waste, w, plan)
            if best is None:
                if not b.members:  # a request longer than self.rows: one full-size batch
                    if b.n_rows >= self.n_batch:
                        raise ContextOverflowError("a request does not fit in one scoring batch")
                    b = _Batch(self.n_batch, align)
                    continue
                self._run(b, requests, results)
                if on_progress:
                    on_progress(len(b.members))
                b = _Batch(self.rows, align)
                continue
            r = pending.pop(best[1])
            self._commit(b, requests[r], r, share_prefix, best[2])
        if b.members:
            self._run(b, requests, results)
            if on_progress:
                on_progress(len(b.members))
        return results

    def _key(self, parent: int, tok: int, r: int, share: bool) -> tuple[int, int]:
        return (parent if parent >= 0 or share else -2 - r, tok)

    def _plan(self, b: _Batch, toks: Sequence[int], r: int, share: bool) -> _Plan | None:
        """Where a request's tokens would go; None if it does not fit in this batch."""
        if len(b.members) >= self.n_seq - 1:  # the last sequence id pads
            return None
        plan = _Plan(end=b.used_rows)
        taken: set[int] = set()
        node, row = -1, -1
        for d, t in enumerate(toks):
            node = b.index.get(self._key(node, t, r, share), -1) if node >= -1 else -2
            if node >= 0:
                row = b.node_row[node]
                plan.shared.append(node)
                continue
            node = -2  # below here every token is new
            row = b.place(row, d, taken)
            if row >= b.n_rows:
                return None
            taken.add(row)
            plan.new.append((d, row))
            plan.end = max(plan.end, row + 1)
        return plan

    def _commit(self, b: _Batch, req: Request, r: int, share: bool, plan: _Plan) -> None:
        toks, start = req
        slot = len(b.members)
        b.members.append(r)
        path = list(plan.shared)
        parent = path[-1] if path else -1
        for d, row in plan.new:
            nxt = b.add(toks[d], d, row)
            b.index[self._key(parent, toks[d], r, share)] = nxt
            path.append(nxt)
            parent = nxt
        for d, nd in enumerate(path):
            b.seqs[nd].append(slot)
            if start - 1 <= d < len(toks) - 1:
                b.out[nd] = True  # its logits predict a scored token
        b.paths.append(path)

    def record(self) -> dict[str, object]:
        """What this scorer computes with, for results and telemetry: weights and layout."""
        return self.compute | (self.layout.to_dict() if self.layout else {})

    def measure_layout(self) -> Layout:
        """Decode a probe text at row offsets 0..max(PERIODS) (once per scorer) and compare.

        The shift's period depends on the SIMD width (on AVX512, Q4_1 rows at offset 8 still
        move 0.13 nats; at 16 they match exactly), so the period is measured too.
        """
        if self.layout is not None:
            return self.layout
        toks = [self.rt.bos, *self.rt.tokenize(LAYOUT_PROBE, add_bos=False)]
        toks = toks[: self.n_batch - PERIODS[-1]]
        n, tgt = len(toks), np.asarray(toks[1:])
        ref: np.ndarray | None = None
        shifts = [0.0]
        for off in range(PERIODS[-1] + 1):
            tok = np.r_[np.full(off, toks[0]), toks]
            pos = np.r_[np.arange(off), np.arange(n)]
            out = np.r_[np.zeros(off, bool), np.ones(n - 1, bool), [False]]
            self._decode(tok, pos, out, [[self.n_seq - 1]] * off + [[0]] * n)
            logits = self._logits(n - 1)
            lp = logits[np.arange(n - 1), tgt] - _logsumexp_rows(logits)
            if ref is None:
                ref = lp
            else:
                shifts.append(float(np.abs(lp - ref).max()))
        period, shift = row_period(shifts), max(shifts)
        self.layout = Layout(shift, period if shift > LAYOUT_TOL else 1, period)
        return self.layout

    def _decode(self, tok: np.ndarray, pos: np.ndarray, out: np.ndarray, seqs: Sequence[Sequence[int]]) -> None:
        """One llama_decode of these rows on an emptied cache."""
        import llama_cpp

        n = len(tok)
        bt = self.batch
        bt.n_tokens = n
        np.ctypeslib.as_array(bt.token, shape=(n,))[:] = tok
        np.ctypeslib.as_array(bt.pos, shape=(n,))[:] = pos
        np.ctypeslib.as_array(bt.logits, shape=(n,))[:] = out
        nseq = np.ctypeslib.as_array(bt.n_seq_id, shape=(n,))
        for i, ss in enumerate(seqs):
            nseq[i] = len(ss)
            row = bt.seq_id[i]
            for j, sid in enumerate(ss):
                row[j] = sid
        llama_cpp.llama_memory_clear(self.mem, True)
        rc = llama_cpp.llama_decode(self.ctx, bt)
        if rc != 0:
            raise EdgeError(f"llama_decode failed (code {rc}) while scoring; try a smaller batch")

    def _logits(self, n_out: int) -> np.ndarray:
        """The requested rows' logits, in batch-row order (a view into llama.cpp's buffer)."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def _run(self, b: _Batch, requests: Sequence[Request], results: list[np.ndarray]) -> None:
        n = b.used_rows
        node_at = np.full(n, -1)
        node_at[b.node_row] = np.arange(len(b.node_row))
        pad = node_at < 0
        tok = np.full(n, self.rt.bos)
        pos = np.empty(n, dtype=np.int64)
        out = np.zeros(n, dtype=bool)
        real = ~pad
        tok[real] = np.asarray(b.tokens)[node_at[real]]
        pos[real] = np.asarray(b.depth)[node_at[real]]
        out[real] = np.asarray(b.out)[node_at[real]]
        pos[pad] = np.arange(int(pad.sum()))  # one spare sequence, positions increasing
        self._decode(tok, pos, out, [b.seqs[k] if k >= 0 else [self.n_seq - 1] for k in node_at])
        n_pad = int(pad.sum())
        self.tokens_decoded += n - n_pad
        self.pad_tokens += n_pad
        # llama.cpp returns the requested logits in batch-row order
        out_rows = np.flatnonzero(out)
        out_of_node = np.full(len(b.tokens), -1)
        out_of_node[node_at[out_rows]] = np.arange(len(out_rows))
        logits = self._logits(len(out_rows))
        lse = _logsumexp_rows(logits)
        for slot, r in enumerate(b.members):
            toks, start = requests[r]
            rows = out_of_node[b.paths[slot][start - 1 : len(toks) - 1]]
            tgt = np.asarray(toks[start:])
            results[r] = logits[rows, tgt].astype(np.float64) - lse[rows]

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Raw next-token logits after each prefix of one text: (len − 1, n_vocab), a view
        into llama.cpp's buffer that the next decode overwrites."""
        self._sync_runtime_cvec()
        n = len(tokens)
        if not 2 <= n <= self.n_batch:
            raise ContextOverflowError(f"a text of {n} tokens; the scorer takes 2 to {self.n_batch}")
        out = np.ones(n, dtype=bool)
        out[-1] = False
        self._decode(np.asarray(tokens), np.arange(n), out, [[0]] * n)
        self.tokens_decoded += n
        return self._logits(n - 1)

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        llamacpp.free_context(getattr(self, "ctx", None))
        self.ctx = None
        llamacpp.free_model(getattr(self, "_model", None))
        self._model = None

    def __enter__(self) -> BatchScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
