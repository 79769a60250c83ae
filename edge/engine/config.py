"""Model hyper-parameters of a Llama GGUF, read from its metadata."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    n_rot: int = 0  # rotary dimensions per head; 0 means the whole head
    context_length: int = 2048
    arch: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Build from a dict, ignoring keys this dataclass does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
