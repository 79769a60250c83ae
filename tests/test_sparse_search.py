"""The allocation step of the search on hand-made KL curves (no model needed)."""

from __future__ import annotations

import pytest

from edge.sparse.search import LEVELS, allocate


def _curve(slope: float, alpha_at_high: float = 1.0) -> dict[float, tuple[float, float]]:
    return {s: (slope * s * s, alpha_at_high if s >= 0.6 else 1.0) for s in LEVELS}


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_allocation_meets_the_budget_and_spends_it_where_kl_is_cheap(target):
    curves = {("gate", 0): _curve(1.0), ("q", 0): _curve(20.0), ("down", 0): _curve(2.0, 0.8)}
    sizes = {("gate", 0): 3.0, ("q", 0): 1.0, ("down", 0): 3.0}
    got = allocate(curves, sizes, target)
    achieved = sum(got[u][0] * sizes[u] for u in got) / sum(sizes.values())
    assert target - 1e-9 <= achieved < target + 0.05
    assert got[("gate", 0)][0] >= got[("down", 0)][0] >= got[("q", 0)][0]
    assert all(0 <= s <= 0.95 for s, _ in got.values())
    # α comes from the curve at the chosen sparsity.
    s_down, a_down = got[("down", 0)]
    assert a_down == (0.8 if s_down > 0.4 else 1.0)


def test_zero_target_keeps_everything_dense():
    got = allocate({("q", 0): _curve(1.0)}, {("q", 0): 1.0}, 0.0)
    assert got == {("q", 0): (0.0, 1.0)}


def test_local_search_moves_budget_to_cheap_units_and_keeps_the_total():
    import time

    from edge.sparse.search import local_search

    members = {("gate", 0): [(0, "gate")], ("q", 0): [(0, "q")], ("down", 0): [(0, "down")]}
    sizes = {("gate", 0): 3.0, ("q", 0): 1.0, ("down", 0): 3.0}
    weight = {"gate": 1.0, "q": 8.0, "down": 2.0}

    class Fake:  # KL grows with the square of each module's sparsity; α = 0.8 helps q only
        engine = None
        n_evals = 0

        def __call__(self, alloc):
            self.n_evals += 1
            return sum(weight[n] * s * s * (0.5 if (n == "q" and a < 1) else 1.0)
                       for (_, n), (s, a) in alloc.items())

    start = dict.fromkeys(members, (0.5, 1.0))
    obj = Fake()
    setting, kl, history = local_search(obj, members, sizes, start, time.perf_counter() + 5)
    total = sum(setting[u][0] * sizes[u] for u in sizes) / sum(sizes.values())
    assert total == pytest.approx(0.5, abs=1e-3)  # moves are rounded to 4 decimals
    assert kl < history[0] * 0.8
    assert setting[("gate", 0)][0] > 0.5 > setting[("q", 0)][0]
    assert setting[("q", 0)][1] == 0.8 and setting[("gate", 0)][1] == 1.0
