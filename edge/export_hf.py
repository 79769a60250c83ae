"""A Llama GGUF → a Hugging Face checkpoint (dequantized weights, config, tokenizer.json).

The inverse of edge convert, for byte-level BPE vocabularies (Llama-3, SmolLM): it lets
the bundled real model make the round trip GGUF → HF → GGUF, where every tensor must come
back bit for bit (the q/k permutation and its inverse cancel).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge.convert.core import unpermute_qk
from edge.convert.hparams import hf_name
from edge.convert.vocab import LLAMA3_REGEX
from edge.errors import ConversionError, OutputExistsError
from edge.gguf_file import inspect
from edge.paths import atomic_write

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}


@dataclass
class ExportResult:
    out_dir: str
    n_tensors: int
    n_params: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field(r: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = r.fields.get(key)
    return default if f is None else f.contents()


def export_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
              dtype: str = "f32", force: bool = False) -> ExportResult:
    """Write `gguf_path` as a transformers LlamaForCausalLM folder in `out_dir`."""
    from safetensors.numpy import save_file

    info = inspect(gguf_path)
    out = Path(out_dir)
    if (out / "model.safetensors").exists() and not force:
        raise OutputExistsError(f"{out} already holds a model; pass force=True or choose another folder")
    if info.arch != "llama":
        raise ConversionError(f"{gguf_path} is a {info.arch} model; export handles llama only")
    r = gguf.GGUFReader(info.path)
    if _field(r, "tokenizer.ggml.model") != "gpt2":
        raise ConversionError("export writes byte-level BPE (gpt2) vocabularies only")
    arch = "llama"
    n_head = int(_field(r, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(r, f"{arch}.attention.head_count_kv", n_head))
    weights: dict[str, np.ndarray] = {}
    for t in r.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ConversionError(f"tensor {t.name} has no Llama counterpart in transformers")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_head_kv)
        weights[name] = w.astype(np.float16) if dtype == "f16" else np.ascontiguousarray(w)
    out.mkdir(parents=True, exist_ok=True)
    tokens = _field(r, "tokenizer.ggml.tokens")
    cfg = _config(r, arch, n_head, n_head_kv, len(tokens), tied="lm_head.weight" not in weights, dtype=dtype)
    _write_tokenizer(r, out, tokens)
    with atomic_write(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    # safetensors writes by name; write beside and rename so a crash leaves no half file.
    tmp = out / ".model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    return ExportResult(str(out), len(weights), sum(int(w.size) for w in weights.values()), dtype)


def _config(r: gguf.GGUFReader, arch: str, n_head: int, n_head_kv: int, n_vocab: int, *,
            tied: bool, dtype: str) -> dict[str, Any]:
    n_embd = int(_field(r, f"{arch}.embedding_length"))
    head_dim = int(_field(r, f"{arch}.attention.key_length", n_embd // n_head))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "_name_or_path": _field(r, "general.name") or "exported",
        "hidden_size": n_embd, "intermediate_size": int(_field(r, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(r, f"{arch}.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_head_kv, "head_dim": head_dim,
        "vocab_size": n_vocab, "max_position_embeddings": int(_field(r, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied, "hidden_act": "silu",
        "torch_dtype": "float16" if dtype == "f16" else "float32",
    }
    if _field(r, f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": float(_field(r, f"{arch}.rope.scaling.factor"))}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        v = _field(r, f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[f"{typ}_token_id"] = int(v)
    return cfg


def _write_tokenizer(r: gguf.GGUFReader, out: Path, tokens: list[str]) -> None:
    types = _field(r, "tokenizer.ggml.token_type")
    pre = _field(r, "tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"pre-tokenizer {pre!r} cannot be exported (known: {', '.join(PRE_TOKENIZERS)})")
    special = {gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED}
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == gguf.TokenType.CONTROL}
             for i, tok in enumerate(tokens) if types[i] in special]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(_field(r, "tokenizer.ggml.merges", []))},
    }
    with atomic_write(out / "tokenizer.json", "w") as f:
        json.dump(tj, f, ensure_ascii=False)
    tc: dict[str, Any] = {"add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
                          "add_eos_token": bool(_field(r, "tokenizer.ggml.add_eos_token", False))}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        v = _field(r, f"tokenizer.ggml.{key}")
        if v is not None:
            tc[f"{typ}_token"] = tokens[int(v)]
    if (tmpl := _field(r, "tokenizer.chat_template")) is not None:
        tc["chat_template"] = tmpl
    with atomic_write(out / "tokenizer_config.json", "w") as f:
        json.dump(tc, f, ensure_ascii=False, indent=2)
