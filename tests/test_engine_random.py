"""The native engine on converted random checkpoints: llama.cpp and an independent numpy
forward of the Hugging Face weights must both agree with it (f32, so agreement is tight)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import TinySpec, llama_logits, make_checkpoint, numpy_forward

from edge.convert import convert
from edge.engine import Engine
from edge.engine.verify import compare_logits

CASES = {
    "gqa-tied": TinySpec("bpe", n_head=8, n_head_kv=2, tied=True, seed=5),
    "mha-linear-rope": TinySpec("bpe", rope_scaling={"type": "linear", "factor": 2.0},
                                rope_theta=50000.0, seed=6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_random_checkpoint_matches_llama_cpp_and_hf(tmp_path: Path, case: str) -> None:
    spec = CASES[case]
    hf = tmp_path / "hf"
    weights = make_checkpoint(hf, spec)
    cfg = json.loads((hf / "config.json").read_text())
    out = tmp_path / "tiny.f32.gguf"
    convert(hf, out, outtype="f32")
    engine = Engine.from_gguf(out)
    rng = np.random.default_rng(spec.seed)
    tokens = [int(t) for t in rng.integers(3, cfg["vocab_size"], 80)]
    ours = engine.forward(tokens, return_hidden=True)
    ref_hf = numpy_forward(weights, cfg, tokens)
    ref_cpp = llama_logits(out, tokens)
    np.testing.assert_allclose(ours.logits, ref_hf, rtol=0, atol=2e-3 * np.abs(ref_hf).max())
    a = compare_logits(ref_cpp, ours.logits)
    assert a.top1 >= 0.97 and a.mean_kl <= 0.01, a
    assert ours.hidden.shape == (spec.n_layers, 80, spec.n_embd)
