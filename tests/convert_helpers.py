"""Tiny random Llama checkpoints for the converter tests, and an independent numpy forward.

Everything is built inside the test: weights (numpy + safetensors), a SentencePiece BPE
model with byte fallback trained on the fly, a byte-level BPE tokenizer.json trained with
`tokenizers`. The numpy forward follows transformers' LlamaForCausalLM (rotate-half RoPE,
repeat_kv for GQA) and knows nothing about GGUF, so it judges the converter independently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_WORDS_TEXT = (
    "the a of and to in is was for on that with as by at from it this be are or an which "
    "model small device memory token layer weight river mountain city morning evening light "
    "quick brown fox jumps over lazy dog seven eleven numbers 2024 3.14 hello world rain sun"
)
WORDS = _WORDS_TEXT.split()
TEST_STRINGS = [
    "Hello world",
    " the quick brown fox jumps over the lazy dog",
    "Numbers: 12345 and 3.14159, year 2024!",
    "naïve café — Grüße, 東京, Привет 👋🏽 🚀",
    "  leading spaces\tand\ttabs\nnew line\n\nend ",
]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        k = int(rng.integers(4, 14))
        lines.append(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), k)).capitalize() + ".")
    return lines


@dataclass
class TinySpec:
    tokenizer: str = "spm"          # "spm" (tokenizer.model) or "bpe", "bpe-smollm", "bpe-llama3"
    n_embd: int = 64
    n_layers: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    vocab: int = 320               # tokenizer size; config vocab_size may be padded past it
    vocab_pad: int = 0
    tied: bool = False
    shards: int = 1
    dtype: str = "f32"              # dtype of the safetensors weights
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    seed: int = 0


def train_spm(out_dir: Path, vocab: int) -> None:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
    }))


def train_bpe(out_dir: Path, vocab: int, pre: str = "gpt-2") -> None:
    """Byte-level BPE with the pre-tokenizer of GPT-2, SmolLM or Llama-3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from edge.convert.vocab import LLAMA3_REGEX

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama3")
    tok.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                           byte_level]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
    }))


def tokenizer_size(out_dir: Path, kind: str) -> int:
    if kind == "spm":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")).vocab_size()
    return json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"].__len__()


def reference_tokenize(out_dir: Path, kind: str, text: str) -> list[int]:
    if kind == "spm":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")).encode(text)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def random_weights(spec: TinySpec, n_vocab: int) -> dict[str, np.ndarray]:
    """Weights scaled so logits spread over several units: top-1 is never a near tie."""
    rng = np.random.default_rng(spec.seed)
    hd = spec.n_embd // spec.n_head

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, spec.n_embd)).astype(np.float32)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(spec.n_embd)
        w[p + "self_attn.q_proj.weight"] = lin(spec.n_head * hd, spec.n_embd) * 2.0
        w[p + "self_attn.k_proj.weight"] = lin(spec.n_head_kv * hd, spec.n_embd) * 2.0
        w[p + "self_attn.v_proj.weight"] = lin(spec.n_head_kv * hd, spec.n_embd)
        w[p + "self_attn.o_proj.weight"] = lin(spec.n_embd, spec.n_head * hd)
        w[p + "post_attention_layernorm.weight"] = norm(spec.n_embd)
        w[p + "mlp.gate_proj.weight"] = lin(spec.n_ff, spec.n_embd)
        w[p + "mlp.up_proj.weight"] = lin(spec.n_ff, spec.n_embd)
        w[p + "mlp.down_proj.weight"] = lin(spec.n_embd, spec.n_ff)
    w["model.norm.weight"] = norm(spec.n_embd)
    if not spec.tied:
        w["lm_head.weight"] = lin(n_vocab, spec.n_embd) * 3.0
    return w


def make_checkpoint(out_dir: Path, spec: TinySpec) -> dict[str, np.ndarray]:
    """Write config, tokenizer and safetensors; return the weights as float32 (as stored)."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == "spm":
        train_spm(out_dir, spec.vocab)
    else:
        train_bpe(out_dir, spec.vocab, spec.tokenizer.partition("-")[2] or "gpt-2")
    n_vocab = tokenizer_size(out_dir, spec.tokenizer) + spec.vocab_pad
    bos, eos = (1, 2) if spec.tokenizer == "spm" else (0, 2)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "_name_or_path": "edge-tests/tiny",
        "hidden_size": spec.n_embd, "intermediate_size": spec.n_ff, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_head, "num_key_value_heads": spec.n_head_kv,
        "vocab_size": n_vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling,
        "tie_word_embeddings": spec.tied, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "float16" if spec.dtype == "f16" else "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    w = random_weights(spec, n_vocab)
    if spec.dtype == "f16":
        w = {k: v.astype(np.float16) for k, v in w.items()}
    names = list(w)
    if spec.shards == 1:
        save_file(w, str(out_dir / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(spec.shards):
            fname = f"model-{s + 1:05d}-of-{spec.shards:05d}.safetensors"
            part = names[s :: spec.shards]
            save_file({k: w[k] for k in part}, str(out_dir / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {k: v.astype(np.float32) for k, v in w.items()}


# ---- independent forward pass (transformers' Llama semantics) ------------------------------
def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _inv_freq(cfg: dict[str, Any], hd: int) -> np.ndarray:
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def numpy_forward(w: dict[str, np.ndarray], cfg: dict[str, Any], tokens: list[int]) -> np.ndarray:
    """Logits (n_tokens, n_vocab) in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"]
    hd = cfg.get("head_dim") or d // n_head
    eps = cfg["rms_norm_eps"]
    T = len(tokens)
    ang = np.arange(T)[:, None] * _inv_freq(cfg, hd)[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

    def rope(x: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, n_head, hd))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, n_kv, hd))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(T, n_head * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def llama_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    """All-position logits from llama.cpp itself."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(tokens)), n_batch=512,
                          logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 → the nearest bfloat16, returned as its uint16 bit pattern (round to even)."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save_bf16_safetensors(weights: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """safetensors.numpy cannot write bf16 (numpy has no such dtype); the layout is simple.

    Returns the weights as float32 exactly as stored (bf16 widened)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset, stored = [], 0, {}
    for name, w in weights.items():
        b = bf16_round(w)
        header[name] = {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [offset, offset + b.nbytes]}
        blobs.append(b.tobytes())
        offset += b.nbytes
        stored[name] = (b.astype(np.uint32) << 16).view(np.float32)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    return stored
