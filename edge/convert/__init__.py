"""Hugging Face Llama checkpoint → GGUF (tensor map, RoPE q/k permutation, vocabulary)."""

from __future__ import annotations

from edge.convert.core import OUTTYPES, ConvertResult, convert, permute_qk, unpermute_qk
from edge.convert.hparams import SUPPORTED_ARCHITECTURES, HParams

__all__ = ["OUTTYPES", "SUPPORTED_ARCHITECTURES", "ConvertResult", "HParams", "convert",
           "permute_qk", "unpermute_qk"]
