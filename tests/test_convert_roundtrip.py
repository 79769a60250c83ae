"""The bundled real model's round trip: GGUF (Q4_1) → HF folder (f32, tokenizer.json) → edge
convert → GGUF. Exact tensors, identical tokenization, and an f16 conversion that agrees
with the original Q4_1 file's next-token predictions."""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import gguf
import numpy as np
import pytest

from edge.convert import convert
from edge.evaluate import runtime_logits
from edge.export_hf import export_hf
from edge.logprobs import log_softmax as _log_softmax
from edge.runtime import Runtime, RuntimeConfig

MULTILINGUAL = "Héllo wörld! 東京は晴れ 🌞🚀 — привет, مرحبا, 12345 <|im_start|>user\n"
KEYS = ["llama.context_length", "llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template", "tokenizer.ggml.token_type"]


@pytest.fixture(scope="module")
def roundtrip(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("roundtrip")
    export_hf(bundled_model, d / "hf", dtype="f32")
    convert(d / "hf", d / "rt.f32.gguf", outtype="f32")
    convert(d / "hf", d / "rt.f16.gguf", outtype="f16")
    return {"hf": d / "hf", "f32": d / "rt.f32.gguf", "f16": d / "rt.f16.gguf"}


@pytest.mark.slow
def test_every_tensor_comes_back_exactly(bundled_model: Path, roundtrip: dict[str, Path]) -> None:
    orig = gguf.GGUFReader(bundled_model)
    back = {t.name: t for t in gguf.GGUFReader(roundtrip["f32"]).tensors}
    assert set(back) == {t.name for t in orig.tensors}
    for t in orig.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        got = back[t.name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(got.data), want), t.name
    of, bf = orig.fields, gguf.GGUFReader(roundtrip["f32"]).fields
    for k in KEYS:
        assert of[k].contents() == bf[k].contents(), k
    assert of["tokenizer.ggml.tokens"].contents() == bf["tokenizer.ggml.tokens"].contents()
    assert of["tokenizer.ggml.merges"].contents() == bf["tokenizer.ggml.merges"].contents()


@pytest.mark.slow
def test_tokenization_is_identical(bundled_model: Path, roundtrip: dict[str, Path]) -> None:
    import llama_cpp
    from tokenizers import Tokenizer

    a = llama_cpp.Llama(model_path=str(bundled_model), vocab_only=True, verbose=False)
    b = llama_cpp.Llama(model_path=str(roundtrip["f16"]), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(roundtrip["hf"] / "tokenizer.json"))
    for special in (False, True):
        ta = a.tokenize(MULTILINGUAL.encode(), add_bos=True, special=special)
        assert ta == b.tokenize(MULTILINGUAL.encode(), add_bos=True, special=special)
    plain = MULTILINGUAL.split("<|")[0]
    assert a.tokenize(plain.encode(), add_bos=False, special=False) == hf.encode(plain).ids
    assert b.detokenize(b.tokenize(plain.encode(), add_bos=False, special=False)).decode() == plain
    a.close()
    b.close()


@pytest.mark.slow
def test_f16_agrees_with_original_q4_1(bundled_model: Path, roundtrip: dict[str, Path]) -> None:
    cfg = RuntimeConfig(n_ctx=512, threads=1)
    orig, conv = Runtime(bundled_model, cfg), Runtime(roundtrip["f16"], cfg)
    try:
        # Python's own documentation (pydoc_data ships with CPython): the project's neutral text
        text = "\n\n".join(topics[k] for k in sorted(topics))[:6000]
        body = orig.tokenize(text, add_bos=False)[:511]
        assert len(body) == 511 and conv.tokenize(text, add_bos=False)[:511] == body
        tokens = [orig.llm.token_bos(), *body]  # as edge eval ppl and the bias scorer feed text
        base = _log_softmax(runtime_logits(orig)(tokens, 0))
        ours = _log_softmax(runtime_logits(conv)(tokens, 0))
    finally:
        orig.close()
        conv.close()
    top1 = (base.argmax(1) == ours.argmax(1)).mean()
    kld = (np.exp(base) * (base - ours)).sum(1).mean()
    print(f"f16 vs Q4_1 over 512 tokens: top-1 agreement {top1:.4f}, mean KL {kld:.5f}")
    # Measured 97.3 % here. The margin is thin and text-dependent — eight 512-token windows
    # of this text give 95.7-98.1 % (mean 97.0 %), this one without the BOS 96.9 %, the
    # GPL-3 text 96.3 % — and the bit-exact
    # f32 conversion gives the same figures: the gap is Q4_1's kernel, which quantizes
    # activations to 8 bits, not the conversion (test_every_tensor_comes_back_exactly).
    assert top1 >= 0.97
    assert kld <= 0.01
