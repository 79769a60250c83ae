"""The native engine against llama.cpp on the bundled model, and its own invariants."""

from __future__ import annotations

import numpy as np
import pytest
from _engine_shared import bundled_engine, doc_text

from edge.engine import KVCache
from edge.engine.verify import agreement
from edge.errors import BadOptionError, ContextOverflowError, InvalidModelFileError


@pytest.fixture(scope="module")
def engine():
    return bundled_engine()


def test_config_matches_gguf_metadata(engine, runtime):
    c, info = engine.config, runtime.info
    assert (c.n_layers, c.n_embd, c.n_head, c.n_head_kv, c.n_ff, c.n_vocab) == (
        info.n_layers, info.n_embd, info.n_head, info.n_head_kv, info.n_ff, info.n_vocab)
    assert c.rope_theta == 100000.0 and c.head_dim == 64


def test_agrees_with_llama_cpp(engine, runtime):
    # 256 tokens of prose: the 512-token acceptance figure is in benchmarks/engine_agreement.py.
    tokens = runtime.tokenize(doc_text())[:256]
    assert len(tokens) == 256
    a = agreement(engine, runtime, tokens)
    # llama.cpp quantizes activations to 8 bits for Q4_1 matmuls, so the rare top-1
    # disagreements are near-ties; the distribution as a whole must match closely.
    assert a.mean_kl <= 0.01, a
    assert a.top1 >= 0.93, a


def test_tokenizer_is_llama_cpp(engine, runtime):
    text = "Hello, world! Ünïcode and code: def f(x): return x"
    assert engine.tokenize(text) == runtime.tokenize(text)
    assert engine.detokenize(engine.tokenize(text, add_bos=False)) == text


def test_kv_cache_matches_full_pass(engine):
    tokens = engine.tokenize(doc_text())[:24]
    full = engine.forward(tokens, return_hidden=True)
    cache = KVCache(engine.config, 32)
    a = engine.forward(tokens[:16], cache=cache, return_hidden=True)
    steps = [engine.forward([t], cache=cache, return_hidden=True) for t in tokens[16:]]
    logits = np.concatenate([a.logits] + [s.logits for s in steps])
    hidden = np.concatenate([a.hidden] + [s.hidden for s in steps], axis=1)
    assert cache.n_past == 24
    np.testing.assert_allclose(logits, full.logits, rtol=0, atol=2e-3)
    np.testing.assert_allclose(hidden, full.hidden, rtol=1e-5, atol=2e-3)  # |h| reaches 2e4
    assert full.hidden.shape == (engine.config.n_layers, 24, engine.config.n_embd)


def test_hidden_is_residual_after_each_layer(engine):
    # A control vector on layer il shifts hidden[il] by exactly that vector, and nothing before.
    tokens = engine.tokenize("The cat sat on the mat.")
    base = engine.forward(tokens, return_hidden=True)
    ctrl = np.zeros((engine.config.n_layers, engine.config.n_embd), dtype=np.float32)
    ctrl[10] = 0.5
    steered = engine.forward(tokens, return_hidden=True, control=ctrl)
    np.testing.assert_array_equal(steered.hidden[:10], base.hidden[:10])
    np.testing.assert_allclose(steered.hidden[10] - base.hidden[10], 0.5, atol=1e-4)
    assert not np.allclose(steered.logits, base.logits, atol=1e-3)


def test_bad_input(engine, tmp_path):
    with pytest.raises(BadOptionError):
        engine.forward([])
    with pytest.raises(BadOptionError):
        engine.forward([engine.config.n_vocab])
    with pytest.raises(ContextOverflowError):
        engine.forward([1, 2, 3], cache=KVCache(engine.config, 2))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    from edge.engine import Engine

    with pytest.raises(InvalidModelFileError):
        Engine.from_gguf(bad)
