"""The allocation search on a hand-made objective (no model needed)."""

from __future__ import annotations

import pytest


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
