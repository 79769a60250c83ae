"""`edge bias mitigate --method learn`: a low-rank edit of what the top layers write,
fitted by gradient to shrink every calibration pair's log-likelihood difference.

Per edited layer l (the top `layers`: by default the last alone), what attention and the
MLP write gets x ↦ x − U_l (V_lᵀ x) (+ b_l after the MLP), rank r: the form `edge.fold`
folds into attn_output, ffn_down and ffn_down's bias, so the result is a plain GGUF that
runs in any llama.cpp at no extra cost. Adam minimises the calibration pairs' mean squared difference
(each pair toward 0 whatever its sign or category, so a category that leans the other way
is not pushed further) plus β × KL(uncorrected ‖ edited) on neutral text windows; with
`objective` "means" or "balanced" it drives each category's mean difference to 0 instead
(measured in DESIGN.md, "Category means as the objective"; not yet the default). The
budget sets β: a round trains, the caller measures the fold's PPL with llama.cpp, and the
next round lowers β while the PPL rise is under half the budget (or raises it when over).
A fifth of the calibration pairs is held back as validation: each round keeps the step
where they are smallest, and the rounds' best within budget wins, so more budget is spent
only while it helps pairs the fit did not see (without it the fit overfits: on the bundled
model the calibration pairs shrank by 3/4 where held-out ones shrank by 1/5).

The model runs in torch (an optional extra: `pip install 'edge[learn]'`) on the compute
weights in float32. It holds the edited layers, the embedding and the head; the layers below
the first edited one are read once a pass, a layer at a time, every sequence through one
before the next is dequantized (TorchLlama's `keep_from`), so a Llama-2-7B's fit holds about
2.5 GiB of weights, not 25 (`check_memory` adds the pairs' kept rows).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BadOptionError, InsufficientMemoryError
from edge.fold import FoldPlan, ResidualEdit
from edge.paths import atomic_path

Event = Callable[[str, dict[str, Any]], None]
# (plan, note) → (relative PPL rise, KL vs uncorrected) on the run's neutral text, by llama.cpp
Measure = Callable[[FoldPlan, str], tuple[float, float]]
# training pairs' indices → more pairs (token lists, and their categories) built from those pairs alone
Augment = Callable[[np.ndarray], tuple[list[list[int]], list[list[int]], list[str]]]


@dataclass
class LearnConfig:
    rank: int = 4
    first_layer: int | None = None  # None: from `layers`
    # how many of the top layers are edited when first_layer is unset (None: the upper half).
    # Measured on 5 splits, the last layer alone generalised best for either objective, at
    # half the time a step (DESIGN.md "`--learn-objective pairs --learn-layers 1` on 5 splits")
    layers: int | None = 1
    beta: float = 1.0  # the first round's weight of the neutral KL (×100)
    steps: int = 200  # Adam steps of the first round
    more_steps: int = 100  # of each later round
    # a cap: min_gain and fill end the rounds first. At 3, split 3 of the 5-split run stopped
    # while its validation pairs still fell 0.024 a round; a 4th made its held-out change
    # significant (−2.5 [−5.0, +0.4] → −3.2 [−6.0, −0.4], r90); ~80 s a round
    rounds: int = 5
    beta_factor: float = 0.3  # β × this while the PPL rise is under fill × budget
    fill: float = 0.5
    # stop lowering β once a round cut the validation pairs by less than this (their
    # uncorrected mean = 1): measured, lower β hardly moved the PPL and what held the
    # edit back was generalisation, so a further round only spends ~5 minutes
    min_gain: float = 0.02
    pairs: int = 16  # calibration pairs per step
    lr: float = 3e-3
    val_frac: float = 0.2
    eval_every: int = 25
    neutral_windows: int = 128
    window: int = 32  # tokens a neutral window
    # counterfactual pairs per training pair (bias.swap: its context, another same-category
    # pair's group terms), added to the training pairs; validation stays original pairs
    swaps: int = 0
    # what the pairs' term drives to 0: "pairs", every pair's squared difference;
    # "pairs-balanced", the same with every category weighted alike (a category's own pairs
    # shrink however few it has, whatever its calibration mean's sign); "means",
    # each category's mean difference squared, weighted by its pairs (the figure the
    # per-category judgement reads); "balanced", the same with every category weighted
    # alike. The step and round are then chosen on the validation pairs' same measure.
    objective: str = "pairs"
    # which part of a pair's difference the pairs' term (and the validation measure) reads:
    # "sentence", every token from where the pair parts; "rest", the tokens the two share
    # alone, each conditioned on its own rewrite (the CrowS-Pairs authors' p(U | M); the
    # rewritten tokens' own log-probability, mostly how common a group's word is, is left out)
    part: str = "sentence"
    # the learning rate within a round: "constant", or "cosine" (linear warm-up over its
    # first tenth, then a cosine to 0)
    schedule: str = "constant"
    # the round's kept step: "val", the one with the smallest validation measure (its start
    # included); "last", its last step (with "cosine": where the rate has settled). The
    # validation measure of "balanced" rests on ~10 pairs a category and jumped 0.3-0.9
    # between evaluations, so its minimum picked an overshoot; settled fits, measured,
    # memorise instead (DESIGN.md "A settled step instead of a chosen one")
    pick: str = "val"
    # weight of a hinge on each category's mean change (training pairs) moving away from
    # neutral: away is down for a category whose calibration mean is below 0 by ≥ 2 SE, up
    # for every other (a CrowS pair's first sentence is the stereotype). 0: off. Why: the
    # pairs objective's fits pushed small categories away systematically (age on 15 of 20)
    guard: float = 0.0
    seed: int = 0

    @classmethod
    def for_objective(cls, objective: str = "pairs", layers: int | None = 1) -> LearnConfig:
        """The settings measured for `objective`: "pairs" as the defaults; the category
        objectives one round at a cosine rate, keeping its last step (their validation
        measure is too noisy to choose a step or a round by)."""
        if objective in PAIR_OBJECTIVES:
            return cls(objective=objective, layers=layers)
        return cls(objective=objective, schedule="cosine", pick="last", rounds=1, layers=layers)

    def start(self, n_layers: int) -> int:
        """The first edited layer of a model of n_layers (never the embedding's layer 0)."""
        if self.first_layer is not None:
            start = self.first_layer
        else:
            start = n_layers // 2 if self.layers is None else n_layers - self.layers
        start = max(1, start)
        if start >= n_layers:
            raise BadOptionError(f"learn: first layer {start} is past the model's {n_layers} layers")
        return start

    def validate(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.rounds < 1 or self.pairs < 1 or self.swaps < 0 or self.guard < 0:
            raise BadOptionError("learn: rank, steps, rounds and pairs must be ≥ 1, swaps and guard ≥ 0")
        if self.layers is not None and self.layers < 1:
            raise BadOptionError("learn: layers must be ≥ 1")
        if not 0 < self.val_frac < 1 or not 0 < self.beta_factor < 1:
            raise BadOptionError("learn: val_frac and beta_factor must be in (0, 1)")
        for name, allowed in (("objective", OBJECTIVES), ("schedule", SCHEDULES), ("pick", PICKS), ("part", PARTS)):
            if getattr(self, name) not in allowed:
                raise BadOptionError(f"learn: {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")


OBJECTIVES = ("pairs", "pairs-balanced", "means", "balanced")
PAIR_OBJECTIVES = ("pairs", "pairs-balanced")  # every pair toward 0, not its category's mean
SCHEDULES = ("constant", "cosine")
PICKS = ("val", "last")
PARTS = ("sentence", "rest")


def rate(k: int, steps: int, schedule: str) -> float:
    """The learning rate's factor at step k (0-based) of a round of `steps`."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 10)
    if k < warm:
        return (k + 1) / warm
    return float(0.5 * (1 + np.cos(np.pi * (k - warm + 1) / max(1, steps - warm + 1))))


def category_objective(d: np.ndarray, groups: np.ndarray, balanced: bool) -> tuple[float, np.ndarray]:
    """Σ_c w_c · mean_c(d)² over the categories in `groups` (w_c: their share of the pairs,
    or 1/C when balanced), and each pair's coefficient k_i such that the objective's
    gradient is Σ_i k_i ∇d_i / n: a batch of pairs drawn uniformly then gives an unbiased
    estimate of it, with the category means taken from a table rather than the batch
    (a batch of 16 holds too few pairs of a category to estimate its mean)."""
    n = len(d)
    cats, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    means = np.bincount(inv, weights=d, minlength=len(cats)) / counts
    w = np.full(len(cats), 1 / len(cats)) if balanced else counts / n
    # ∂/∂d_i of w_c m_c² is 2 w_c m_c / n_c; × n so that the batch mean estimates it
    return float(np.sum(w * means ** 2)), (2 * w * means / counts * n)[inv]


def batch_coefficients(d: np.ndarray, groups: np.ndarray, j: np.ndarray, balanced: bool) -> np.ndarray:
    """The coefficients k of the drawn pairs j such that Σ_i k_i ∇d_i estimates the category
    objective's gradient without bias when j draws uniformly within each category, however
    many a category (each drawn pair stands for n_c / b_c of its category's pairs)."""
    k = category_objective(d, groups, balanced)[1]  # k_i / n is ∂objective/∂d_i
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    b = np.bincount(inv[j], minlength=len(counts))
    return k[j] * counts[inv[j]] / (len(d) * b[inv[j]])


def guard_signs(d: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Per category, the sign of a change away from neutral: −1 where its pairs' mean is
    below 0 by at least 2 standard errors (anti-stereotypical), else +1 (a CrowS pair's
    first sentence is the stereotype: what a model leans toward when its few pairs say little)."""
    out = {}
    for g in np.unique(groups):
        x = d[groups == g]
        se = float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else np.inf
        out[str(g)] = -1.0 if np.mean(x) < -2 * se else 1.0
    return out


def balanced_weights(groups: np.ndarray) -> np.ndarray:
    """Each pair's weight in "pairs-balanced": 1 / (categories × its category's pairs here),
    so Σ w d² is the mean over categories of their mean squared difference; for a batch that
    draws the same number of pairs from every category, an unbiased estimate of it."""
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1 / (len(counts) * counts[inv])


@dataclass
class LearnRound:
    round: int
    beta: float
    steps: int  # trained in this round
    best_step: int  # the step whose parameters the round kept (LearnConfig.pick): an earlier round's
    # when this one found nothing better, 0 the uncorrected start
    val_d2: float  # validation pairs' objective term ("pairs": mean squared difference), × its uncorrected value
    train_d2: float  # the same on the training pairs, at best_step
    ppl_increase: float
    kl: float
    seconds: float


@dataclass
class LearnResult:
    plan: FoldPlan | None  # None: no round stayed within the budget
    rounds: list[LearnRound] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # each round's fold note (its GGUF's provenance)
    chosen: int | None = None
    first_layer: int = 0
    train_pairs: int = 0
    swapped_pairs: int = 0  # counterfactual pairs added to the training pairs
    val_pairs: int = 0
    agreement: float = 0.0  # max |torch − reference| pair difference on the checked pairs (nats)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("plan", "notes")}
        d["rank"] = None if self.plan is None else max(e.rank for e in self.plan.layers.values())
        return d


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BadOptionError("--method learn needs torch: pip install 'edge[learn]' (or pip install torch)") from None
    return torch


def _torch(x: np.ndarray) -> Any:
    """A float32 array as a tensor; the GGUF's own F32 tensors are read-only maps, of which
    torch wants a copy."""
    return import_torch().from_numpy(x if x.flags.writeable else x.copy())


def check_memory(path: Path, available: int | None = None, rows: int = 0, keep_from: int = 0,
                 vocab_rows: int = 0) -> int:
    """Bytes the float32 torch model needs (TorchLlama with `keep_from`: the layers from it up
    held, one below it at a time), with `rows` positions' last-layer inputs kept (a split
    run's every pair: 2 × n_embd floats each, ~2 GB for CrowS on Llama-2-7B) and the stream a
    pass carries for them, and `vocab_rows` positions' log-probs over the vocabulary (the
    neutral text's reference, which the KL is taken against: on the bundled model more than
    its weights); raise if this machine cannot hold it."""
    from edge.engine.weights import WeightReader
    from edge.memory.fit import MemorySnapshot

    r = WeightReader(path)
    n_layers, n_embd = r.args.n_layers, r.args.n_embd
    per_layer = [r.layer_elements(il) for il in range(n_layers)]
    rest = sum(int(t.n_elements) for name, t in r.tensors.items() if not name.startswith("blk."))
    keep_from = max(0, min(keep_from, n_layers))
    held = sum(per_layer[keep_from:]) + max(per_layer[:keep_from], default=0)
    # weights, activations and gradients; rows; reference log-probs
    need = 4 * (rest + held) + (512 << 20) + 12 * n_embd * rows + 4 * r.args.n_vocab * vocab_rows
    snap = MemorySnapshot.read()
    avail = snap.available - snap.margin if available is None else available
    if snap.readable and need > avail:
        what = "the model" if keep_from == 0 else "the edited layers, the head and one layer below them"
        kept = " with its pairs' last-layer inputs" if rows else ""
        raise InsufficientMemoryError(
            f"--method learn holds {what} in float32{kept}: {need / 2**30:.1f} GiB, and this machine has "
            f"{avail / 2**30:.1f} GiB available; fit on a larger machine and copy the GGUF it writes")
    return need


class TorchLlama:
    """A GGUF's Llama forward in torch (float32), with an edit of what each layer writes."""

    def __init__(self, path: Path, arithmetic: str = "exact", keep_from: int = 0) -> None:
        """arithmetic "exact": the dequantized weights' own products; "llama.cpp": as
        llama.cpp's CPU backend computes on this file (bias.arith: 8-bit activations, an f16
        KV cache), so that scores carry the systematic part of what its arithmetic adds (the
        chaotic rest re-rolls with any bit: bias.arith.DeviceSpread). `keep_from`: the first
        layer held for the object's life (the edited ones); a layer below it is dequantized
        when a pass reaches it and dropped after, so a 7B holds the head and a layer or two,
        not 4 bytes a parameter."""
        torch = import_torch()
        from edge.engine.weights import LINEAR_NAMES, WeightReader, _tensor_keys, rope_inv_freq

        if arithmetic not in ("exact", "llama.cpp"):
            raise ValueError(f"arithmetic is 'exact' or 'llama.cpp', not {arithmetic!r}")
        self._reader = r = WeightReader(path)
        self.args = a = r.args
        self.n_layers, self.n_embd, self.eps = a.n_layers, a.n_embd, a.rms_eps
        self.keep_from = max(0, min(keep_from, a.n_layers))
        self.layers = {il: self._read(il) for il in range(self.keep_from, a.n_layers)}
        self._held: tuple[int, Any] | None = None  # the one lower layer a pass is in
        w = r.weights(layers=False)
        self.inv = torch.tensor(rope_inv_freq(a, w.rope_freqs, w.rope_freq_scale), dtype=torch.float32)
        self.emb, self.onorm = _torch(w.tok_embd), _torch(w.output_norm)
        self.out = self.emb if w.output is w.tok_embd else _torch(w.output)
        self.arith = None
        if arithmetic == "llama.cpp":
            from bias.arith import file_arith

            keys = _tensor_keys()
            names = {(il, k): keys[k].format(bid=il) + ".weight" for il in range(a.n_layers) for k in LINEAR_NAMES}
            names["output"] = r.output_name
            self.arith = file_arith(Path(path), names)
        # each sequence's last-layer inputs at every position, kept: the splits of a run fit
        # and judge on subsets of the same sentences, so each is read through the lower layers once
        self._rows: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def _read(self, il: int) -> tuple[dict[str, Any], Any, Any]:
        lw = self._reader.layer(il)
        return {k: _torch(v) for k, v in lw.wt.items()}, _torch(lw.attn_norm), _torch(lw.ffn_norm)

    def keep(self, first: int) -> None:
        """Hold layers first.. from now on (a fit that edits them steps through them often)."""
        for il in range(max(0, first), self.keep_from):
            self.layers[il] = self._read(il)
        self.keep_from = min(self.keep_from, max(0, first))

    def layer(self, il: int) -> tuple[dict[str, Any], Any, Any]:
        """Layer il's (linear weights (in, out), attn_norm, ffn_norm): a kept one, or the
        lower layer a pass is in, read on its first use (the previous one dropped first)."""
        kept = self.layers.get(il)
        if kept is not None:
            return kept
        if self._held is None or self._held[0] != il:
            self._held = None
            self._held = (il, self._read(il))
        return self._held[1]

    def _norm(self, x: Any, g: Any) -> Any:
        torch = import_torch()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * g

    def _rope(self, x: Any, pos: Any = None) -> Any:  # adjacent pairs, as llama.cpp's NORM rope
        torch = import_torch()
        n_rot = 2 * len(self.inv)
        if pos is None:
            pos = torch.arange(x.shape[1])[None]
        ang = pos[..., None].to(torch.float32) * self.inv  # (B or 1, T, n_rot / 2)
        cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        r = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return torch.cat((r, x[..., n_rot:]), dim=-1)

    def attention(self, il: int, x: Any, pos: Any = None, mask: Any = None) -> Any:
        """What layer il's attention writes, unedited, for streams x (B, T, D) entering it:
        causal, or as `mask` (B, 1, T, T) allows with rope positions `pos` (B, T)."""
        torch = import_torch()
        a = self.args
        B, T, _ = x.shape
        hd, g = a.head_dim, a.n_head // a.n_head_kv
        an = self.layer(il)[1]
        h = self._norm(x, an)
        q = self._rope(self._mm(h, il, "q").view(B, T, a.n_head, hd), pos)
        k = self._rope(self._mm(h, il, "k").view(B, T, a.n_head_kv, hd), pos).repeat_interleave(g, dim=2)
        v = self._mm(h, il, "v").view(B, T, a.n_head_kv, hd).repeat_interleave(g, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.arith is None:
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        else:  # llama.cpp: K and V from an f16 cache, the query and softmax weights rounded to meet them
            f16 = self._f16
            allowed = torch.ones((T, T), dtype=torch.bool).tril() if mask is None else mask
            s = (f16(q) @ f16(k).transpose(-1, -2)) / hd**0.5
            att = f16(torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)) @ f16(v)
        return self._mm(att.transpose(1, 2).reshape(B, T, a.n_embd), il, "o")

    @staticmethod
    def _f16(x: Any) -> Any:
        r = x.half().float()
        return x + (r - x).detach()

    def _mm(self, x: Any, il: int, key: str) -> Any:
        """x times layer il's weight `key` (q k v o gate up down), in this model's arithmetic."""
        w = self.layer(il)[0][key]
        return x @ w if self.arith is None else self.arith[(il, key)](x, w)

    def finish(self, il: int, x: Any, wa: Any, edit: Any = None) -> Any:
        """The stream leaving layer il from the one entering it and its attention's write
        `wa`, each written part edited; per position, so x may be (N, D) rows as well."""
        F = import_torch().nn.functional
        fn = self.layer(il)[2]
        x = x + (wa if edit is None else edit(il, wa, False))
        h = self._norm(x, fn)
        wd = self._mm(F.silu(self._mm(h, il, "gate")) * self._mm(h, il, "up"), il, "down")
        return x + (wd if edit is None else edit(il, wd, True))

    def logprobs(self, x: Any) -> Any:
        h = self._norm(x, self.onorm)
        z = h @ self.out.T if self.arith is None else self.arith["output"](h, self.out.T)
        return import_torch().log_softmax(z, dim=-1)

    def forward(self, toks: Any, edit: Any = None, x0: Any = None, start: int = 0, stop: int | None = None,
                pos: Any = None, mask: Any = None) -> Any:
        """Log-probs of every next token, from the stream `x0` entering layer `start` when
        given; with `stop`, the stream entering that layer instead. `edit(il, w, down)`
        changes what layer il's attention (down False) or MLP (down True) writes."""
        x = self.emb[toks] if x0 is None else x0
        for il in range(start, self.n_layers if stop is None else stop):
            x = self.finish(il, x, self.attention(il, x, pos, mask), edit)
        self._held = None
        return x if stop is not None else self.logprobs(x)

    def lower(self, batches: list[tuple[Any, Any, Any]], stop: int) -> list[Any]:
        """Each batch's (tokens, rope positions or None, mask or None) stream entering layer
        `stop`, unedited: layer by layer, every batch through a layer before the next is
        read, so a layer below `keep_from` is dequantized once a pass (what a sequence at a
        time would do per batch). The same products as `forward(..., stop=stop)`."""
        torch = import_torch()
        with torch.no_grad():
            xs = [self.emb[t] for t, _, _ in batches]
            for il in range(stop):
                for b, (_, pos, mask) in enumerate(batches):
                    xs[b] = self.finish(il, xs[b], self.attention(il, xs[b], pos, mask))
        self._held = None
        return xs

    def streams(self, seqs: list[list[int]], stop: int, n: int = 16) -> list[Any]:
        """Each sequence's stream entering layer `stop` (unedited below it), (T, D) each."""
        out: list[Any] = [None] * len(seqs)
        order = by_length(seqs, n)
        xs = self.lower([(_batch([seqs[i] for i in ix])[0], None, None) for ix in order], stop)
        for ix, x in zip(order, xs, strict=True):
            for b, i in enumerate(ix):
                out[i] = x[b, : len(seqs[i])].clone()
        return out

    def seq_ll(self, seqs: list[list[int]], edit: Any = None, streams: list[Any] | None = None,
               start: int = 0, skip: list[list[int]] | None = None) -> tuple[Any, Any, Any]:
        """Summed log-likelihood of each sequence (tokens after the first), the log-probs and
        their mask; `streams` (one (T, D) tensor per sequence) enter layer `start`; the
        positions in skip[i] (position p predicts token p + 1) are left out of the sums."""
        toks, tgt, mask = _batch(seqs)
        for i, ps in enumerate(skip or []):
            mask[i, ps] = 0
        x0 = None if streams is None else _pad(streams)
        lp = self.forward(toks, edit, x0, start if streams is not None else 0)[:, :-1]
        return (lp.gather(-1, tgt[..., None])[..., 0] * mask).sum(-1), lp, mask

    def rows(self, seqs: list[list[int]], first: list[int], n: int = 16,
             skip: list[list[int]] | None = None) -> Rows:
        """The last layer's Rows of `seqs`: sequence i's positions first[i] .. len − 2, but
        those in skip[i] (position p predicts token p + 1)."""
        torch = import_torch()
        self.read_rows(seqs, n=n)
        parts = []
        for i, (s, f) in enumerate(zip(seqs, first, strict=True)):
            x, wa = self._rows[tuple(s)]
            left = set() if skip is None else set(skip[i])
            keep = torch.tensor([p for p in range(f, len(s) - 1) if p not in left], dtype=torch.long)
            parts.append((x[keep], wa[keep], torch.tensor(s, dtype=torch.long)[keep + 1]))
        return Rows(*(torch.cat([p[k] for p in parts]) for k in range(3)),
                    np.concatenate([[0], np.cumsum([len(p[2]) for p in parts])]))

    def read_rows(self, seqs: list[list[int]], *more_seqs: list[list[int]], n: int = 16) -> int:
        """Run the sequences not yet read up to the last layer (in batches by length) and keep
        their rows; returns how many were new. Each further list is batched on its own, in the
        same pass: a list's batches, and so its rows' bits, do not depend on the others."""
        torch = import_torch()
        il = self.n_layers - 1
        new: list[list[int]] = []
        order: list[list[int]] = []
        seen = set(self._rows)
        for group in (seqs, *more_seqs):
            fresh = list({tuple(s): list(s) for s in group if tuple(s) not in seen}.values())
            seen.update(tuple(s) for s in fresh)
            order += [[len(new) + i for i in ix] for ix in by_length(fresh, n)]
            new += fresh
        xs = self.lower([(_batch([new[i] for i in ix])[0], None, None) for ix in order], il)
        with torch.no_grad():
            for k, ix in enumerate(order):
                x, xs[k] = xs[k], None  # each batch's stream freed as its rows are taken
                wa = self.attention(il, x)
                for b, i in enumerate(ix):
                    t = len(new[i]) - 1
                    self._rows[tuple(new[i])] = (x[b, :t].clone(), wa[b, :t].clone())
        return len(new)

    def answer_rows(self, reqs: list[tuple[list[int], int]], n: int = 8) -> Rows:
        """The last layer's Rows of scoring requests (tokens, first scored position): request
        i's rows predict its tokens first .. end. Requests that follow each other with the
        same tokens before `first` (a BBQ item's three answers) are read as one sequence, the
        shared context once and each continuation after it attending to the context and to
        itself at the positions it would have alone, so the context is not read thrice."""
        torch = import_torch()
        groups: list[list[int]] = []
        for i, (t, f) in enumerate(reqs):
            if groups and reqs[groups[-1][0]][1] == f and reqs[groups[-1][0]][0][:f] == t[:f]:
                groups[-1].append(i)
            else:
                groups.append([i])
        got: list[Any] = [None] * len(reqs)
        il = self.n_layers - 1
        packed = [_pack([reqs[i] for i in g]) for g in groups]
        order = by_length([p[0] for p in packed], n)
        batches = [_packed_batch([packed[k] for k in ix]) for ix in order]
        xs = self.lower(batches, il)
        with torch.no_grad():
            for j, ix in enumerate(order):
                (_, pos, mask), x, xs[j] = batches[j], xs[j], None
                wa = self.attention(il, x, pos, mask)
                for b, k in enumerate(ix):
                    for i, at in zip(groups[k], packed[k][2], strict=True):
                        t, f = reqs[i]
                        got[i] = (x[b, at], wa[b, at], torch.tensor(t[f:], dtype=torch.long))
        return Rows(*(torch.cat([g[k] for g in got]) for k in range(3)),
                    np.concatenate([[0], np.cumsum([len(g[2]) for g in got])]))

    def row_sums(self, r: Rows, edit: Any = None) -> np.ndarray:
        """Each sequence's summed log-likelihood over its rows (0 for one without rows)."""
        return r.sums(self.row_ll(r, edit))

    def row_ll(self, r: Rows, edit: Any = None, n: int = 32) -> np.ndarray:
        """Every row's log-probability of its next token (float64), n sequences at a time."""
        torch = import_torch()
        out = []
        with torch.no_grad():
            for a in range(0, len(r.offsets) - 1, n):
                x, wa, tgt, _ = r.take(np.arange(a, min(a + n, len(r.offsets) - 1)))
                lp = self.logprobs(self.finish(self.n_layers - 1, x, wa, edit))
                out.append(lp.gather(-1, tgt[:, None])[:, 0].numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    def rows_ll(self, r: Rows, j: np.ndarray, edit: Any = None) -> tuple[Any, Any]:
        """Summed log-likelihood of sequences j over their kept rows, and the rows' log-probs."""
        torch = import_torch()
        x, wa, tgt, seg = r.take(j)
        lp = self.logprobs(self.finish(self.n_layers - 1, x, wa, edit))
        return torch.zeros(len(j)).index_add(0, seg, lp.gather(-1, tgt[:, None])[:, 0]), lp


@dataclass
class Rows:
    """Sequences as a fit of the last layer alone reads them: per kept position, the stream
    entering that layer and what its attention writes (neither depends on an edit of the
    layer's writes) and the next token, every sequence's positions in one (N, D) batch. So a
    step pays neither for padding nor for recomputing attention, and a pair's positions
    before its sentences part (equal in both, so they cancel in its difference) are dropped:
    measured, a step takes 0.39× the padded forward's time (benchmarks/learn_speed.py)."""

    x: Any
    wa: Any
    tgt: Any
    offsets: np.ndarray  # sequence i's rows are offsets[i]:offsets[i + 1]

    def sums(self, per_row: np.ndarray) -> np.ndarray:
        """Each sequence's sum of a per-row figure (0 for a sequence without rows)."""
        n = len(self.offsets) - 1
        return np.bincount(np.repeat(np.arange(n), np.diff(self.offsets)), weights=per_row, minlength=n)

    def take(self, j: np.ndarray) -> tuple[Any, Any, Any, Any]:
        """The rows of sequences j: streams, attention writes, targets, each row's place in j."""
        torch = import_torch()
        lo, hi = self.offsets[j], self.offsets[np.asarray(j) + 1]
        idx = torch.from_numpy(np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)]))
        seg = torch.from_numpy(np.repeat(np.arange(len(lo)), hi - lo))
        return self.x[idx], self.wa[idx], self.tgt[idx], seg


@dataclass
class KeptRows:
    """What a run reads through the lower layers once (every sentence's last-layer rows in
    TorchLlama's map, the BBQ answers' Rows), kept in the run's folder so that a rerun after
    a Ctrl-C starts fitting at once: read, it took 3.4 min of a continued learn run here."""

    rows: dict[tuple[int, ...], tuple[Any, Any]]
    answers: Rows | None = None

    @classmethod
    def of(cls, m: TorchLlama, answers: Rows | None = None) -> KeptRows:
        """What m has read so far, with a run's answer Rows."""
        return cls(m._rows, answers)

    def restore(self, m: TorchLlama) -> None:
        """Give m these rows, so that it reads none of their sequences again."""
        m._rows = self.rows

    @staticmethod
    def key(weights: Path, *token_lists: Any) -> str:
        """The weights file (path, size, time) and a digest of every token list read."""
        st = Path(weights).stat()
        digest = hashlib.sha256(json.dumps(token_lists).encode()).hexdigest()
        return json.dumps({"weights": str(Path(weights).resolve()), "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns, "tokens": digest})

    def save(self, path: Path, key: str) -> None:
        torch = import_torch()
        a = self.answers
        blob = {"key": key, "rows": [(list(k), x, wa) for k, (x, wa) in self.rows.items()],
                "answers": None if a is None else (a.x, a.wa, a.tgt, torch.from_numpy(a.offsets))}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)

    @classmethod
    def load(cls, path: Path, key: str) -> KeptRows | None:
        """The rows kept in `path` if they were read for `key`, else None."""
        torch = import_torch()
        try:
            blob = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # absent, or not torch's
            return None
        if not isinstance(blob, dict) or blob.get("key") != key:
            return None
        a = blob["answers"]
        return cls({tuple(k): (x, wa) for k, x, wa in blob["rows"]},
                   None if a is None else Rows(a[0], a[1], a[2], a[3].numpy()))


def parted_at(more: list[int], less: list[int]) -> int:
    """The first position whose prediction differs between a pair's sentences: the one
    before their first different token (positions before it see and predict the same)."""
    p = next((i for i, (a, b) in enumerate(zip(more, less, strict=False)) if a != b), min(len(more), len(less)))
    return max(p - 1, 0)


def by_length(seqs: list[list[int]], n: int) -> list[list[int]]:
    """Batches of n sequence indices in order of length, so a batch pads little (436 CrowS
    sentences in batches of 16: 44% of the positions were padding in their own order, 3% sorted)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + n] for i in range(0, len(order), n)]


def _pack(reqs: list[tuple[list[int], int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Requests sharing their tokens before `first` as one sequence: (tokens, rope positions,
    each request's row positions: the context's last, then its own but its last)."""
    t0, f = reqs[0]
    toks, pos, at = list(t0[:f]), list(range(f)), []
    for t, _ in reqs:
        if not 0 < f < len(t):
            raise ValueError(f"a scoring request needs tokens before and after position {f}")
        at.append([f - 1, *range(len(toks), len(toks) + len(t) - f - 1)])
        toks += t[f:]
        pos += range(f, len(t))
    return toks, pos, at


def _packed_batch(packs: list[tuple[list[int], list[int], list[list[int]]]]) -> tuple[Any, Any, Any]:
    """Right-padded tokens, positions and the attention mask (B, 1, T, T) of packed
    sequences: the context causal, each continuation sees the context and itself causally;
    a padding row sees position 0 alone (softmax needs one key; nothing reads the row)."""
    torch = import_torch()
    T = max(len(p[0]) for p in packs)
    toks = torch.zeros((len(packs), T), dtype=torch.long)
    pos = torch.zeros((len(packs), T), dtype=torch.long)
    mask = torch.zeros((len(packs), 1, T, T), dtype=torch.bool)
    mask[:, 0, :, 0] = True
    for b, (tk, ps, at) in enumerate(packs):
        toks[b, : len(tk)], pos[b, : len(ps)] = torch.tensor(tk), torch.tensor(ps)
        f = at[0][0] + 1  # the context's length
        mask[b, 0, :f, :f] = torch.ones((f, f), dtype=torch.bool).tril()
        a = f
        for rows in at:
            m = len(rows)  # the continuation's length: its rows are the context's last and m − 1 own
            mask[b, 0, a:a + m, :f] = True
            mask[b, 0, a:a + m, a:a + m] = torch.ones((m, m), dtype=torch.bool).tril()
            a += m
    return toks, pos, mask


def _pad(xs: list[Any]) -> Any:
    torch = import_torch()
    out = torch.zeros((len(xs), max(len(x) for x in xs), xs[0].shape[-1]))
    for i, x in enumerate(xs):
        out[i, : len(x)] = x
    return out


def _batch(seqs: list[list[int]]) -> tuple[Any, Any, Any]:
    """Right-padded tokens, next-token targets and their mask (causal: padding is never read)."""
    torch = import_torch()
    T = max(len(s) for s in seqs)
    toks = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T - 1))
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s) - 1] = 1
    return toks, toks[:, 1:], mask


@dataclass
class PairData:
    """Pairs as tokens with their streams entering the first edited layer."""

    more: list[list[int]]
    less: list[list[int]]
    xm: list[Any]  # empty when `rows` holds the pairs
    xl: list[Any]
    groups: np.ndarray  # each pair's category (objectives "means" and "balanced")
    rows: tuple[Rows, Rows] | None = None  # (more, less): a fit of the last layer alone
    # (more, less): each sequence's positions left out of its sum (part "rest", streams)
    skip: tuple[list[list[int]], list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.more)


class Trainer:
    """Adam on the edit's (U, V, b) for layers ≥ `start`, with a validation measure."""

    def __init__(self, m: TorchLlama, train: PairData, val: PairData, neutral: list[list[int]], start: int,
                 cfg: LearnConfig) -> None:
        torch = import_torch()
        self.m, self.train, self.val, self.start, self.cfg = m, train, val, start, cfg
        self.neutral = neutral
        packed = train.rows is not None  # the last layer alone: neutral windows as Rows too
        self.xn = [] if packed else m.streams(neutral, start)
        self.nrows = m.rows(neutral, [0] * len(neutral)) if packed else None
        with torch.no_grad():
            self.ref = [self.neutral_lp(w, None)[0] for w in range(0, (len(neutral) + 3) // 4)]
        L, D, r = m.n_layers, m.n_embd, cfg.rank
        self.U = torch.zeros((L, D, r), requires_grad=True)
        self.V = (torch.randn((L, D, r), generator=torch.Generator().manual_seed(cfg.seed)) / np.sqrt(D)).requires_grad_()
        self.b = torch.zeros((L, D), requires_grad=True)
        self.opt = torch.optim.Adam([self.U, self.V, self.b], lr=cfg.lr)
        self.rng = np.random.default_rng(cfg.seed)
        self.step = 0
        self.at = 0  # the step whose parameters the edit holds (a round restores an earlier one)
        # the training pairs' latest differences, refreshed by each batch: the category
        # means the "means" objectives weight a batch's pairs by
        self.table = self.diffs(train, False)
        self.members_of = {g: np.flatnonzero(train.groups == g) for g in np.unique(train.groups)}
        self.members = list(self.members_of.values())
        self.kept_train: float | None = None
        self.d0, self.now = self.table.copy(), self.table.copy()  # the guard's start and latest differences
        self.guards = guard_signs(self.d0, train.groups) if cfg.guard > 0 else {}
        self.scale_train = self.pairs_value(train, self.table) or 1.0
        self.scale_val = self.pairs_value(val, self.diffs(val, False)) or 1.0

    @property
    def packed(self) -> bool:
        return self.nrows is not None

    def edit(self, il: int, x: Any, down: bool) -> Any:
        if il < self.start:
            return x
        x = x - (x @ self.V[il]) @ self.U[il].T
        return x + self.b[il] if down else x

    def pair_diffs(self, d: PairData, j: np.ndarray, edit: Any) -> Any:
        """Pairs j's log-likelihood differences (more − less), a tensor."""
        if d.rows is not None:
            return self.m.rows_ll(d.rows[0], j, edit)[0] - self.m.rows_ll(d.rows[1], j, edit)[0]
        sm, sl = ([d.skip[k][i] for i in j] for k in (0, 1)) if d.skip is not None else (None, None)
        lm = self.m.seq_ll([d.more[i] for i in j], edit, [d.xm[i] for i in j], self.start, sm)[0]
        return lm - self.m.seq_ll([d.less[i] for i in j], edit, [d.xl[i] for i in j], self.start, sl)[0]

    def neutral_lp(self, w: int, edit: Any) -> tuple[Any, Any]:
        """Neutral windows 4w .. 4w + 3: every position's log-probs and which are real."""
        j = np.arange(4 * w, min(4 * w + 4, len(self.neutral)))
        if self.nrows is not None:
            lp = self.m.rows_ll(self.nrows, j, edit)[1]
            return lp, import_torch().ones(len(lp))
        _, lp, mask = self.m.seq_ll([self.neutral[i] for i in j], edit, [self.xn[i] for i in j], self.start)
        return lp, mask

    def diffs(self, d: PairData, edited: bool = True, n: int = 16) -> np.ndarray:
        """Every pair's log-likelihood difference (more − less), with the edit or without."""
        torch = import_torch()
        e = self.edit if edited else None
        with torch.no_grad():
            out = [self.pair_diffs(d, np.arange(i, min(i + n, len(d))), e).numpy() for i in range(0, len(d), n)]
        return np.concatenate(out).astype(np.float64)

    def pairs_value(self, d: PairData, diffs: np.ndarray) -> float:
        """The objective's pairs term: the mean squared difference, or the category means'."""
        if self.cfg.objective == "pairs":
            return float(np.mean(diffs ** 2))
        if self.cfg.objective == "pairs-balanced":
            return float(balanced_weights(d.groups) @ diffs ** 2)
        return category_objective(diffs, d.groups, self.cfg.objective == "balanced")[0]

    def val_d2(self) -> float:
        return self.pairs_value(self.val, self.diffs(self.val)) / self.scale_val

    def train_d2(self) -> float:
        return self.pairs_value(self.train, self.diffs(self.train)) / self.scale_train

    def draw(self) -> np.ndarray:
        """A step's training pairs: drawn uniformly, or for the category objectives the same
        number from each category (drawn uniformly, a small category's pairs are rare in a
        batch and weighted up to ~8×: a noisier estimate of the same gradient)."""
        n, c = len(self.train), self.cfg
        if c.objective == "pairs":
            return self.rng.choice(n, min(c.pairs, n), replace=False)
        b = max(1, c.pairs // len(self.members))
        return np.concatenate([self.rng.choice(ix, min(b, len(ix)), replace=False) for ix in self.members])

    def pairs_term(self, j: np.ndarray, d: Any) -> Any:
        if self.cfg.objective == "pairs":
            return (d ** 2).mean() / self.scale_train
        if self.cfg.objective == "pairs-balanced":
            w = import_torch().from_numpy(balanced_weights(self.train.groups[j])).to(d.dtype)
            return (w * d ** 2).sum() / self.scale_train
        self.table[j] = d.detach().numpy()
        k = batch_coefficients(self.table, self.train.groups, j, self.cfg.objective == "balanced")
        return (d * import_torch().from_numpy(k).to(d.dtype)).sum() / self.scale_train

    def guard_moves(self) -> dict[str, float]:
        """Each guarded category's mean change on its training pairs, signed so that > 0 is away
        from neutral (from every pair's latest difference)."""
        return {c: s * float(np.mean(self.now[self.members_of[c]] - self.d0[self.members_of[c]]))
                for c, s in self.guards.items()}

    def guard_term(self, j: np.ndarray, d: Any) -> Any:
        """The guard's term for batch j (differences d): its gradient, from every training
        pair's latest difference, is the hinge's, unbiased for a uniform batch."""
        self.now[j] = d.detach().numpy()
        k = np.zeros(len(j))
        for c, away in self.guard_moves().items():
            s, n = self.guards[c], len(self.members_of[c])
            k[self.train.groups[j] == c] = 2 * max(0.0, away) * s / n * len(self.train) / len(j)
        return (d * import_torch().from_numpy(self.cfg.guard * k).to(d.dtype)).sum()

    def run(self, steps: int, beta: float, emit: Event) -> tuple[tuple[Any, Any, Any], int, float]:
        """Train `steps` steps; return the parameters, step and validation measure of the kept
        step: the best seen (the round's start included), or the last (cfg.pick)."""
        best = (self.val_d2(), self.at, self.snapshot())
        self.kept_train = None  # the kept step's training measure, when its evaluation took it
        t0 = time.perf_counter()
        tr, c = self.train, self.cfg
        for k in range(steps):
            for g in self.opt.param_groups:
                g["lr"] = c.lr * rate(k, steps, c.schedule)
            j = self.draw()
            w = int(self.rng.integers(len(self.ref)))
            lp, mask = self.neutral_lp(w, self.edit)
            ref = self.ref[w]
            kl = ((ref.exp() * (ref - lp)).sum(-1) * mask).sum() / mask.sum()
            d = self.pair_diffs(tr, j, self.edit)
            loss = self.pairs_term(j, d) + beta * 100 * kl
            if self.guards:
                loss = loss + self.guard_term(j, d)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.step += 1
            self.at = self.step
            emit("learn_step", {"step": self.step})  # where a Ctrl-C stops the run (edge.interrupt)
            if (k + 1) % c.eval_every == 0 or k == steps - 1:
                v = self.val_d2()
                more = {}
                if c.objective not in PAIR_OBJECTIVES:  # a fresh table: the batches' refreshes leave it ~20 steps stale
                    self.table = self.diffs(tr)
                    more["train_d2"] = self.pairs_value(tr, self.table) / self.scale_train
                if self.guards:
                    self.now = self.diffs(tr)
                    more["guard_worst"] = max(self.guard_moves().values())
                if v < best[0] or c.pick == "last" and k == steps - 1:
                    best = (v, self.step, self.snapshot())
                    self.kept_train = more.get("train_d2")
                emit("learn", {"step": self.step, "beta": beta, "val_d2": v, **more,
                               "neutral_kl": float(kl.item()), "seconds": time.perf_counter() - t0})
        return best[2], best[1], best[0]

    def snapshot(self) -> tuple[Any, Any, Any]:
        return self.U.detach().clone(), self.V.detach().clone(), self.b.detach().clone()

    def restore(self, snap: tuple[Any, Any, Any]) -> None:
        torch = import_torch()
        with torch.no_grad():
            for p, s in zip((self.U, self.V, self.b), snap, strict=True):
                p.copy_(s)

    def plan(self) -> FoldPlan:
        U, V, b = (np.ascontiguousarray(x.detach().numpy(), dtype=np.float32) for x in (self.U, self.V, self.b))
        return FoldPlan({il: ResidualEdit(U[il], V[il], b[il]) for il in range(self.start, self.m.n_layers)})


def save_edit(plan: FoldPlan, path: Path) -> None:
    """The learned edit as layers, u, v, b (each stacked over the edited layers)."""
    edits = [plan.layers[il] for il in sorted(plan.layers)]
    np.savez(path, layers=np.array(sorted(plan.layers)), u=np.stack([e.u for e in edits]),
             v=np.stack([e.v for e in edits]), b=np.stack([e.bias for e in edits]))


def load_edit(path: Path) -> FoldPlan:
    with np.load(path) as f:
        return FoldPlan({int(il): ResidualEdit(f["u"][j], f["v"][j], f["b"][j]) for j, il in enumerate(f["layers"])})


def edit_of(plan: FoldPlan | None) -> Any:
    """A fold plan's edit as TorchLlama applies it (None: the unedited model)."""
    if plan is None:
        return None
    torch = import_torch()
    e = {il: (torch.from_numpy(np.asarray(x.u, np.float32)), torch.from_numpy(np.asarray(x.v, np.float32)),
              None if x.bias is None else torch.from_numpy(np.asarray(x.bias, np.float32)))
         for il, x in plan.layers.items()}

    def edit(il: int, x: Any, down: bool) -> Any:
        if il not in e:
            return x
        u, v, b = e[il]
        x = x - (x @ v) @ u.T
        return x + b if down and b is not None else x

    return edit


def pair_parts(m: TorchLlama, more: list[list[int]], less: list[list[int]],
               edit: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(more, less, words) as bias.audit.PairScores holds them, from the last layer's rows
    (an edit of that layer alone): each sentence's log-likelihood summed from the position
    where the pair parts (the shared start adds the same to both, so every difference is
    the whole sentences'), and the rewritten tokens' part of the difference."""
    from bias.audit import rewritten_tokens

    first = [parted_at(a, b) for a, b in zip(more, less, strict=True)]
    changed = [rewritten_tokens(a[1:], b[1:]) for a, b in zip(more, less, strict=True)]
    sums, words = [], np.zeros(len(more))
    for side, seqs in enumerate((more, less)):
        r = m.rows(seqs, first)
        ll = m.row_ll(r, edit)
        sums.append(r.sums(ll))
        for i, f in enumerate(first):
            k = np.asarray(changed[i][side], dtype=int) - f  # token j after BOS is the row j − first
            words[i] += (1 if side == 0 else -1) * ll[r.offsets[i] + k[k >= 0]].sum()
    return sums[0], sums[1], words


class TorchUtility:
    """bias.feedback.Utility's figures (PPL of the neutral chunks, mean KL(uncorrected ‖
    edited) of their next-token distributions) for an edit of the last layer alone, from its
    rows: the fit's own engine, free of llama.cpp's 8-bit activations (which move one
    chunk's PPL by ~0.3% between nearly equal edits)."""

    def __init__(self, m: TorchLlama, chunks: list[list[int]]) -> None:
        self.m, self.rows = m, m.rows(chunks, [0] * len(chunks))
        self.base: list[Any] = []
        self.base_ppl = self(None)[0]

    def __call__(self, edit: Any) -> tuple[float, float]:
        torch = import_torch()
        nll, kl, n = 0.0, 0.0, 0
        with torch.no_grad():
            for i in range(len(self.rows.offsets) - 1):
                s, lp = self.m.rows_ll(self.rows, np.array([i]), edit)
                nll -= float(s[0])
                n += len(lp)
                if len(self.base) <= i:
                    self.base.append(lp)
                else:
                    kl += float((self.base[i].exp() * (self.base[i] - lp)).sum())
        return float(np.exp(nll / n)), kl / n


def predicted_positions(seqs: list[list[int]]) -> int:
    """How many positions of `seqs` predict a next token: the log-probs over the vocabulary
    that a fit's KL reference (Trainer.ref) or TorchUtility's base keeps for them."""
    return sum(len(s) - 1 for s in seqs)


def next_beta(rounds: list[LearnRound], budget: float, cfg: LearnConfig) -> float | None:
    """The next round's β from the last round's measured PPL, or None to stop: lower while
    the rise is under fill × budget, raise (back toward the start) while over it and nothing
    is within budget yet, stop once a round within budget came near it or went over, or
    when lowering β gained less than min_gain on the validation pairs."""
    last = rounds[-1]
    if len(rounds) >= cfg.rounds:
        return None
    prev = rounds[-2] if len(rounds) > 1 else None
    if prev is not None and last.beta < prev.beta and prev.val_d2 - last.val_d2 < cfg.min_gain:
        return None
    within = [r for r in rounds if r.ppl_increase <= budget]
    if last.ppl_increase > budget:
        return None if within else last.beta / cfg.beta_factor
    return last.beta * cfg.beta_factor if last.ppl_increase < cfg.fill * budget else None


def choose(rounds: list[LearnRound], budget: float) -> int | None:
    """The round within budget with the smallest validation pairs (None: none within)."""
    ok = [r for r in rounds if r.ppl_increase <= budget]
    return None if not ok else min(ok, key=lambda r: r.val_d2).round


def learn_edit(model_path: Path, more: list[list[int]], less: list[list[int]], neutral: list[list[int]],
               measure: Measure, budget: float, cfg: LearnConfig | None = None, threads: int | None = None,
               reference: np.ndarray | None = None, emit: Event | None = None,
               augment: Augment | None = None, groups: list[str] | None = None,
               model: TorchLlama | None = None) -> LearnResult:
    """Fit the edit on the pairs (more[i], less[i]) (token lists with BOS) within `budget`
    (relative PPL rise, measured by `measure` after each round). `reference`: the pairs'
    differences as llama.cpp scores them; the first 8 are checked against the torch forward.
    `augment(train)`: extra training pairs built from the training pairs alone, as (more,
    less, categories). `groups`: each pair's category (needed by objectives other than "pairs").
    `model`: the compute weights already in torch (a split run loads them once, with its rows)."""
    cfg = cfg or LearnConfig()
    cfg.validate()
    if (cfg.objective != "pairs" or cfg.guard > 0) and (groups is None or len(groups) != len(more)):
        raise BadOptionError(f"learn: objective {cfg.objective!r} (or a guard) needs each pair's category")
    cat = np.asarray(groups if groups is not None else [""] * len(more))
    torch = import_torch()
    emit = emit or (lambda kind, d: None)
    if threads:
        torch.set_num_threads(threads)
    if model is None:
        from edge.gguf_file import inspect

        start = cfg.start(inspect(model_path).n_layers or 0)  # metadata only: GGUFReader parses the vocabulary too
        check_memory(model_path, keep_from=start, vocab_rows=predicted_positions(neutral))
        m = TorchLlama(model_path, keep_from=start)
    else:
        m, start = model, cfg.start(model.n_layers)
        m.keep(start)
    res = LearnResult(None, first_layer=start)
    if reference is not None:
        k = min(8, len(more))
        if start == m.n_layers - 1:  # from the rows a split run has read: no pass through every layer
            d = np.subtract(*pair_parts(m, more[:k], less[:k])[:2])
        else:
            with torch.no_grad():
                d = (m.seq_ll(more[:k])[0] - m.seq_ll(less[:k])[0]).numpy()
        res.agreement = float(np.abs(d - reference[:k]).max())
    order = np.random.default_rng(cfg.seed).permutation(len(more))
    n_val = max(1, int(round(cfg.val_frac * len(more))))

    def data(ix: np.ndarray, extra: tuple[list[list[int]], list[list[int]], list[str]] = ([], [], [])) -> PairData:
        pm, pl = [more[i] for i in ix] + extra[0], [less[i] for i in ix] + extra[1]
        groups = np.array([*cat[ix], *extra[2]])
        skip = None
        if cfg.part == "rest":  # the positions that predict a rewritten token left out
            from bias.audit import rewritten_tokens

            changed = [rewritten_tokens(a[1:], b[1:]) for a, b in zip(pm, pl, strict=True)]
            skip = ([c[0] for c in changed], [c[1] for c in changed])
        if start == m.n_layers - 1:  # the last layer alone: per-position rows (Rows)
            first = [parted_at(a, b) for a, b in zip(pm, pl, strict=True)]
            rows = tuple(m.rows(s, first, skip=None if skip is None else skip[k]) for k, s in enumerate((pm, pl)))
            return PairData(pm, pl, [], [], groups, rows)
        return PairData(pm, pl, m.streams(pm, start), m.streams(pl, start), groups, skip=skip)

    extra = augment(order[n_val:]) if augment is not None else ([], [], [])
    emit("stage", {"stage": f"learn: streams entering layer {start}", "pairs": len(more) + len(extra[0])})
    tr = Trainer(m, data(order[n_val:], extra), data(order[:n_val]), neutral, start, cfg)
    res.train_pairs, res.val_pairs, res.swapped_pairs = len(more) - n_val, n_val, len(extra[0])
    beta: float | None = cfg.beta
    plans: dict[int, FoldPlan] = {}
    while beta is not None:
        t0, r = time.perf_counter(), len(res.rounds)
        steps = cfg.steps if r == 0 else cfg.more_steps
        snap, at, v = tr.run(steps, beta, emit)
        tr.restore(snap)  # the next round goes on from the best point
        tr.at = at
        plans[r] = tr.plan()
        res.notes.append(f"edge bias learn: rank {cfg.rank}, layers {start}.., β {beta:.3g}, step {at}")
        rise, kl = measure(plans[r], res.notes[-1])
        train = tr.train_d2() if tr.kept_train is None else tr.kept_train
        res.rounds.append(LearnRound(r, beta, steps, at, v, train, rise, kl, time.perf_counter() - t0))
        emit("learn", {"round": r, **{k: x for k, x in asdict(res.rounds[-1]).items() if k != "round"}})
        beta = next_beta(res.rounds, budget, cfg)
    res.chosen = choose(res.rounds, budget)
    res.plan = None if res.chosen is None else plans[res.chosen]
    return res
