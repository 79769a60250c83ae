"""Read a Llama GGUF into float32 numpy arrays (dequantized with gguf.quants).

Linear weights are kept transposed, (in, out), one row per input channel: `x @ wt` is a
plain BLAS product, and the sparse kernel can read only the rows of active channels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.engine.config import ModelArgs
from edge.errors import InvalidModelFileError
from edge.gguf_file import ModelInfo, inspect

# edge's short module names -> gguf's tensor-name constants.
LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def _tensor_keys() -> dict[str, str]:
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    t = MODEL_TENSOR
    return {
        "q": TENSOR_NAMES[t.ATTN_Q], "k": TENSOR_NAMES[t.ATTN_K], "v": TENSOR_NAMES[t.ATTN_V],
        "o": TENSOR_NAMES[t.ATTN_OUT], "gate": TENSOR_NAMES[t.FFN_GATE],
        "up": TENSOR_NAMES[t.FFN_UP], "down": TENSOR_NAMES[t.FFN_DOWN],
        "attn_norm": TENSOR_NAMES[t.ATTN_NORM], "ffn_norm": TENSOR_NAMES[t.FFN_NORM],
    }


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    wt: dict[str, np.ndarray]  # module name -> (in, out) float32, C-contiguous


@dataclass
class Weights:
    args: ModelArgs
    info: ModelInfo
    tok_embd: np.ndarray  # (n_vocab, n_embd)
    output_norm: np.ndarray
    output: np.ndarray  # (n_vocab, n_embd); the embedding matrix itself when tied
    layers: list[LayerWeights] = field(default_factory=list)
    rope_freqs: np.ndarray | None = None  # per-pair frequency divisors (Llama 3)
    rope_freq_scale: float = 1.0
    output_name: str = "output.weight"  # the head's tensor in the file (token_embd.weight when tied)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_args(reader: Any, info: ModelInfo) -> tuple[ModelArgs, float]:
    """Hyper-parameters and the linear rope scale from a GGUFReader's metadata (no tensor
    data is read, so a quantized engine can use it without dequantizing anything)."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES, Keys

    arch, path = info.arch, info.path

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, key.format(arch=arch), default)

    n_head = int(meta(Keys.Attention.HEAD_COUNT))
    n_embd = int(meta(Keys.LLM.EMBEDDING_LENGTH))
    embd = next(t for t in reader.tensors if t.name == TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
    args = ModelArgs(
        n_layers=int(meta(Keys.LLM.BLOCK_COUNT)), n_embd=n_embd, n_head=n_head,
        n_head_kv=int(meta(Keys.Attention.HEAD_COUNT_KV, n_head)),
        n_ff=int(meta(Keys.LLM.FEED_FORWARD_LENGTH)), n_vocab=int(embd.shape[-1]),
        rope_theta=float(meta(Keys.Rope.FREQ_BASE, 10000.0)),
        rms_eps=float(meta(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        n_rot=int(meta(Keys.Rope.DIMENSION_COUNT, n_embd // n_head)),
        context_length=int(meta(Keys.LLM.CONTEXT_LENGTH, 2048)), arch=arch,
    )
    scaling = meta(Keys.Rope.SCALING_TYPE, "none")
    scale = 1.0
    if scaling == "linear":
        scale = 1.0 / float(meta(Keys.Rope.SCALING_FACTOR, 1.0))
    elif scaling not in ("none", None):
        raise InvalidModelFileError(
            f"{path} uses rope scaling '{scaling}', which the native engine does not implement; "
            "use the llama.cpp runtime for this model"
        )
    return args, scale


def load_weights(path: str | os.PathLike[str]) -> Weights:
    """Validate with inspect(), then dequantize every tensor to float32."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFReader
    from gguf.quants import dequantize

    info = inspect(path)  # a corrupt file is explained here, before GGUFReader trusts it
    if info.arch != "llama":
        raise InvalidModelFileError(
            f"{path} is a '{info.arch}' model; the native engine runs Llama-architecture GGUFs only"
        )
    reader = GGUFReader(info.path)
    args, scale = read_args(reader, info)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise InvalidModelFileError(f"{path} has no tensor '{name}'; is it a complete Llama GGUF?")
        a = dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a.reshape([int(d) for d in reversed(t.shape)]), dtype=np.float32)

    tok_embd = get(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
    out_name = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
    output = get(out_name) if out_name in tensors else tok_embd
    keys = _tensor_keys()
    layers = []
    for il in range(args.n_layers):
        def g(k: str, il: int = il) -> np.ndarray:
            return get(keys[k].format(bid=il) + ".weight")

        wt = {m: np.ascontiguousarray(g(m).T) for m in LINEAR_NAMES}
        layers.append(LayerWeights(attn_norm=g("attn_norm"), ffn_norm=g("ffn_norm"), wt=wt))
    freqs_name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
    rope_freqs = get(freqs_name) if freqs_name in tensors else None
    return Weights(args=args, info=info, tok_embd=tok_embd, output=output,
                   output_norm=get(TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight"),
                   layers=layers, rope_freqs=rope_freqs, rope_freq_scale=scale,
                   output_name=out_name if out_name in tensors else TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
