"""edge quantize: a GGUF → a smaller GGUF through llama.cpp's own llama_model_quantize."""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edge.errors import BadOptionError, EdgeError, OutputExistsError
from edge.gguf_file import inspect
from edge.llamacpp import log_lines
from edge.paths import atomic_path


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: str            # llama_cpp.LLAMA_FTYPE_* attribute
    base: str             # ggml type most tensors get (mixes keep some tensors wider)
    note: str             # llama.cpp's own size / quality note
    needs_imatrix: bool = False

    @property
    def bpw(self) -> float | None:
        """Bits per weight of the base type; a whole file lands a little above it."""
        t = getattr(gguf.GGMLQuantizationType, self.base, None)
        if t is None or t not in gguf.GGML_QUANT_SIZES:
            return {"Q2_0": 2.25}.get(self.base)
        block, size = gguf.GGML_QUANT_SIZES[t]
        return size * 8 / block


# llama-quantize's table (tools/quantize/quantize.cpp), in its order, notes as it prints them.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in [
    QuantType("Q1_0", "LLAMA_FTYPE_MOSTLY_Q1_0", "Q1_0", "1.125 bpw quantization"),
    QuantType("Q2_0", "LLAMA_FTYPE_MOSTLY_Q2_0", "Q2_0", "2.25 bpw quantization (group 64)"),
    QuantType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", "4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("MXFP4_MOE", "LLAMA_FTYPE_MOSTLY_MXFP4_MOE", "MXFP4", "MXFP4 for MoE experts"),
    QuantType("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B"),
    QuantType("Q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B"),
    QuantType("IQ2_XXS", "LLAMA_FTYPE_MOSTLY_IQ2_XXS", "IQ2_XXS", "2.06 bpw quantization", True),
    QuantType("IQ2_XS", "LLAMA_FTYPE_MOSTLY_IQ2_XS", "IQ2_XS", "2.31 bpw quantization", True),
    QuantType("IQ2_S", "LLAMA_FTYPE_MOSTLY_IQ2_S", "IQ2_XS", "2.5 bpw quantization", True),
    QuantType("IQ2_M", "LLAMA_FTYPE_MOSTLY_IQ2_M", "IQ2_S", "2.7 bpw quantization", True),
    QuantType("IQ1_S", "LLAMA_FTYPE_MOSTLY_IQ1_S", "IQ1_S", "1.56 bpw quantization", True),
    QuantType("IQ1_M", "LLAMA_FTYPE_MOSTLY_IQ1_M", "IQ1_M", "1.75 bpw quantization", True),
    QuantType("TQ1_0", "LLAMA_FTYPE_MOSTLY_TQ1_0", "TQ1_0", "1.69 bpw ternarization"),
    QuantType("TQ2_0", "LLAMA_FTYPE_MOSTLY_TQ2_0", "TQ2_0", "2.06 bpw ternarization"),
    QuantType("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B"),
    QuantType("Q2_K_S", "LLAMA_FTYPE_MOSTLY_Q2_K_S", "Q2_K", "2.96G, +3.1836 ppl @ Llama-3-8B", True),
    QuantType("IQ3_XXS", "LLAMA_FTYPE_MOSTLY_IQ3_XXS", "IQ3_XXS", "3.06 bpw quantization"),
    QuantType("IQ3_S", "LLAMA_FTYPE_MOSTLY_IQ3_S", "IQ3_S", "3.44 bpw quantization"),
    QuantType("IQ3_M", "LLAMA_FTYPE_MOSTLY_IQ3_M", "IQ3_S", "3.66 bpw quantization mix"),
    QuantType("Q3_K", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", "alias for Q3_K_M"),
    QuantType("IQ3_XS", "LLAMA_FTYPE_MOSTLY_IQ3_XS", "IQ3_S", "3.3 bpw quantization"),
    QuantType("Q3_K_S", "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K", "3.41G, +1.6321 ppl @ Llama-3-8B"),
    QuantType("Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", "3.74G, +0.6569 ppl @ Llama-3-8B"),
    QuantType("Q3_K_L", "LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K", "4.03G, +0.5562 ppl @ Llama-3-8B"),
    QuantType("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL", "4.50 bpw non-linear quantization"),
    QuantType("IQ4_XS", "LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS", "4.25 bpw non-linear quantization"),
    QuantType("Q4_K", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", "alias for Q4_K_M"),
    QuantType("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K", "4.37G, +0.2689 ppl @ Llama-3-8B"),
    QuantType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", "4.58G, +0.1754 ppl @ Llama-3-8B"),
    QuantType("Q5_K", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", "alias for Q5_K_M"),
    QuantType("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    QuantType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", "5.33G, +0.0569 ppl @ Llama-3-8B"),
    QuantType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    QuantType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B"),
    QuantType("F16", "LLAMA_FTYPE_MOSTLY_F16", "F16", "14.00G, +0.0020 ppl @ Mistral-7B"),
    QuantType("BF16", "LLAMA_FTYPE_MOSTLY_BF16", "BF16", "14.00G, -0.0050 ppl @ Mistral-7B"),
    QuantType("F32", "LLAMA_FTYPE_ALL_F32", "F32", "26.00G @ 7B"),
]}

# Per-tensor types for --output-type / --embedding-type: ggml's own type names.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


class QuantizeError(EdgeError):
    """llama.cpp refused or failed to quantize."""


@dataclass
class QuantizeResult:
    path: str
    type: str
    input_path: str
    input_size: int
    output_size: int
    n_params: int
    bpw: float
    seconds: float
    threads: int
    # tensors llama.cpp stored in another type than asked (rows not a multiple of the
    # type's block, e.g. 576 columns for the K-quants' 256): type → count
    fallback: dict[str, int] = field(default_factory=dict)
    imatrix: str | None = None  # the importance matrix the quantizer weighed rounding by
    imatrix_entries: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quant_type(name: str) -> QuantType:
    q = QUANT_TYPES.get(name.upper())
    if q is None:
        raise BadOptionError(
            f"unknown quant type {name!r}; run 'edge quantize --type list' to see them (e.g. Q4_K_M, Q8_0)"
        )
    return q


def _tensor_type(option: str, name: str | None) -> int:
    import llama_cpp

    if name is None:
        return int(llama_cpp.GGML_TYPE_COUNT)  # llama.cpp's "not set"
    if name.upper() not in TENSOR_TYPES:
        raise BadOptionError(f"{option} {name!r} is not one of {', '.join(TENSOR_TYPES)}")
    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


def quantize(inp: str | os.PathLike[str], out: str | os.PathLike[str], *, qtype: str,
             leave_output_tensor: bool = False, pure: bool = False, output_type: str | None = None,
             embedding_type: str | None = None, threads: int | None = None,
             imatrix: str | os.PathLike[str] | None = None,
             force: bool = False, verbose: bool = False) -> QuantizeResult:
    """Quantize `inp` into `out` (written beside it under a temp name, renamed on success).
    `imatrix`: an importance matrix (`edge imatrix`, or llama-imatrix's GGUF or .dat)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    from edge.imatrix.files import QuantizeImatrix, read_imatrix
    from edge.system import default_threads

    q = quant_type(qtype)
    if q.needs_imatrix and imatrix is None:
        raise BadOptionError(
            f"{q.name} needs an importance matrix: make one with `edge imatrix IN.gguf -f TEXT -o imatrix.gguf` "
            "and pass --imatrix imatrix.gguf (or use Q2_K, IQ3_XXS or a 4-bit type)"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.output_tensor_type = _tensor_type("--output-type", output_type)
    params.token_embedding_type = _tensor_type("--embedding-type", embedding_type)
    info = inspect(inp)  # a bad input fails here, with the pre-flight's message
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it or choose another -o")
    if out.resolve() == Path(info.path).resolve():
        raise BadOptionError("-o must differ from the input file")
    imx = None
    if imatrix is not None:
        imx = QuantizeImatrix(read_imatrix(imatrix), file=Path(imatrix).name)
        imx.check({t.name: t.shape[0] for t in info.tensors if len(t.shape) >= 2})
        params.imatrix = imx.array  # imx keeps the buffers alive until quantizing is done
        params.kv_overrides = imx.metadata
    params.ftype = int(getattr(llama_cpp, q.ftype))
    params.nthread = threads or default_threads()
    params.quantize_output_tensor = not leave_output_tensor
    params.pure = pure
    params.allow_requantize = True  # quantized inputs are accepted, as llama-quantize --allow-requantize
    set_verbose(verbose)  # llama.cpp logs every tensor; only errors unless asked
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, log_lines(echo=verbose) as log:
        rc = llama_cpp.llama_model_quantize(str(info.path).encode(), str(tmp).encode(), params)
        if rc != 0:
            last = next((ln for ln in reversed(log) if ln.strip()), "")
            raise QuantizeError(
                f"llama.cpp could not quantize {info.path} to {q.name} (code {rc}: {last.strip()[:200]}); "
                "e.g. tensor rows not a multiple of the block size: try Q8_0 or Q4_0")
    size = out.stat().st_size
    return QuantizeResult(
        path=str(out), type=q.name, input_path=str(info.path), input_size=info.file_size,
        output_size=size, n_params=info.params or 0,
        bpw=size * 8 / info.params if info.params else 0.0,
        seconds=time.perf_counter() - t0, threads=params.nthread, fallback=_fallbacks(log),
        imatrix=str(imatrix) if imatrix is not None else None, imatrix_entries=imx.entries if imx else 0,
    )


def _fallbacks(log: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in re.finditer(r"falling back to\s+(\w+)", "".join(log)):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def list_types() -> list[dict[str, Any]]:
    return [{"type": q.name, "bpw": q.bpw, "base": q.base, "needs_imatrix": q.needs_imatrix,
             "note": q.note} for q in QUANT_TYPES.values()]
