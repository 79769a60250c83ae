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
