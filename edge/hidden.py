"""Per-layer residual stream from llama.cpp, for many short texts at once.

The numpy engine (edge.engine) returns every layer's hidden state too, but one sequence at
a time in float32 numpy: ~0.3 s per 20-token sentence here, ~15 min for CrowS-Pairs' 3016
sentences on a busy 2-core machine. llama.cpp computes the same stream batched; its
graph-evaluation callback (cb_eval) hands over each layer's output tensor `l_out-N` (the
residual stream after layer N, after any control vector: where edge.engine's `hidden[N]`
is) as it is computed. Many texts share one llama_decode as separate sequences (the KV
cache masks attention by sequence id), and logits are requested for every row so the last
layer keeps all rows (llama.cpp otherwise drops rows nobody reads before the last layer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from edge.errors import ContextOverflowError, EdgeError


class HiddenStates:
    """A llama.cpp context on a model file that records every layer's output per row."""

    PREFIX = b"l_out-"
    NORM = b"result_norm"  # the last layer's output after output_norm: what the head reads

    def __init__(self, model_path: str | os.PathLike[str], *, threads: int = 2, n_batch: int = 512,
                 n_seq: int = 64) -> None:
        import llama_cpp

        from edge.llamacpp import ggml_tensor_lib, load_model, new_context

        self._lib = ggml_tensor_lib()
        self.model = load_model(model_path)
        self.n_layers = int(llama_cpp.llama_model_n_layer(self.model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.n_batch, self.n_seq = n_batch, min(n_seq, n_batch)  # llama.cpp needs n_seq ≤ n_ctx
        self._rows: dict[int, np.ndarray] = {}
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)  # kept alive
        # one ubatch per decode (n_ubatch = n_batch): one callback per layer
        self.ctx = new_context(self.model, n_ctx=n_batch, threads=threads, n_batch=n_batch,
                               n_seq=self.n_seq, kv_unified=True, cb_eval=self._cb)
        if not self.ctx:
            self.close()
            raise EdgeError("llama.cpp could not create a context for hidden states; free some memory")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def _on_tensor(self, t: int, ask: bool, _user: int) -> bool:
        name = self._lib.ggml_get_name(t) or b""
        if not (name.startswith(self.PREFIX) or name == self.NORM):
            return not ask  # ask: not wanted; otherwise keep computing
        if ask:
            return True
        n = int(self._lib.ggml_nelements(t))
        if not self._lib.ggml_is_contiguous(t) or n % self.n_embd:
            raise EdgeError(f"llama.cpp's {name.decode()} is not a contiguous (rows, n_embd) tensor")
        ptr = self._lib.ggml_get_data_f32(t)
        key = self.n_layers if name == self.NORM else int(name[len(self.PREFIX):])
        self._rows[key] = np.ctypeslib.as_array(ptr, shape=(n // self.n_embd, self.n_embd)).copy()
        return True

    def token_means(self, texts: Sequence[Sequence[int]], *, skip: int = 1,
                    on_progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(n_texts, n_layers, n_embd): each layer's output averaged over each text's tokens
        from index `skip` on (1: leave out the BOS, whose state is the same for every text)."""
        for i, t in enumerate(texts):
            if not skip < len(t) <= self.n_batch:
                raise ContextOverflowError(f"text {i} has {len(t)} tokens; 2..{self.n_batch} fit")
        return self.position_means(texts, [range(skip, len(t)) for t in texts], on_progress=on_progress)

    def head_inputs(self, texts: Sequence[Sequence[int]], *,
                    on_progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Each text's final normalized state at every position (len, n_embd): what the
        output head reads, row p predicting token p + 1."""
        out: list[np.ndarray] = [np.zeros((0, self.n_embd), np.float32)] * len(texts)
        for group, at in self._read(texts):
            if self.n_layers not in self._rows:
                raise EdgeError("llama.cpp did not hand over the final normalized state (result_norm)")
            for i, a in zip(group, at, strict=True):
                out[i] = self._rows[self.n_layers][a:a + len(texts[i])].copy()
            if on_progress:
                on_progress(len(group))
        return out

    def position_means(self, texts: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], *,
                       on_progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(n_texts, n_layers, n_embd): each layer's output averaged over the given token
        positions of each text (zeros for a text given none)."""
        out = np.zeros((len(texts), self.n_layers, self.n_embd), dtype=np.float32)
        for group, at in self._read(texts):
            for i, a in zip(group, at, strict=True):
                pos = np.asarray(positions[i], dtype=np.int64)
                if len(pos):
                    for il in range(self.n_layers):
                        out[i, il] = self._rows[il][a + pos].mean(0)
            if on_progress:
                on_progress(len(group))
        return out

    def _read(self, texts: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], list[int]]]:
        """Decode the texts as many at a time as fit; after each decode, its texts' indices
        and where each one's rows start in self._rows."""
        for i, t in enumerate(texts):
            if len(t) > self.n_batch:
                raise ContextOverflowError(f"text {i} has {len(t)} tokens; {self.n_batch} fit")
        pending = list(range(len(texts)))
        while pending:
            group, rows = [], 0
            while pending and len(group) < self.n_seq and rows + len(texts[pending[0]]) <= self.n_batch:
                rows += len(texts[pending[0]])
                group.append(pending.pop(0))
            self._decode([texts[i] for i in group])
            yield group, np.concatenate([[0], np.cumsum([len(texts[i]) for i in group])[:-1]]).tolist()

    def _decode(self, seqs: Sequence[Sequence[int]]) -> None:
        import llama_cpp

        b = self.batch
        toks = np.concatenate([np.asarray(s, np.int32) for s in seqs])
        pos = np.concatenate([np.arange(len(s), dtype=np.int32) for s in seqs])
        sid = np.concatenate([np.full(len(s), k, np.int32) for k, s in enumerate(seqs)])
        n = len(toks)
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = toks
        np.ctypeslib.as_array(b.pos, shape=(n,))[:] = pos
        np.ctypeslib.as_array(b.logits, shape=(n,))[:] = 1  # keep every row through the last layer
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):
            b.seq_id[i][0] = int(sid[i])
        self._rows.clear()
        llama_cpp.llama_memory_clear(self.mem, True)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgeError(f"llama_decode failed (code {rc}) while reading hidden states")
        if any(il not in self._rows for il in range(self.n_layers)) or any(len(r) != n for r in self._rows.values()):
            raise EdgeError("llama.cpp did not hand over every layer's output for every row")

    def close(self) -> None:
        import llama_cpp

        from edge.llamacpp import free_context, free_model

        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            free_context(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            free_model(self.model)
            self.model = None

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
