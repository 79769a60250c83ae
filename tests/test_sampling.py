"""The one sampler (edge.sampling): its chain cut by hand and against llama.cpp's own C
chain, its draws, and both engines choosing the same tokens from the same logits."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edge.sampling import Sampling, candidates, sample_rows

# ids 0..7 in a shuffled order, logits 3, 2, 1, 0.5, 0, -1, -2, -3 (best first: 5, 2, 7, 0, ...)
HAND_IDS = np.array([5, 2, 7, 0, 3, 6, 1, 4])
HAND = np.empty(8, np.float32)
HAND[HAND_IDS] = [3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]


def _softmax(v: list[float]) -> np.ndarray:
    e = np.exp(np.asarray(v) - max(v))
    return e / e.sum()


@pytest.mark.parametrize(("kw", "recent", "kept", "vals"), [
    ({"top_k": 3}, [], [5, 2, 7], [3.0, 2.0, 1.0]),
    ({"top_k": 0, "top_p": 0.9}, [], [5, 2, 7], [3.0, 2.0, 1.0]),  # cumulative .60 .82 .904
    ({"top_k": 0, "top_p": 0.82}, [], [5, 2], [3.0, 2.0]),  # .8227 ≥ .82 already
    ({"top_k": 0, "min_p": 0.1}, [], [5, 2, 7], [3.0, 2.0, 1.0]),  # logit ≥ 3 + ln .1 = 0.70
    ({"top_k": 0, "min_p": 0.2}, [], [5, 2], [3.0, 2.0]),  # ≥ 3 + ln .2 = 1.39
    ({"top_k": 0, "temp": 2.0}, [], list(HAND_IDS), [1.5, 1.0, .5, .25, 0, -.5, -1, -1.5]),
    # penalty 2.5, once per token however often seen: 2 → 0.8, -1 → -2.5
    ({"top_k": 3, "repeat_penalty": 2.5}, [2, 6, 2], [5, 7, 2], [3.0, 1.0, 0.8]),
    ({"top_k": 0, "repeat_penalty": 2.5}, [6], [5, 2, 7, 0, 3, 1, 6, 4], [3, 2, 1, .5, 0, -2, -2.5, -3]),
])
def test_chain_cuts_the_tokens_it_should(kw: dict[str, float], recent: list[int], kept: list[int],
                                         vals: list[float]) -> None:
    s = Sampling(**({"temp": 1.0, "top_p": 1.0, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0} | kw))
    ids, p = candidates(HAND, s, recent)
    assert ids.tolist() == kept
    np.testing.assert_allclose(p, _softmax(vals), rtol=1e-5)  # temperature already in vals


def test_draws_follow_the_kept_probabilities_and_greedy_is_penalized_argmax() -> None:
    s = Sampling(temp=1.0, top_p=1.0, top_k=3, min_p=0.0, repeat_penalty=1.0)
    rng = np.random.default_rng(0)
    n = 20000
    toks = sample_rows(np.tile(HAND, (n, 1)), [[]] * n, [rng] * n, s)
    freq = np.bincount(toks, minlength=8) / n
    assert freq[[0, 1, 3, 4, 6]].sum() == 0  # cut by top_k: never drawn
    np.testing.assert_allclose(freq[[5, 2, 7]], _softmax([3, 2, 1]), atol=0.01)
    pen = Sampling(temp=0.8, repeat_penalty=2.0)
    assert sample_rows(HAND[None], [[]], [None], pen).tolist() == [5]
    assert sample_rows(HAND[None], [[5]], [None], pen).tolist() == [2]  # 3 / 2 < 2


def _llama_chain(logits: np.ndarray, s: Sampling, recent: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's own chain, as llama-cpp-python builds it for Llama.generate."""
    import llama_cpp as L

    ch = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for smp in (L.llama_sampler_init_penalties(len(logits), 64, s.repeat_penalty, 0.0, 0.0),
                L.llama_sampler_init_top_k(s.top_k), L.llama_sampler_init_typical(1.0, 1),
                L.llama_sampler_init_top_p(s.top_p, 1), L.llama_sampler_init_min_p(s.min_p, 1),
                L.llama_sampler_init_temp(s.temp), L.llama_sampler_init_dist(1)):
        L.llama_sampler_chain_add(ch, smp)
    for t in recent:
        L.llama_sampler_accept(ch, t)
    data = (L.llama_token_data * len(logits))(*[L.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
    arr = L.llama_token_data_array(data, len(logits), -1, False)
    L.llama_sampler_apply(ch, ctypes.byref(arr))
    L.llama_sampler_free(ch)
    return [data[i].id for i in range(arr.size)], np.array([data[i].p for i in range(arr.size)])


@pytest.mark.parametrize("kw", [{}, {"temp": 1.3, "top_k": 0}, {"top_p": 0.7, "min_p": 0.02},
                                {"top_k": 5, "repeat_penalty": 1.5}])
def test_numpy_chain_keeps_what_llamacpp_keeps(kw: dict[str, float]) -> None:
    s = Sampling(**kw)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = (rng.standard_normal(1000) * 3).astype(np.float32)
        recent = rng.integers(0, 1000, 40).tolist() + np.argsort(-x)[:3].tolist()  # penalize leaders
        ids, p = candidates(x, s, recent)
        ref_ids, ref_p = _llama_chain(x, s, recent)
        assert ids.tolist() == ref_ids
        np.testing.assert_allclose(p, ref_p, rtol=1e-4, atol=1e-7)


# ---- both engines, one chain -----------------------------------------------------------
def _fixture_logits(n_vocab: int, steps: int = 12) -> list[np.ndarray]:
    """Logits with a few strong candidates per step, so a temp 0.8 draw has real choices."""
    rng = np.random.default_rng(11)
    rows = []
    for _ in range(steps):
        x = rng.standard_normal(n_vocab).astype(np.float32)
        x[rng.choice(n_vocab, 6, replace=False)] += 8.0
        rows.append(x)
    return rows


class _FixtureEngine:
    """A stand-in for edge.engine.Engine whose forward() returns the fixture's logits."""

    def __init__(self, rows: list[np.ndarray]) -> None:
        from edge.engine.config import ModelArgs

        self.rows = iter(rows)
        self.config = ModelArgs(n_layers=1, n_embd=8, n_head=1, n_head_kv=1, n_ff=8,
                                n_vocab=len(rows[0]), context_length=4096)
        self.info = self.path = None

    def forward(self, tokens, **kw):
        from edge.engine.model import ForwardResult

        return ForwardResult(logits=next(self.rows)[None, :])

    def new_cache(self, n: int) -> None:
        return None

    def token_piece(self, token: int, special: bool = False) -> bytes:
        return b"x"

    def is_eog(self, token: int) -> bool:
        return False


def test_native_engine_and_llamacpp_draw_the_same_tokens(runtime) -> None:
    """--temp 0.8 --seed S: the llama.cpp session and the native engine, handed the same
    logits (a shared fixture in place of their forward passes), choose the same tokens."""
    from edge.engine.generate import NativeGenerator

    rows = _fixture_logits(runtime.n_vocab)
    s = Sampling(temp=0.8, seed=1234)
    native = NativeGenerator.__new__(NativeGenerator)
    native.model, native.backend, native.load_ms, native.n_ctx = _FixtureEngine(rows), None, 0.0, 4096
    list(native.stream([1, 2, 3], max_tokens=len(rows), sampling=s))
    feed = iter(rows)
    runtime._prefill = runtime._advance = lambda *a: next(feed)  # type: ignore[method-assign]
    runtime.is_eog = lambda t: False  # type: ignore[method-assign]
    try:
        list(runtime.stream([1, 2, 3], max_tokens=len(rows), sampling=s))
    finally:
        del runtime._prefill, runtime._advance, runtime.is_eog
    assert runtime.last is not None and native.last is not None
    assert len(native.last.token_ids) == len(rows)
    assert runtime.last.token_ids == native.last.token_ids
    # the draw really sampled (not greedy): some step took a token other than the argmax
    assert any(t != int(np.argmax(r)) for t, r in zip(native.last.token_ids, rows, strict=True))


def test_seeded_draws_repeat_and_greedy_ignores_the_seed() -> None:
    rows = np.stack(_fixture_logits(4096, 64))
    draws = [sample_rows(rows, [[]] * len(rows), [np.random.default_rng(7)] * len(rows),
                         Sampling(temp=0.8)) for _ in range(2)]
    assert (draws[0] == draws[1]).all()
    other = sample_rows(rows, [[]] * len(rows), [np.random.default_rng(8)] * len(rows), Sampling(temp=0.8))
    assert (other != draws[0]).any()
    greedy = sample_rows(rows, [[]] * len(rows), [None] * len(rows), Sampling(temp=0.8))
    assert (greedy == rows.argmax(axis=1)).all()
