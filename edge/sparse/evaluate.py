"""Quality of a sparse model the way it runs (TEAL's protocol): in each chunk the context
half is processed dense (prefill), the scored half sparse (decode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge.engine.model import Backend, Engine, KVCache
from edge.errors import SparseProfileError
from edge.logprobs import kl_rows, log_softmax


@dataclass
class HalfChunks:
    """Token chunks with the dense context half already in each chunk's KV cache."""

    chunks: list[list[int]]
    half: int
    caches: list[KVCache]
    dense_logits: list[np.ndarray]  # dense logits of each scored half (reference for KL)

    @classmethod
    def prepare(cls, engine: Engine, tokens: Sequence[int], chunk: int, max_chunks: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> HalfChunks:
        chunks = [list(tokens[i : i + chunk]) for i in range(0, len(tokens) - chunk + 1, chunk)]
        chunks = chunks[:max_chunks] if max_chunks else chunks
        if not chunks:
            raise SparseProfileError(
                f"the text is {len(tokens)} tokens; scoring needs at least one chunk of {chunk}")
        half = chunk // 2
        caches, ref = [], []
        for i, c in enumerate(chunks):
            cache = KVCache(engine.config, chunk)
            engine.forward(c[:half], cache=cache, last_only=True)
            ref.append(engine.forward(c[half:], cache=cache).logits)
            cache.truncate(half)
            caches.append(cache)
            if progress:
                progress(i + 1, len(chunks))
        return cls(chunks, half, caches, ref)

    def run(self, engine: Engine, backend: Backend | None) -> list[np.ndarray]:
        out = []
        for c, cache in zip(self.chunks, self.caches, strict=True):
            cache.truncate(self.half)
            out.append(engine.forward(c[self.half :], cache=cache, backend=backend).logits)
            cache.truncate(self.half)
        return out

    def kl(self, engine: Engine, backend: Backend | None) -> float:
        """Mean KL(dense ‖ sparse) over every scored position."""
        logits = self.run(engine, backend)
        return float(np.mean(np.concatenate([kl_rows(d, s) for d, s in zip(self.dense_logits, logits, strict=True)])))

    def nll(self, logits: list[np.ndarray]) -> np.ndarray:
        """Negative log-likelihood of each scored token given everything before it."""
        out = []
        for c, lg in zip(self.chunks, logits, strict=True):
            targets = np.asarray(c[self.half + 1 :])
            lp = log_softmax(lg[:-1])
            out.append(-lp[np.arange(len(targets)), targets])
        return np.concatenate(out)


@dataclass
class SparsePpl:
    ppl: float
    dense_ppl: float
    kl: float  # mean KL(dense ‖ sparse) on the scored halves
    n_scored: int
    n_chunks: int


def sparse_perplexity(engine: Engine, text_or_tokens: str | Sequence[int], backend: Backend | None,
                      *, chunk: int = 512, max_chunks: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> SparsePpl:
    """Perplexity of the scored halves, dense and with `backend`, measured in the same run."""
    tokens = engine.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
    hc = HalfChunks.prepare(engine, tokens, chunk, max_chunks, progress)
    dense_nll = hc.nll(hc.dense_logits)
    logits = hc.run(engine, backend) if backend is not None else hc.dense_logits
    nll = hc.nll(logits)
    kl = np.concatenate([kl_rows(d, s) for d, s in zip(hc.dense_logits, logits, strict=True)])
    return SparsePpl(ppl=float(np.exp(nll.mean())), dense_ppl=float(np.exp(dense_nll.mean())),
                     kl=float(kl.mean()), n_scored=int(nll.size), n_chunks=len(hc.chunks))


def profile_perplexity(model: str | None, text: str, sparse_profile: str, *, chunk: int = 512,
                       max_chunks: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> SparsePpl:
    """`edge eval ppl MODEL --text FILE --sparse-profile P` in one call: load the native
    engine and the profile (sha-checked), then `sparse_perplexity` on `text`."""
    from edge.engine.generate import NativeGenerator

    gen = NativeGenerator.load(model, sparse_profile)
    return sparse_perplexity(gen.model, text, gen.backend, chunk=chunk, max_chunks=max_chunks,
                             progress=progress)
