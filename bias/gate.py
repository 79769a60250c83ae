"""Gated steering folded into the weights (`edge bias mitigate --method gate`, issue 16).

A control vector pushes every token of every text by the same amount, so its cost on
neutral text (PPL) binds long before the categories move enough, and one push cannot move
an anti-stereotypical category (race-color) up while the others go down. Here the push of
each category c opens only where a layer writes c's content. Per edited layer l, what the
layer writes to the residual stream (attention output, MLP down projection: a vector x)
becomes x + Σ_c a_c u_c (v_cᵀ x):

- v_c, the gate: mean write on c's calibration sentences minus the mean on the other
  categories' sentences, made orthogonal to the mean write on neutral text, to the other
  categories' mean write and to the neutral writes' leading axes, so that neither neutral
  text nor another category opens it on average;
- u_c, the push: c's bias direction at that layer (mean of h(more) − h(less) over c's
  calibration pairs), signed to move c's calibration mean toward 0 and scaled so that the
  mean push on c's calibration sentences is a depth profile × the norm of the overall
  mean difference (the control-vector loop's measured profile: the last third of the
  layers does most of the work).

Each writer W becomes (I + U Vᵀ)W, a rank-k oblique edit (edge.fold), so the corrected
model is an ordinary GGUF that plain llama.cpp runs. All categories share one scale a,
found by secant steps of the calibration pct toward 50 within the PPL budget (as the
control-vector loop's gain). Tried and dropped (DESIGN.md): per-category coefficients
fitted to each edit's measured response (the fit asked for coefficients up to ~3, where the
gates feed on their own pushes through the layers and PPL rose ×110), and turning a push
whose edit alone moved its category's calibration rows the wrong way (held-out worse).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bias.ablate import top_axes
from bias.feedback import CHARS_PER_TOKEN, neutral_chars, pydoc_text
from edge.fold import FoldPlan, ResidualEdit


@dataclass
class GateConfig:
    min_pairs: int = 15  # a category needs this many calibration pairs for its own edit
    protect: int = 3  # the neutral writes' leading axes the gate is made orthogonal to
    profile: tuple[float, float, float] = (0.02, 0.18, 0.6)  # push per third of the depth
    pct_target: float = 50.0  # the calibration pct the common scale aims at
    max_ppl_increase: float = 0.02
    neutral_windows: int = 256  # neutral text for the gates: windows of 16 tokens
    max_steps: int = 4  # measurements of the common scale


@dataclass
class GateEdits:
    """Per category (rows) and edited layer: push u and gate v (n_embd each)."""

    names: list[str]
    signs: np.ndarray  # +1: c's calibration mean is stereotypical (push down), −1: up
    layers: list[int]
    u: np.ndarray  # (k, n_edit_layers, n_embd)
    v: np.ndarray  # (k, n_edit_layers, n_embd)
    selectivity: dict[str, float] = field(default_factory=dict)  # mean gate on c's sentences

    def plan(self, coef: Sequence[float] | np.ndarray) -> FoldPlan:
        a = np.asarray(coef, dtype=np.float64)
        keep = a != 0
        p = FoldPlan()
        if not keep.any():
            return p
        for j, il in enumerate(self.layers):
            # edge.fold applies x − U (Vᵀ x): U = −a·u adds the push
            U = -(a[keep, None] * self.u[keep, j]).T
            p.layers[il] = ResidualEdit(U.astype(np.float32), self.v[keep, j].T.astype(np.float32))
        return p

    def one(self, j: int) -> FoldPlan:
        return self.plan(np.eye(len(self.names))[j])

    def save(self, path: Path, coef: Sequence[float] | np.ndarray) -> None:
        np.savez_compressed(path, u=self.u, v=self.v, layers=self.layers, names=np.array(self.names),
                            signs=self.signs, coefficients=np.asarray(coef, np.float64))

    @classmethod
    def load(cls, path: Path) -> tuple[GateEdits, np.ndarray]:
        """The saved edits and the coefficients the fit chose."""
        with np.load(path) as z:
            k = len(z["names"])
            signs = z["signs"] if "signs" in z.files else np.ones(k)  # runs before 12-02 kept no signs
            return (cls([str(x) for x in z["names"]], signs, [int(x) for x in z["layers"]], z["u"], z["v"]),
                    z["coefficients"])


def writes(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """What each layer wrote (token means): h (n, n_layers, n_embd) the stream after each
    layer, e (n, n_embd) the embedding it started from."""
    prev = np.concatenate([e[:, None], h[:, :-1]], axis=1)
    return (h - prev).astype(np.float32)


def depth_profile(n_layers: int, profile: Sequence[float]) -> np.ndarray:
    thirds = np.minimum(np.arange(n_layers) * 3 // n_layers, 2)
    w = np.asarray(profile, dtype=np.float64)[thirds]
    w[0] = 0.0  # layer 0 reads the embedding: left alone
    return w


def _unit(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), 1e-12)


def gate_edits(states: Any, cats: np.ndarray, neutral_h: np.ndarray, cfg: GateConfig,
               exclude: str | None = None) -> GateEdits:
    """The per-category edits at unit strength from calibration pair states (PairStates)
    and token-mean states of neutral text (n, n_layers, n_embd)."""
    cats = np.asarray(cats)
    n_layers = states.h_more.shape[1]
    diff = (states.h_more.astype(np.float64) - states.h_less.astype(np.float64))
    size = np.linalg.norm(diff.mean(0), axis=1) * depth_profile(n_layers, cfg.profile)
    layers = [il for il in range(1, n_layers) if size[il] > 0]
    wn = writes(neutral_h, np.zeros_like(neutral_h[:, 0]))
    w = np.concatenate([writes(states.h_more, states.e_more), writes(states.h_less, states.e_less)])
    wc = np.concatenate([cats, cats])
    names = [c for c in sorted(set(cats.tolist())) if c != exclude and np.sum(cats == c) >= cfg.min_pairs]
    U, V, sel = [], [], {}
    for c in names:
        mine, other = w[wc == c], w[wc != c]
        us, vs, g_mean = [], [], []
        for il in layers:
            axes = np.vstack([top_axes(wn[:, il].astype(np.float64), cfg.protect), wn[:, il].mean(0),
                              other[:, il].mean(0)])
            q, _ = np.linalg.qr(axes.T)
            r = mine[:, il].mean(0) - other[:, il].mean(0)
            v = _unit(r - q @ (q.T @ r))
            g = float((mine[:, il] @ v).mean())
            u = -_unit(diff[cats == c, il].mean(0)) * size[il] / max(g, 1e-6)
            us.append(u)
            vs.append(v)
            g_mean.append(g)
        U.append(us)
        V.append(vs)
        sel[c] = float(np.mean(g_mean))
    return GateEdits(names, np.ones(len(names)), layers, np.array(U, np.float32), np.array(V, np.float32), sel)


def signed(edits: GateEdits, d_cal: np.ndarray, cats: np.ndarray) -> GateEdits:
    """Each push signed toward 0 from its category's calibration mean ll difference."""
    s = np.array([np.sign(d_cal[cats == c].mean()) or 1.0 for c in edits.names])
    return GateEdits(edits.names, s, edits.layers, edits.u * s[:, None, None], edits.v, edits.selectivity)


@dataclass
class ScaleStep:
    scale: float
    pct: float  # calibration pct with the edits at this scale
    ppl_increase: float
    kl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_scale(steps: Sequence[ScaleStep], pct0: float, cfg: GateConfig) -> float | None:
    """The next common scale (a secant step of the calibration pct toward the target, never
    past what the PPL budget allows, PPL rise ~ scale²), or None when the last step is close
    enough (within 0.5 points, or past the target) and within budget."""
    last = steps[-1]
    over = last.ppl_increase > cfg.max_ppl_increase
    if not over and last.pct <= cfg.pct_target + 0.5:
        return None
    drop, want = pct0 - last.pct, pct0 - cfg.pct_target
    new = last.scale * (want / drop if drop > 0 else 2.0)
    if over:
        new = min(new, last.scale * float(np.sqrt(0.95 * cfg.max_ppl_increase / last.ppl_increase)))
    return float(np.clip(new, 0.25 * last.scale, 2.0 * last.scale))


def best_step(steps: Sequence[ScaleStep], cfg: GateConfig) -> ScaleStep | None:
    """Of the steps within the PPL budget, the one whose pct is closest to the target (from
    above; one past it only if nothing else came within 0.5 points)."""
    ok = [s for s in steps if s.ppl_increase <= cfg.max_ppl_increase]
    if not ok:
        return None
    return min(ok, key=lambda s: abs(s.pct - cfg.pct_target) + (0.5 if s.pct < cfg.pct_target else 0.0))


def neutral_windows(rt: Any, n: int, width: int = 16) -> list[list[int]]:
    """Short windows of the neutral text past the part the utility's PPL reads, so gates
    are not fitted on the text that judges PPL (a 1000-character margin past it)."""
    text = pydoc_text()[neutral_chars() + 1000:]
    ids = rt.tokenize(text[: n * width * CHARS_PER_TOKEN], add_bos=False)
    return [[rt.bos, *ids[i * width:(i + 1) * width]] for i in range(n) if len(ids) >= (i + 1) * width]
