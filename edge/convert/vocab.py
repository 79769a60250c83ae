"""Tokenizer files of a Hugging Face checkpoint → GGUF tokenizer.ggml.* metadata.

Two families: SentencePiece `tokenizer.model` (Llama-2, Mistral: BPE with byte fallback,
scores, token types) read through gguf.vocab.SentencePieceVocab, and byte-level BPE
`tokenizer.json` (Llama-3, SmolLM) read as plain JSON. Special tokens, add_bos/add_eos and
the chat template come from gguf.vocab.SpecialVocab (tokenizer_config.json, config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edge.errors import ConversionError

# Pre-tokenizer regexes of tokenizer.json → the name llama.cpp knows them by.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE = {
    "byte-level": "gpt-2",                 # GPT-2 style: ByteLevel with its built-in regex
    "digits+byte-level": "smollm",         # SmolLM: each digit split, then GPT-2 regex
    "llama3+byte-level": "llama-bpe",      # Llama-3 regex, ByteLevel without regex
}


@dataclass
class Vocab:
    model: str                  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (BPE)
    pre: str                    # tokenizer.ggml.pre
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    source: str = ""

    def pad_to(self, n_vocab: int) -> None:
        """Embedding tables are often padded past the tokenizer; name the extra rows."""
        if len(self.tokens) > n_vocab:
            raise ConversionError(
                f"the tokenizer ({self.source}) has {len(self.tokens)} tokens but the model's "
                f"embedding table only {n_vocab} rows; the tokenizer does not belong to these weights"
            )
        for i in range(len(self.tokens), n_vocab):
            self.tokens.append(f"[PAD{i}]".encode())
            self.scores.append(-1000.0)
            self.types.append(gguf.TokenType.UNUSED)


def load_vocab(hf_dir: Path) -> Vocab:
    if (hf_dir / "tokenizer.model").is_file():
        return _sentencepiece(hf_dir)
    tj = hf_dir / "tokenizer.json"
    if tj.is_file():
        return _bpe(tj)
    raise ConversionError(
        f"{hf_dir} has no tokenizer (tokenizer.model or tokenizer.json); copy the model's "
        "tokenizer files into the folder"
    )


def add_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab: Vocab) -> gguf.SpecialVocab:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(hf_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if vocab.model == "llama":
        _sentencepiece_defaults(hf_dir, special)
    special.add_to_gguf(writer, quiet=True)
    return special


def _sentencepiece(hf_dir: Path) -> Vocab:
    try:
        sp = gguf.vocab.SentencePieceVocab(hf_dir)
    except RuntimeError:
        raise ConversionError(
            "reading tokenizer.model needs the sentencepiece package: pip install sentencepiece"
        ) from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{hf_dir / 'tokenizer.model'} could not be read ({e})") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in sp.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    _mark_added_special(hf_dir, tokens, types)
    return Vocab("llama", "default", tokens, scores, types, source="tokenizer.model")


def _mark_added_special(hf_dir: Path, tokens: list[bytes], types: list[int]) -> None:
    """tokenizer_config.json's added_tokens_decoder says which pieces are control tokens."""
    path = hf_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    for sid, tok in decoder.items():
        i = int(sid)
        if i < len(tokens) and tok.get("content", "").encode() == tokens[i]:
            types[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED


def _sentencepiece_defaults(hf_dir: Path, special: gguf.SpecialVocab) -> None:
    """Without tokenizer_config.json, take ids and add_bos from the SentencePiece model."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    for typ, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id())):
        if tid >= 0:
            special._set_special_token(typ, tid)
    special.add_special_token.setdefault("bos", True)
    special.add_special_token.setdefault("eos", False)


def _bpe(path: Path) -> Vocab:
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
        vocab: dict[str, int] = model["vocab"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not a valid tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConversionError(
            f"{path.name} is a {model.get('type')} tokenizer"
            f"{' with byte fallback' if model.get('byte_fallback') else ''}; edge convert reads "
            "byte-level BPE tokenizer.json or a SentencePiece tokenizer.model (add it to the folder)"
        )
    added = {t["id"]: t for t in tj.get("added_tokens") or []}
    n = max([*vocab.values(), *added.keys()], default=-1) + 1
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"].encode("utf-8"))
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i].encode("utf-8"))
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
    return Vocab("gpt2", _pre_name(tj.get("pre_tokenizer"), path), tokens, [0.0] * n, types,
                 source="tokenizer.json")


def _pre_name(pre: dict[str, Any] | None, path: Path) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    sig = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            sig.append("byte-level" if s.get("use_regex", True) else "byte-level-noregex")
        elif kind == "Digits" and s.get("individual_digits"):
            sig.append("digits")
        elif kind == "Split" and s.get("pattern", {}).get("Regex") == LLAMA3_REGEX:
            sig.append("llama3")
        else:
            sig.append(str(kind))
    key = "+".join(sig).replace("llama3+byte-level-noregex", "llama3+byte-level")
    if key not in KNOWN_PRE:
        raise ConversionError(
            f"{path.name}: pre-tokenizer {key or 'none'} is not one edge convert recognises "
            f"(known: GPT-2 byte-level, SmolLM digits+byte-level, Llama-3 regex)"
        )
    return KNOWN_PRE[key]
