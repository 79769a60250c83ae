"""config.json of a Hugging Face Llama checkpoint → the hyper-parameters GGUF needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConversionError

# Same tensor layout and forward pass as Llama; llama.cpp loads both as arch "llama".
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass
class HParams:
    architecture: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    context_length: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rope_scaling_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        kind = self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")
        return None if kind in (None, "default") else str(kind).lower()

    @classmethod
    def from_dir(cls, hf_dir: Path) -> HParams:
        path = hf_dir / "config.json"
        if not path.is_file():
            raise ConversionError(
                f"{hf_dir} has no config.json; point edge convert at a Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files)"
            )
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path} is not valid JSON ({e}); re-download it") from None
        return cls.from_dict(cfg, path)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: Path | str = "config.json") -> HParams:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            got = ", ".join(archs) if archs else "none listed"
            raise ConversionError(
                f"unsupported architecture ({got}) in {where}; edge convert supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            n_embd = int(cfg["hidden_size"])
            n_head = int(cfg["num_attention_heads"])
            hp = cls(
                architecture=arch,
                n_layers=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                n_vocab=int(cfg["vocab_size"]),
                context_length=int(cfg.get("max_position_embeddings") or 2048),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                name_or_path=cfg.get("_name_or_path"),
                raw=cfg,
            )
        except KeyError as e:
            raise ConversionError(f"{where} lacks {e.args[0]!r}; is it a complete Llama config?") from None
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{where} has a malformed value ({e})") from None
        # transformers ≥ 4.56 moved rope settings into rope_parameters.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        hp.rope_theta = float((rope or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        hp.rope_scaling = dict(rope) if rope else None
        hp.validate(where)
        return hp

    def validate(self, where: Path | str) -> None:
        if min(self.n_layers, self.n_embd, self.n_ff, self.n_head, self.n_vocab) <= 0:
            raise ConversionError(f"{where}: sizes must be positive")
        if self.n_head % self.n_head_kv:
            raise ConversionError(
                f"{where}: num_attention_heads {self.n_head} is not a multiple of "
                f"num_key_value_heads {self.n_head_kv}"
            )
        if self.head_dim % 2:
            raise ConversionError(f"{where}: head_dim {self.head_dim} must be even for RoPE")
        kind = self.rope_scaling_type
        if kind is not None and kind not in ROPE_SCALING_TYPES:
            raise ConversionError(
                f"{where}: rope_scaling type {kind!r} is not supported; edge convert handles "
                f"{', '.join(ROPE_SCALING_TYPES)}"
            )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name → Hugging Face (row-major, [out, in]) shape."""
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.n_vocab, self.n_embd),
            "output_norm.weight": (self.n_embd,),
            "output.weight": (self.n_vocab, self.n_embd),
        }
        for i in range(self.n_layers):
            b = f"blk.{i}."
            shapes.update({
                b + "attn_norm.weight": (self.n_embd,),
                b + "attn_q.weight": (q, self.n_embd),
                b + "attn_k.weight": (kv, self.n_embd),
                b + "attn_v.weight": (kv, self.n_embd),
                b + "attn_output.weight": (self.n_embd, q),
                b + "ffn_norm.weight": (self.n_embd,),
                b + "ffn_gate.weight": (self.n_ff, self.n_embd),
                b + "ffn_up.weight": (self.n_ff, self.n_embd),
                b + "ffn_down.weight": (self.n_embd, self.n_ff),
            })
        return shapes

    def llama3_rope_factors(self) -> Any:
        """Per-frequency divisors of Llama-3.1's rope scaling (llama.cpp's rope_freqs tensor)."""
        import math

        import numpy as np

        s = self.rope_scaling or {}
        factor = float(s.get("factor", 8.0))
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim))
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                out.append(1.0)
            elif wavelen > old_ctx / low:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return np.asarray(out, dtype=np.float32)


# GGUF tensor name → the Llama name transformers uses ({i}: layer), for messages and export.
_HF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "model.layers.{i}.input_layernorm", "ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "attn_q": "model.layers.{i}.self_attn.q_proj", "attn_k": "model.layers.{i}.self_attn.k_proj",
    "attn_v": "model.layers.{i}.self_attn.v_proj", "attn_output": "model.layers.{i}.self_attn.o_proj",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj", "ffn_up": "model.layers.{i}.mlp.up_proj",
    "ffn_down": "model.layers.{i}.mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' → 'model.layers.3.self_attn.q_proj.weight' (None if not Llama's)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        t = _HF_NAMES.get(parts[2])
        return t.format(i=parts[1]) + "." + parts[3] if t else None
    t = _HF_NAMES.get(parts[0])
    return t + "." + parts[-1] if t and len(parts) == 2 and "{i}" not in t else None
