"""Perplexity, and KL divergence against a base model, the way llama-perplexity computes them.

The text is tokenized once and cut into non-overlapping n_ctx chunks; each chunk is
evaluated from an empty cache (its first token replaced by BOS when the model adds one),
and only the second half of each chunk is scored, so every scored token has at least
n_ctx/2 tokens of context. The scoring works on any `LogitsFn` (tokens → logits per
position), so another logits source (a sparse engine, say) plugs in unchanged.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BadOptionError
from edge.logprobs import log_softmax

# (tokens, first): tokens evaluated from position 0 on an empty cache → logits of positions
# first..len(tokens)-1, shape (len(tokens) - first, n_vocab). `first` lets a source skip
# the output layer for positions nobody scores (half the work of the output matmul).
LogitsFn = Callable[[Sequence[int], int], np.ndarray]
Progress = Callable[[str, int, int], None]


@dataclass
class TokenScores:
    """Per scored token: negative log-likelihood, and against a base model KL and top-1."""

    nll: list[np.ndarray] = field(default_factory=list)
    base_nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)

    def cat(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class PerplexityResult:
    model: str
    n_ctx: int
    n_chunks: int
    n_tokens: int          # tokens in the text
    n_scored: int          # tokens whose likelihood was scored
    ppl: float
    ppl_err: float         # ± one standard error, as llama-perplexity prints it
    seconds: float = 0.0
    base: str | None = None
    base_ppl: float | None = None
    delta_ppl: float | None = None          # PPL(model) - PPL(base)
    ln_ppl_ratio: float | None = None       # mean ln(PPL(model)/PPL(base))
    ln_ppl_ratio_err: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None     # fraction of positions with the same argmax
    top1_agreement_err: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    mean = float(x.mean())
    var = float((x * x).mean() - mean * mean)
    return mean, math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0


def score_chunks(tokens: Sequence[int], n_ctx: int, logits_fn: LogitsFn, *, bos: int | None = None,
                 base_fn: LogitsFn | None = None, max_chunks: int | None = None,
                 progress: Progress | None = None) -> TokenScores:
    """Score the second half of every full n_ctx chunk of `tokens` (llama-perplexity's scheme)."""
    n_chunks = len(tokens) // n_ctx
    if n_chunks < 1 or len(tokens) < 2 * n_ctx:
        raise BadOptionError(
            f"the text is {len(tokens)} tokens; perplexity at --ctx {n_ctx} needs at least "
            f"{2 * n_ctx} (two chunks): use a longer text or a smaller --ctx"
        )
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)  # llama-perplexity's --chunks
    first = n_ctx // 2
    out = TokenScores()
    for c in range(n_chunks):
        if progress:
            progress("chunk", c, n_chunks)
        chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos  # as llama-perplexity: every chunk starts like a document
        target = np.asarray(chunk[first + 1 :])
        rows = np.arange(len(target))
        lp = log_softmax(logits_fn(chunk, first)[: n_ctx - 1 - first])
        out.nll.append(-lp[rows, target])
        if base_fn is not None:
            blp = log_softmax(base_fn(chunk, first)[: n_ctx - 1 - first])
            out.base_nll.append(-blp[rows, target])
            out.kld.append((np.exp(blp) * (blp - lp)).sum(axis=1))  # KL(base ‖ model)
            out.same_top.append((blp.argmax(axis=1) == lp.argmax(axis=1)).astype(np.float64))
    if progress:
        progress("chunk", n_chunks, n_chunks)
    return out


def summarize(scores: TokenScores, *, model: str, n_ctx: int, n_tokens: int,
              base: str | None = None) -> PerplexityResult:
    nll = scores.cat("nll")
    mean, err = _mean_err(nll)
    ppl = math.exp(mean)
    r = PerplexityResult(model=model, n_ctx=n_ctx, n_chunks=len(scores.nll), n_tokens=n_tokens,
                         n_scored=len(nll), ppl=ppl, ppl_err=err * ppl)
    if scores.kld:
        base_nll, kld, same = scores.cat("base_nll"), scores.cat("kld"), scores.cat("same_top")
        r.base = base
        r.base_ppl = math.exp(float(base_nll.mean()))
        r.delta_ppl = r.ppl - r.base_ppl
        r.ln_ppl_ratio, r.ln_ppl_ratio_err = _mean_err(nll - base_nll)
        r.kld_mean, r.kld_err = _mean_err(kld)
        r.kld_median = float(np.median(kld))
        r.kld_p99 = float(np.percentile(kld, 99))
        r.kld_max = float(kld.max())
        r.top1_agreement, r.top1_agreement_err = _mean_err(same)
    return r


def runtime_logits(rt: Any) -> LogitsFn:
    """Logits of a loaded edge Runtime (llama.cpp) from an empty KV cache, positions ≥ first."""
    return rt.logits


def perplexity(model: str | os.PathLike[str] | None, text: str | os.PathLike[str], *, n_ctx: int = 512,
               base: str | os.PathLike[str] | None = None, threads: int | None = None,
               max_chunks: int | None = None, progress: Progress | None = None,
               log: bool = True) -> PerplexityResult:
    """Perplexity of MODEL on the text file; with `base`, KL divergence and top-1 agreement too."""
    from edge import telemetry
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    path = Path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadOptionError(f"cannot read --text {path} ({e}); give a UTF-8 text file") from None
    t0 = time.perf_counter()
    cfg = RuntimeConfig(n_ctx=n_ctx, threads=threads, n_batch=min(512, n_ctx))
    rt = open_runtime(model, cfg)
    brt = None
    try:
        if rt.n_ctx < n_ctx:
            raise BadOptionError(f"--ctx {n_ctx} exceeds the model's context ({rt.n_ctx})")
        tokens = rt.tokenize(content, add_bos=True)
        bos = rt.llm.token_bos() if rt.llm._model.add_bos_token() else None
        base_fn = None
        if base is not None:
            brt = open_runtime(base, RuntimeConfig(n_ctx=n_ctx, threads=threads, n_batch=cfg.n_batch))
            if brt.n_vocab != rt.n_vocab or brt.tokenize(content, add_bos=True) != tokens:
                raise BadOptionError(
                    f"--base {base} does not share {rt.path.name}'s vocabulary; KL divergence needs the "
                    "same tokenizer (compare a quantization with the model it came from)"
                )
            base_fn = runtime_logits(brt)
        scores = score_chunks(tokens, n_ctx, runtime_logits(rt), bos=bos, base_fn=base_fn,
                              max_chunks=max_chunks, progress=progress)
        result = summarize(scores, model=str(rt.path), n_ctx=n_ctx, n_tokens=len(tokens),
                           base=str(brt.path) if brt else None)
        result.seconds = time.perf_counter() - t0
        if log:
            metrics = {k: v for k, v in result.to_dict().items() if k not in ("model", "base")}
            telemetry.log("eval", {"metric": "perplexity", "text": str(path), **metrics}, model=rt.info,
                          config=rt.config_record(base=result.base))
        return result
    finally:
        rt.close()
        if brt is not None:
            brt.close()
