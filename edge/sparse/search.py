"""Per-module allocation search under a model-level sparsity target (objective: KL to dense).

Modules are grouped into units (projection type × block of layers). `uniform` gives every
module the target. `greedy` starts there and, round by round, measures every unit's KL
slope at the current allocation and moves budget from expensive units to cheap ones.
`evolutionary` adds random budget-neutral mutations after it, keeping any that lower the
true KL, until the time budget ends. (Summing per-unit KL curves measured alone assumed
additivity and did not transfer to held-out text, so it was dropped.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge.engine.model import Engine
from edge.engine.weights import LINEAR_NAMES
from edge.sparse.calibrate import Calibration
from edge.sparse.evaluate import HalfChunks
from edge.sparse.profile import Allocation, build_specs, module_size
from edge.sparse.rsparse import SparseBackend

ALPHAS = (1.0, 0.8)  # TEAL-style and R-Sparse with a fifth of the budget in low rank
S_MAX = 0.95
STEP = 0.05

Unit = tuple[str, int]  # (projection, layer group)


@dataclass
class SearchResult:
    alloc: Allocation
    kl: float
    n_evals: int
    seconds: float
    curves: dict[str, list[float]] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)


class Objective:
    """KL(dense ‖ sparse) over the scored halves of calibration chunks."""

    def __init__(self, engine: Engine, cal: Calibration, svd: object | None, *, chunk: int = 256,
                 max_chunks: int = 2) -> None:
        self.engine, self.cal, self.svd = engine, cal, svd
        chunk = min(chunk, len(cal.tokens) // 2 * 2)  # a short calibration still gives one chunk
        self.hc = HalfChunks.prepare(engine, cal.tokens, chunk, max_chunks)
        self.n_evals = 0

    def __call__(self, alloc: Allocation) -> float:
        self.n_evals += 1
        specs = [s for s in build_specs(self.engine, self.cal, alloc) if s.t >= 0]
        return self.hc.kl(self.engine, SparseBackend(self.engine, specs, self.svd))


def units(engine: Engine, groups: int) -> dict[Unit, list[tuple[int, str]]]:
    n = engine.config.n_layers
    out: dict[Unit, list[tuple[int, str]]] = {}
    for il in range(n):
        for name in LINEAR_NAMES:
            out.setdefault((name, il * groups // n), []).append((il, name))
    return out


def alloc_for(engine: Engine, members: dict[Unit, list[tuple[int, str]]],
           setting: dict[Unit, tuple[float, float]]) -> Allocation:
    return {m: setting.get(u, (0.0, 1.0)) for u, ms in members.items() for m in ms}


def uniform(engine: Engine, target: float, alpha: float = 1.0) -> Allocation:
    return {(il, n): (target, alpha) for il in range(engine.config.n_layers) for n in LINEAR_NAMES}


def unit_sizes(engine: Engine, members: dict[Unit, list[tuple[int, str]]]) -> dict[Unit, float]:
    return {u: float(sum(module_size(engine, il, n) for il, n in ms)) for u, ms in members.items()}


def local_search(obj: Objective, members: dict[Unit, list[tuple[int, str]]], sizes: dict[Unit, float],
                 setting: dict[Unit, tuple[float, float]], deadline: float, alphas=ALPHAS,
                 delta: float = 0.1, progress: Callable[[int, int], None] | None = None):
    """Budget-neutral moves guided by each unit's measured KL slope at the current point.

    Each round measures, for every unit, the KL change of sparsifying it by δ more and of
    densifying it by δ (and of switching its α), then moves budget from the units whose
    sparsity costs most to those whose sparsity costs least, keeping the model-level total.
    Interactions between units are measured, not assumed additive.
    """
    engine = obj.engine
    base = obj(alloc_for(engine, members, setting))
    history = [base]
    us = list(members)
    while time.perf_counter() < deadline and delta >= STEP / 2:
        up: dict[Unit, float] = {}
        down: dict[Unit, float] = {}
        flips: dict[Unit, float] = {}
        for i, u in enumerate(us):
            s, a = setting[u]
            if s + delta <= S_MAX:
                up[u] = (obj(alloc_for(engine, members, {**setting, u: (s + delta, a)})) - base) / sizes[u]
            if s - delta >= 0:
                down[u] = (base - obj(alloc_for(engine, members, {**setting, u: (s - delta, a)}))) / sizes[u]
            if len(alphas) > 1 and s > 0:
                other = alphas[(alphas.index(a) + 1) % len(alphas)] if a in alphas else alphas[0]
                k = obj(alloc_for(engine, members, {**setting, u: (s, other)}))
                if k < base:
                    flips[u] = other
            if progress:
                progress(i + 1, len(us))
            if time.perf_counter() > deadline:
                break
        cheap = sorted(up, key=up.get)
        dear = sorted(down, key=down.get, reverse=True)
        best = (base, setting)
        for m in (4, 2, 1):
            cand = {**setting, **{u: (setting[u][0], a) for u, a in flips.items()}}
            pairs = [(c, d) for c, d in zip(cheap, dear, strict=False) if c != d][:m]
            for c, d in pairs:
                sc, ac = cand[c]
                sd, ad = cand[d]
                moved = delta * sizes[c] / sizes[d]
                if sd - moved < 0:
                    continue
                cand[c], cand[d] = (round(sc + delta, 4), ac), (round(sd - moved, 4), ad)
            k = obj(alloc_for(engine, members, cand))
            if k < best[0]:
                best = (k, cand)
        if best[0] < base:
            base, setting = best
        else:
            delta /= 2
        history.append(base)
    return setting, base, history


def search(engine: Engine, cal: Calibration, target: float, *, method: str = "greedy",
           svd: object | None = None, groups: int = 1, budget_minutes: float = 5.0,
           alphas=ALPHAS, seed: int = 0, objective: Objective | None = None,
           progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """`greedy`: KL-slope-guided moves from the uniform allocation within the time budget;
    `evolutionary`: the same start, then random budget-neutral mutations; `uniform`: none."""
    t0 = time.perf_counter()
    deadline = t0 + budget_minutes * 60
    obj = objective or Objective(engine, cal, svd)
    start_evals = obj.n_evals
    if method == "uniform":
        alloc = uniform(engine, target, alphas[0] if len(alphas) == 1 else 1.0)
        return SearchResult(alloc, obj(alloc), obj.n_evals - start_evals, time.perf_counter() - t0)
    members = units(engine, groups)
    sizes = unit_sizes(engine, members)
    start = dict.fromkeys(members, (target, 1.0))
    greedy_deadline = deadline if method == "greedy" else t0 + (deadline - t0) / 2
    setting, kl, history = local_search(obj, members, sizes, start, greedy_deadline, alphas,
                                        progress=progress)
    if method == "evolutionary":
        setting, kl, more = _evolve(obj, members, sizes, setting, kl, alphas, deadline,
                                    np.random.default_rng(seed))
        history += more
    alloc = alloc_for(engine, members, setting)
    return SearchResult(alloc, kl, obj.n_evals - start_evals, time.perf_counter() - t0, {}, history)


def _evolve(obj: Objective, members, sizes, setting, kl, alphas, deadline, rng):
    """(1+1) evolution: move sparsity between two units at equal cost, or flip a unit's α."""
    us = list(members)
    history = [kl]
    while time.perf_counter() < deadline:
        cand = dict(setting)
        if rng.random() < 0.25 and len(alphas) > 1:
            u = us[rng.integers(len(us))]
            s, a = cand[u]
            cand[u] = (s, alphas[(alphas.index(a) + 1) % len(alphas)] if a in alphas else alphas[0])
        else:
            i, j = rng.choice(len(us), size=2, replace=False)
            ui, uj = us[i], us[j]
            d = float(rng.choice([STEP, 2 * STEP]))
            si = cand[ui][0] + d
            sj = cand[uj][0] - d * sizes[ui] / sizes[uj]
            if si > S_MAX or sj < 0:
                continue
            cand[ui], cand[uj] = (round(si, 4), cand[ui][1]), (round(sj, 4), cand[uj][1])
        k = obj(alloc_for(obj.engine, members, cand))
        history.append(min(k, kl))
        if k < kl:
            setting, kl = cand, k
    return setting, kl, history
