"""edge convert against independent oracles: sentencepiece / tokenizers for the vocabulary,
a numpy forward of the Hugging Face weights for the logits, llama.cpp as the loader."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from convert_helpers import (
    TEST_STRINGS,
    TinySpec,
    llama_logits,
    make_checkpoint,
    numpy_forward,
    reference_tokenize,
)

from edge.convert import convert, permute_qk, unpermute_qk

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "spm-mha-untied-single-f32": (TinySpec("spm"), "f32"),
    "spm-gqa-tied-sharded-f16": (TinySpec("spm", n_head_kv=2, tied=True, shards=3, dtype="f16", seed=1), "f16"),
    "bpe-smollm-gqa-untied-sharded-f32": (TinySpec("bpe-smollm", n_head=8, n_head_kv=2, shards=2, vocab_pad=12,
                                            rope_scaling={"type": "linear", "factor": 2.0}, seed=2), "f32"),
    "bpe-llama3-mha-tied-single-f16": (TinySpec("bpe-llama3", tied=True, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                                         seed=3), "f16"),
}


def _vocab_model(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_numpy_forward_and_tokenizer(tmp_path: Path, case: str) -> None:
    spec, outtype = CASES[case]
    hf = tmp_path / "hf"
    weights = make_checkpoint(hf, spec)
    cfg = json.loads((hf / "config.json").read_text())
    out = tmp_path / f"tiny.{outtype}.gguf"
    res = convert(hf, out, outtype=outtype)
    assert res.n_vocab == cfg["vocab_size"]
    pre = {"spm": "default", "bpe-smollm": "smollm", "bpe-llama3": "llama-bpe"}[spec.tokenizer]
    assert res.tokenizer.endswith(f"pre {pre})")

    llm = _vocab_model(out)
    for text in TEST_STRINGS:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ours == reference_tokenize(hf, spec.tokenizer, text), text
    # Byte fallback / byte-level BPE must round-trip text the tokenizer never saw in training.
    emoji = TEST_STRINGS[3]
    back = llm.detokenize(llm.tokenize(emoji.encode(), add_bos=False, special=False)).decode()
    assert (back.removeprefix(" ") if spec.tokenizer == "spm" else back) == emoji  # spm: dummy prefix
    llm.close()

    tokens = reference_tokenize(hf, spec.tokenizer, " ".join(TEST_STRINGS[:4]))[:96]
    ref = numpy_forward(weights, cfg, tokens)
    got = llama_logits(out, tokens)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-2, f"relative max error {rel:.2e}"
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_metadata_and_tensor_types(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    make_checkpoint(hf, TinySpec("spm", n_head_kv=2, rope_scaling=LLAMA3_SCALING))
    out = tmp_path / "m.gguf"
    convert(hf, out, outtype="f16")
    r = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items() if k not in ("tokenizer.ggml.tokens",)}
    assert kv["general.name"] == "tiny"
    assert kv["general.size_label"].endswith("K")
    assert kv["general.source.url"] == "https://huggingface.co/edge-tests/tiny"
    assert kv["llama.attention.head_count_kv"] == 2
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert kv["tokenizer.ggml.bos_token_id"] == 1
    assert kv["tokenizer.chat_template"].startswith("{% for m in messages %}")
    types = kv["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[3:259] == [gguf.TokenType.BYTE] * 256  # <0x00>..<0xFF>: the byte fallback
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in t and "rope_freqs.weight" in t
    factors = np.asarray(t["rope_freqs.weight"].data)
    assert factors[0] == 1.0 and factors[-1] == 4.0  # high frequencies kept, low ones scaled


@pytest.mark.parametrize("outtype,qtype,tol", [("bf16", "BF16", 2e-2), ("q8_0", "Q8_0", 1e-1)])
def test_low_precision_outtypes(tmp_path: Path, outtype: str, qtype: str, tol: float) -> None:
    hf = tmp_path / "hf"
    weights = make_checkpoint(hf, TinySpec("bpe", n_head_kv=2, seed=5))
    out = tmp_path / "m.gguf"
    convert(hf, out, outtype=outtype)
    r = gguf.GGUFReader(out)
    assert {x.tensor_type.name for x in r.tensors if len(x.shape) == 2} == {qtype}
    # Dequantized weights equal gguf's own quantizer applied to the (permuted) originals.
    want = gguf.quants.quantize(permute_qk(weights["model.layers.0.self_attn.q_proj.weight"], 4),
                                getattr(gguf.GGMLQuantizationType, qtype))
    got = next(x for x in r.tensors if x.name == "blk.0.attn_q.weight")
    assert np.array_equal(np.asarray(got.data).view(np.uint8).reshape(want.shape), want)
    cfg = json.loads((hf / "config.json").read_text())
    tokens = reference_tokenize(hf, "bpe", TEST_STRINGS[1])
    ref = numpy_forward(weights, cfg, tokens)
    rel = np.abs(llama_logits(out, tokens) - ref).max() / np.abs(ref).max()
    assert rel < tol


def test_permutation_inverse_and_rotary_pairs() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2 * 8, 5))  # 2 heads of dim 8
    p = permute_qk(w, 2)
    assert np.array_equal(unpermute_qk(p, 2), w)
    # Head 0: HF rows (0, 4) form the first rotary pair; GGUF puts them side by side.
    assert np.array_equal(p[0], w[0]) and np.array_equal(p[1], w[4]) and np.array_equal(p[2], w[1])


def test_memory_stays_near_largest_tensor(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    spec = TinySpec("bpe", n_embd=128, n_ff=384, n_layers=8, n_head=4, n_head_kv=2, seed=7)
    weights = make_checkpoint(hf, spec)
    total = sum(w.nbytes for w in weights.values())
    largest = max(w.nbytes for w in weights.values())
    del weights
    tracemalloc.start()
    try:
        convert(hf, tmp_path / "m.gguf", outtype="f16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 8 * largest
    # Python-side bookkeeping (vocab lists, metadata) is ~1 MB; the weights add ~2 tensors.
    assert peak < 3 * largest + 2_000_000, (peak, largest, total)


def test_mistral_bf16_checkpoint(tmp_path: Path) -> None:
    """Llama-3 / Mistral checkpoints ship bf16; widening to f32 must be exact."""
    from convert_helpers import save_bf16_safetensors

    hf = tmp_path / "hf"
    make_checkpoint(hf, TinySpec("spm", n_head_kv=2, seed=9))
    from safetensors.numpy import load_file

    stored = save_bf16_safetensors(load_file(str(hf / "model.safetensors")), hf / "model.safetensors")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["sliding_window"] = None
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    convert(hf, out, outtype="f32")
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    assert np.array_equal(np.asarray(t["blk.1.ffn_up.weight"].data), stored["model.layers.1.mlp.up_proj.weight"])
    tokens = reference_tokenize(hf, "spm", TEST_STRINGS[2])
    ref = numpy_forward(stored, cfg, tokens)
    got = llama_logits(out, tokens)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-2
    assert (got.argmax(1) == ref.argmax(1)).all()
