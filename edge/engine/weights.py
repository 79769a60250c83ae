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


class WeightReader:
    """A Llama GGUF's tensors, each dequantized to float32 when asked for. The file is
    memory-mapped, so a layer nobody asks for costs no memory: a caller that needs the
    layers one at a time (bias.learn's passes) holds one instead of the whole model."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from gguf import GGUFReader

        self.info = info = inspect(path)  # a corrupt file is explained here, before GGUFReader trusts it
        if info.arch != "llama":
            raise InvalidModelFileError(
                f"{path} is a '{info.arch}' model; the native engine runs Llama-architecture GGUFs only"
            )
        self.path = path
        self.reader = GGUFReader(info.path)
        self.args, self.rope_freq_scale = read_args(self.reader, info)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise InvalidModelFileError(f"{self.path} has no tensor '{name}'; is it a complete Llama GGUF?")
        a = dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a.reshape([int(d) for d in reversed(t.shape)]), dtype=np.float32)

    @property
    def output_name(self) -> str:
        """The head's tensor in the file (token_embd.weight when the embedding is tied)."""
        from gguf import MODEL_TENSOR, TENSOR_NAMES

        out = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
        return out if out in self.tensors else TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"

    def rope_freqs(self) -> np.ndarray | None:
        from gguf import MODEL_TENSOR, TENSOR_NAMES

        name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return self.get(name) if name in self.tensors else None

    def layer(self, il: int) -> LayerWeights:
        keys = _tensor_keys()

        def g(k: str) -> np.ndarray:
            return self.get(keys[k].format(bid=il) + ".weight")

        return LayerWeights(attn_norm=g("attn_norm"), ffn_norm=g("ffn_norm"),
                            wt={m: np.ascontiguousarray(g(m).T) for m in LINEAR_NAMES})

    def layer_elements(self, il: int) -> int:
        """How many float32 values layer il dequantizes to."""
        return sum(int(t.n_elements) for name, t in self.tensors.items() if name.startswith(f"blk.{il}."))

    def weights(self, layers: bool = True) -> Weights:
        """Every tensor dequantized; with layers False, all but the layers' (read them with
        `layer`)."""
        from gguf import MODEL_TENSOR, TENSOR_NAMES

        tok_embd = self.get(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
        tied = self.output_name == TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        return Weights(args=self.args, info=self.info, tok_embd=tok_embd,
                       output=tok_embd if tied else self.get(self.output_name),
                       output_norm=self.get(TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight"),
                       layers=[self.layer(il) for il in range(self.args.n_layers)] if layers else [],
                       rope_freqs=self.rope_freqs(), rope_freq_scale=self.rope_freq_scale,
                       output_name=self.output_name)


def rope_inv_freq(args: ModelArgs, rope_freqs: np.ndarray | None, scale: float) -> np.ndarray:
    """The rope's inverse frequencies (float64), rope_freqs and the linear scale applied."""
    n_rot = args.n_rot or args.head_dim
    inv = args.rope_theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if rope_freqs is not None:
        inv = inv / rope_freqs.astype(np.float64)[: n_rot // 2]
    return inv * scale


def load_weights(path: str | os.PathLike[str]) -> Weights:
    """Validate with inspect(), then dequantize every tensor to float32."""
    return WeightReader(path).weights()
