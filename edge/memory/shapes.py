"""A ModelInfo for a model not downloaded yet: its tensors from a catalog `shape` and quant.

The per-tensor types follow llama.cpp's quantizer (src/llama-quant.cpp,
`llama_tensor_get_type_impl` and `tensor_type_fallback`) for the Llama architecture and
the file types the catalog uses, so the repacked share and the file size come out as a
real file would have them (tests compare against files `edge quantize` wrote).
"""

from __future__ import annotations

from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edge.errors import CatalogError
from edge.gguf_file import ModelInfo, TensorInfo
from edge.quantize import QUANT_TYPES

SHAPE_KEYS = ("n_layers", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "context_length")
OPTIONAL_KEYS = ("tied", "n_merges")
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL"}


def _block(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def _nbytes(t: str, n: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    return n // block * size


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(role: str, layer: int, n_layers: int, ftype: str, ncols: int, gqa: int) -> str:
    """The type llama.cpp's quantizer gives one Llama weight (`role` as in its GGUF name)."""
    base = QUANT_TYPES[ftype].base
    if base in ("F32", "F16", "BF16"):
        return base
    t = base
    if role == "output":  # also the token embeddings when they are tied to it
        t = "Q8_0" if ncols % _block(base) else base if base == "Q8_0" else "Q6_K"
    elif role == "attn_v":
        if ftype in ("Q4_K_M", "Q5_K_M", "Q4_K", "Q5_K") and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and layer < 4:
            t = "Q5_K"
        elif ftype in ("Q3_K_M", "Q3_K"):
            t = "Q5_K" if layer < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype == "Q2_K":
            t = "Q4_K" if gqa >= 4 else "Q3_K"
    elif role == "ffn_down":
        if ftype in ("Q4_K_M", "Q5_K_M", "Q4_K", "Q5_K") and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and layer < n_layers // 8:
            t = "Q5_K"
        elif ftype in ("Q3_K_M", "Q3_K"):
            t = "Q5_K" if layer < n_layers // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype == "Q2_K":
            t = "Q3_K"
    elif role == "attn_output":
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, t)
    if ncols % _block(t):  # rows that do not split into whole blocks
        t = _FALLBACK.get(t, t)
        if ncols % _block(t):
            t = "F16"
    return t


def check_shape(shape: dict[str, Any], where: str) -> None:
    missing = [k for k in SHAPE_KEYS if not isinstance(shape.get(k), int) or shape[k] <= 0]
    unknown = set(shape) - set(SHAPE_KEYS) - set(OPTIONAL_KEYS)
    if missing or unknown:
        raise CatalogError(f"{where}: shape needs positive integers {', '.join(SHAPE_KEYS)}"
                           + (f"; unknown keys {sorted(unknown)}" if unknown else ""))


def synthesize(shape: dict[str, Any], quant: str, *, name: str = "") -> ModelInfo:
    """The ModelInfo a Llama GGUF of this shape and file type would have (no file read)."""
    check_shape(shape, name or "shape")
    if quant.upper() not in QUANT_TYPES:
        raise CatalogError(f"{name}: quant {quant!r} is not a llama.cpp file type (e.g. Q4_K_M, Q8_0)")
    q = quant.upper()
    n_layers, n_embd, n_ff, n_vocab = shape["n_layers"], shape["n_embd"], shape["n_ff"], shape["n_vocab"]
    n_embd_kv = n_embd // shape["n_head"] * shape["n_head_kv"]
    gqa = shape["n_head"] // shape["n_head_kv"]
    tied = bool(shape.get("tied", False))

    tensors: list[TensorInfo] = []

    def add(tname: str, dims: tuple[int, ...], ttype: str) -> None:
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(tname, ttype, dims, n, _nbytes(ttype, n)))

    embd_role = "output" if tied else "token_embd"
    add("token_embd.weight", (n_embd, n_vocab), tensor_type(embd_role, 0, n_layers, q, n_embd, gqa))
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (n_embd,), "F32")
        for role, dims in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_embd_kv)),
                           ("attn_v", (n_embd, n_embd_kv)), ("attn_output", (n_embd, n_embd))):
            add(p + role + ".weight", dims, tensor_type(role, i, n_layers, q, dims[0], gqa))
        add(p + "ffn_norm.weight", (n_embd,), "F32")
        for role, dims in (("ffn_gate", (n_embd, n_ff)), ("ffn_down", (n_ff, n_embd)), ("ffn_up", (n_embd, n_ff))):
            add(p + role + ".weight", dims, tensor_type(role, i, n_layers, q, dims[0], gqa))
    add("output_norm.weight", (n_embd,), "F32")
    if not tied:
        add("output.weight", (n_embd, n_vocab), tensor_type("output", 0, n_layers, q, n_embd, gqa))
    n_merges = shape.get("n_merges")
    # header: fixed keys plus the vocabulary (text ~8 B, length 8 B, score 4 B, type 4 B per token)
    header = 64 * 1024 + 24 * n_vocab + 20 * (n_merges or 0)
    data = sum(-(-t.n_bytes // 32) * 32 for t in tensors)
    return ModelInfo(
        path=f"<catalog:{name}>", file_size=header + data, arch="llama", name=name or None,
        params=sum(t.n_elements for t in tensors), quant=q, context_length=shape["context_length"],
        n_layers=n_layers, n_embd=n_embd, n_head=shape["n_head"], n_head_kv=shape["n_head_kv"],
        n_ff=n_ff, n_vocab=n_vocab, chat_template=None, fingerprint="", tensors=tuple(tensors),
        n_merges=n_merges,
    )
