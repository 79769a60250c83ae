"""A contrast eraser of the state the output head reads, folded into the head.

A CrowS pair's shared tokens are predicted from states that differ between its two
sentences only because of the rewrite earlier on; the shared tokens' part of the pair's
difference (bias.audit.PairScores.rest: what the CrowS-Pairs authors count) is read from
those differences. The eraser takes away the directions along which the calibration pairs'
aligned states differ most relative to how much text in general varies along them: the
leading generalized eigenvectors of C_Δ (second moment of the differences at the aligned
positions, bias.audit.shared_after_rewrite) against C_h (second moment of the states on
neutral text). Erasing a subspace shrinks every pair's differences in proportion to what
of them lies there, so a pair's shared part shrinks with its size, rather than every pair
moving by one shift as a control vector does.

The eraser acts on the final normalized state h (after output_norm), so it folds into the
output matrix alone: logits = W (h − λ A Bᵀ h) = (W − λ (W A) Bᵀ) h, a rank-k edit of the
head (untied first when the model ties it to the embedding). Two forms: `orth` projects
the span out orthogonally (A = B = Q); `oblique` scales the axes' coordinates by 1 − λ in
C_h's metric (A = S U_k, B = S⁻¹ U_k with S = C_h^½), leaving the rest of the state's
coordinates as they were. Measured on SmolLM2-135M over 5 CrowS splits (DESIGN.md "A
contrast eraser at the head"): orth at 32 axes costs 0.5-1.8% PPL and 4-8 points of BBQ
disambiguated accuracy and leaves the held-out pct where it was; a comparison, not a fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.errors import BadOptionError
from edge.fold import ResidualEdit

FORMS = ("orth", "oblique")


def fit_text(rt: Any) -> list[list[int]]:
    """The neutral text C_h is read on: 15 chunks of the pydoc prose past what the utility's
    PPL reads (bias.feedback.neutral_chunks), so the eraser is not fitted on the text that
    judges it (fitted there, it looked free: +0.02% PPL against +1.69%)."""
    from bias.feedback import neutral_chars, neutral_chunks

    return neutral_chunks(rt, 15, start=neutral_chars() + 1000)


@dataclass
class EraseConfig:
    """`edge bias mitigate --method erase`: axes erased, form, strength, C_h's ridge (times its
    mean eigenvalue, so that axes no neutral state uses are not taken as free)."""

    rank: int = 32
    form: str = "orth"
    strength: float = 1.0
    ridge: float = 0.01
    halvings: int = 3  # the strength is halved up to this often while the PPL is over budget

    def validate(self) -> None:
        if self.rank < 1:
            raise BadOptionError(f"--erase-rank {self.rank}: use 1 or more axes")
        if self.form not in FORMS:
            raise BadOptionError(f"--erase-form {self.form}: use one of {', '.join(FORMS)}")
        if not 0 < self.strength <= 1:
            raise BadOptionError(f"erase strength {self.strength}: use a value in (0, 1]")

    def describe(self, strength: float | None = None) -> str:
        return f"{self.rank} axes, {self.form}, λ {self.strength if strength is None else strength:.3g}"


@dataclass
class ContrastAxes:
    """The axes of the pairs' state differences in the space where neutral states are white
    (z = S⁻¹h): eigenvalues (largest first), eigenvectors U (n_embd, n_embd), S and S⁻¹."""

    eigenvalues: np.ndarray
    u: np.ndarray
    s: np.ndarray
    s_inv: np.ndarray

    @classmethod
    def fit(cls, delta: np.ndarray, neutral: np.ndarray, ridge: float = 0.01) -> ContrastAxes:
        """From aligned state differences (n, n_embd) and neutral states (m, n_embd)."""
        if len(delta) == 0 or len(neutral) == 0:
            raise BadOptionError("the eraser needs pairs with shared tokens after the rewrite, and neutral text")
        d, h = np.asarray(delta, np.float64), np.asarray(neutral, np.float64)
        c_h = h.T @ h / len(h)
        c_h += ridge * np.trace(c_h) / len(c_h) * np.eye(len(c_h))
        e, v = np.linalg.eigh(c_h)
        s, s_inv = (v * np.sqrt(e)) @ v.T, (v / np.sqrt(e)) @ v.T
        w = d @ s_inv  # the differences, whitened
        lam, u = np.linalg.eigh(w.T @ w / len(w))
        return cls(lam[::-1].copy(), u[:, ::-1].copy(), s, s_inv)

    def share(self, rank: int) -> float:
        """What of the whitened differences' second moment the first `rank` axes hold."""
        return float(self.eigenvalues[:rank].sum() / self.eigenvalues.sum())

    def maps(self, rank: int, form: str) -> tuple[np.ndarray, np.ndarray]:
        """(A, B), each (n_embd, rank): the eraser is h ↦ h − λ A Bᵀ h."""
        uk = self.u[:, :rank]
        if form == "orth":
            q, _ = np.linalg.qr(self.s_inv @ uk)
            return q, q
        return self.s @ uk, self.s_inv @ uk

    def head_edit(self, rank: int, form: str, strength: float) -> ResidualEdit:
        """The eraser as an edit of the output head's rows (edge.fold.FoldPlan.output): each
        row w becomes w − λ (w·A) Bᵀ, so that W' h = W (h − λ A Bᵀ h)."""
        a, b = self.maps(rank, form)
        return ResidualEdit(u=b.astype(np.float32), v=(strength * a).astype(np.float32))


def aligned_differences(more: Sequence[np.ndarray], less: Sequence[np.ndarray],
                        more_tokens: Sequence[Sequence[int]], less_tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per pair, its sentences' states (len, n_embd) subtracted at the positions that
    predict the tokens they share after the rewrite ((0, n_embd) for a pair with none)."""
    from bias.audit import shared_after_rewrite

    out = []
    for hm, hl, a, b in zip(more, less, more_tokens, less_tokens, strict=True):
        al = shared_after_rewrite(list(a), list(b))
        p = np.array([i for i, _ in al], dtype=np.int64)
        q = np.array([j for _, j in al], dtype=np.int64)
        out.append(hm[p] - hl[q])
    return out
