"""Native numpy engine for Llama GGUFs: logits and per-layer hidden states, KV cache.

Verified against llama.cpp (edge.engine.verify); R-Sparse backends live in edge.sparse.
"""

from __future__ import annotations

from edge.engine.config import ModelArgs
from edge.engine.model import Backend, DenseBackend, Engine, ForwardResult, KVCache
from edge.engine.weights import LINEAR_NAMES

__all__ = ["LINEAR_NAMES", "Backend", "DenseBackend", "Engine", "ForwardResult", "KVCache", "ModelArgs"]
