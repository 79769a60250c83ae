"""The feedback loop's split and iterations on the bundled model (tiny calibration set)."""

from __future__ import annotations

import numpy as np
import pytest

from bias.feedback import LoopConfig, run_loop, split
from bias.scorer import BatchScorer
from bias.steering import compute_directions
from bias.suites import load_suite
from edge.errors import BadOptionError
from tests.test_bias_suites import CROWS


def test_split_is_stratified_random_and_reproducible() -> None:
    s = load_suite(f"crows_pairs:{CROWS}")
    cal, held = split(s, 0.3, seed=0, exclude="disability")
    assert split(s, 0.3, seed=0, exclude="disability") == (cal, held)
    assert split(s, 0.3, seed=1, exclude="disability")[0] != cal
    assert sorted(cal + held) == list(range(len(s.items))) and not set(cal) & set(held)
    cats = np.array([it.category for it in s.items])
    assert not any(cats[i] == "disability" for i in cal)
    for c in set(cats) - {"disability"}:
        n = int((cats == c).sum())
        assert abs(sum(cats[i] == c for i in cal) - 0.3 * n) <= 1
    # never a contiguous block: calibration rows spread over the ordered file
    assert min(cal) < 50 and max(cal) > 1450 and max(np.diff(cal)) < 60


@pytest.mark.slow
def test_loop_logs_iterations_and_respects_the_budget(runtime) -> None:
    suite = load_suite("probes").subset([0, 60])
    rng = np.random.default_rng(0)
    n_layers, n_embd = runtime.info.n_layers, runtime.info.n_embd
    less = rng.standard_normal((8, n_layers, n_embd)).astype(np.float32)
    d = compute_directions(less + 0.5, less, "mean")
    ppl_toks = [runtime.llm.token_bos(), *runtime.tokenize("def f(x):\n    return x + 1\n", add_bos=False)]
    events = []
    with BatchScorer(runtime, n_batch=256, n_seq=16) as sc:
        res = run_loop(sc, suite, d, LoopConfig(max_iter=1, max_ppl_increase=0.02, first_gain=-0.3),
                       ppl_toks, on_event=lambda k, e: events.append(e))
        assert sc._buf is None  # the loop leaves the scoring context clean
    its = res.iterations
    assert its[0].gain == 0 and its[0].ppl_increase == 0 and len(its) == 2 and len(events) == 2
    assert its[1].gain == pytest.approx(-0.3)
    chosen = [it for it in its if it.gain == res.gain][0]
    assert chosen.feasible and chosen.ppl_increase <= 0.02
    np.testing.assert_allclose(res.coefficients[1:] / max(res.gain, 1e-9) if res.gain else 0,
                               (d.snr[1:] / d.snr[1:].mean()) if res.gain else 0, rtol=1e-5)


def test_bad_loop_config() -> None:
    with pytest.raises(BadOptionError):
        LoopConfig(target=1.5).validate()
    with pytest.raises(BadOptionError):
        LoopConfig(calib_frac=1.0).validate()
