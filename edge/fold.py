"""Fold a linear edit of the residual stream into the weights that write to it.

A Llama layer adds two things to the residual stream: the attention output projection
(`attn_output`) and the MLP down projection (`ffn_down`); the token embedding writes the
stream's start. An edit x ↦ x − U Vᵀ x + b applied to what one of these writes is a
rank-k change of that matrix, W' = W − U (Vᵀ W), plus an optional bias, so the edited model
is a plain GGUF that runs in any llama.cpp with no runtime flag and no extra cost. The
usual case is an orthogonal projection away from a few directions at strength λ
(U = λQ, V = Q; `ResidualEdit.projection`); an oblique (LEACE-style) eraser has U ≠ V.

The edit is bias-agnostic: the caller says which directions and where. Affected tensors
are dequantized, edited in float32 and re-quantized to their own type with ggml's own
kernel (`ggml_quantize_chunk`, as llama-quantize does), or written as F16/F32 on request;
every other tensor is copied byte for byte. A tied output head (no output.weight: the
logits read the embedding matrix) is untied first, so editing the embedding changes what
the stream starts with, not how logits are read. What re-quantization costs is reported
per tensor (largest error against the edited float32 weights, relative to the tensor's
range) and, with `requant_cost`, as KL against the unquantized edited model on text.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BadOptionError, EdgeError, InvalidModelFileError, OutputExistsError
from edge.paths import atomic_path

WEIGHT_TYPES = ("source", "F16", "F32", "F16-edited")


@dataclass(frozen=True)
class ResidualEdit:
    """x ↦ x − U (Vᵀ x) + bias on vectors of the residual stream (n_embd)."""

    u: np.ndarray  # (n_embd, k)
    v: np.ndarray  # (n_embd, k)
    bias: np.ndarray | None = None  # (n_embd,), added once per layer (ffn_down's bias)
    # token embedding / output head only: edit just these token rows (a word list's), so
    # the rest of the vocabulary, and with it the text that does not use those words, keeps
    # its logits
    rows: np.ndarray | None = None

    @classmethod
    def constant(cls, bias: np.ndarray) -> ResidualEdit:
        """Only a constant added to what the layer writes (a control vector's row)."""
        z = np.zeros((len(bias), 0), np.float32)
        return cls(z, z, np.asarray(bias, np.float32))

    @classmethod
    def projection(cls, directions: np.ndarray, strength: float = 1.0) -> ResidualEdit:
        """Remove `strength` of the component along the span of `directions` (k, n_embd):
        x − λ Q Qᵀ x with Q an orthonormal basis of the span (λ = 1: the component is gone)."""
        d = np.atleast_2d(np.asarray(directions, dtype=np.float64))
        q, r = np.linalg.qr(d.T)
        keep = np.abs(np.diag(r)) > 1e-8 * max(float(np.abs(r).max()), 1e-30)  # drop dependent rows
        q = q[:, keep]
        return cls(strength * q, q)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The edit on row vectors x (..., n_embd)."""
        y = x - (x @ self.v) @ self.u.T
        return y if self.bias is None else y + self.bias

    def scaled(self, strength: float) -> ResidualEdit:
        """The same edit with U scaled (strength of a projection; bias unchanged)."""
        return replace(self, u=self.u * strength)


@dataclass
class FoldPlan:
    """Which edit goes where. `layers[il]` applies to attn_output and ffn_down of layer il
    (so to everything layer il adds to the stream); `embedding` to the token embedding."""

    layers: dict[int, ResidualEdit] = field(default_factory=dict)
    embedding: ResidualEdit | None = None
    untie_output: bool = True  # keep the logits reading the unedited embedding
    # The output head's rows (one per token) get this edit: the logits read P·h, so two
    # tokens whose output rows differ only along the removed directions become equally
    # likely. A tied head whose edit is the embedding's stays tied (no new tensor); any
    # other edit of a tied head is written as its own output.weight.
    output: ResidualEdit | None = None

    def check(self, n_layers: int, n_embd: int) -> None:
        for il, e in self.layers.items():
            if not 0 <= il < n_layers:
                raise BadOptionError(f"fold plan names layer {il}; the model has layers 0..{n_layers - 1}")
            if e.u.shape[0] != n_embd or e.v.shape != e.u.shape:
                raise BadOptionError(f"fold plan layer {il}: vectors of {e.u.shape[0]} values, model n_embd {n_embd}")
            if e.rows is not None:
                raise BadOptionError(f"fold plan layer {il}: a row subset applies to the embedding or head only")
        for name, e in (("token embedding", self.embedding), ("output head", self.output)):
            if e is not None and e.bias is not None:
                raise BadOptionError(f"the {name} has no bias tensor; fold a constant at a layer instead")
            if e is not None and e.u.shape[0] != n_embd:
                raise BadOptionError(f"fold plan {name}: vectors of {e.u.shape[0]} values, model n_embd {n_embd}")

    @property
    def head_shares_embedding_edit(self) -> bool:
        return self.output is not None and self.output is self.embedding

    def bias_matrix(self, n_layers: int, n_embd: int) -> np.ndarray | None:
        """(n_layers, n_embd) of the per-layer constants: the numpy engine's `control`."""
        if not any(e.bias is not None for e in self.layers.values()):
            return None
        m = np.zeros((n_layers, n_embd), dtype=np.float32)
        for il, e in self.layers.items():
            if e.bias is not None:
                m[il] = e.bias
        return m


# ---- the edit on arrays --------------------------------------------------------------------
def edit_writer(w: np.ndarray, e: ResidualEdit) -> np.ndarray:
    """W (out = n_embd, in) as numpy reads a GGUF matrix: W' = W − U (Vᵀ W)."""
    w64 = np.asarray(w, dtype=np.float64)
    return (w64 - e.u @ (e.v.T @ w64)).astype(np.float32)


def edit_embedding(emb: np.ndarray, e: ResidualEdit) -> np.ndarray:
    """Token embedding (n_vocab, n_embd), one row per token: each row gets the edit.
    float32 (the matrix is large; rows are edited independently, so error stays ~1e-7)."""
    x = np.asarray(emb, dtype=np.float32)
    if e.rows is None:
        return x - (x @ e.v.astype(np.float32)) @ e.u.T.astype(np.float32)
    out, r = x.copy(), np.asarray(e.rows, dtype=np.int64)
    out[r] = x[r] - (x[r] @ e.v.astype(np.float32)) @ e.u.T.astype(np.float32)
    return out


def fold_weights(weights: Any, plan: FoldPlan) -> Any:
    """The numpy engine's Weights with the plan folded in (new arrays where edited; the
    rest shared). Per-layer constants are not weights there: pass
    `plan.bias_matrix(...)` as the engine's `control`."""
    a = weights.args
    plan.check(a.n_layers, a.n_embd)
    layers = list(weights.layers)
    for il, e in plan.layers.items():
        lw = layers[il]
        wt = dict(lw.wt)  # (in, out): the engine multiplies x @ wt
        wt["o"] = np.ascontiguousarray(edit_writer(wt["o"].T, e).T)
        wt["down"] = np.ascontiguousarray(edit_writer(wt["down"].T, e).T)
        layers[il] = replace(lw, wt=wt)
    tok = weights.tok_embd
    if plan.embedding is not None:
        tok = edit_embedding(tok, plan.embedding)
    tied = weights.output is weights.tok_embd
    if plan.output is not None:
        out = tok if tied and plan.head_shares_embedding_edit else edit_embedding(weights.output, plan.output)
    else:
        out = weights.output if (plan.untie_output or not tied) else tok
    return replace(weights, tok_embd=tok, output=out, layers=layers)


# ---- ggml's quantizer --------------------------------------------------------------------
def _ggml() -> ctypes.CDLL:
    from edge.llamacpp import ggml_base

    lib = ggml_base()
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def row_bytes(qtype: int, n_per_row: int) -> int:
    return int(_ggml().ggml_row_size(int(qtype), int(n_per_row)))


def quantize_rows(x: np.ndarray, qtype: int) -> np.ndarray:
    """(rows, n_per_row) float32 → (rows, row_bytes) uint8 in ggml type `qtype`, with ggml's
    own quantizer (the one llama_model_quantize calls; no importance matrix)."""
    lib = _ggml()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise BadOptionError(f"ggml type {qtype} needs an importance matrix to re-quantize; "
                             "write the edited model with weight type F16 instead")
    src = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = src.shape
    out = np.empty((rows, row_bytes(qtype, n)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != out.nbytes:
        raise EdgeError(f"ggml wrote {written} bytes for a {out.nbytes}-byte tensor of type {qtype}")
    return out


# ---- the GGUF --------------------------------------------------------------------------
@dataclass
class TensorCost:
    name: str
    type: str
    max_err: float  # largest |re-quantized − edited| / (max − min) of the edited tensor
    rms_err: float  # RMS of the same, relative to the tensor's RMS


@dataclass
class FoldResult:
    path: str
    source: str
    weight_type: str  # "source" (each edited tensor re-quantized to its own type), F16, F32, F16-edited
    edited: list[str]
    untied_output: bool
    tensors: list[TensorCost] = field(default_factory=list)
    seconds: float = 0.0
    size: int = 0
    requant_kl: dict[str, float] | None = None  # requant_cost(): KL vs the unquantized edit

    @property
    def worst(self) -> TensorCost | None:
        return max(self.tensors, key=lambda t: t.max_err, default=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        w = self.worst
        d["worst"] = None if w is None else asdict(w)
        return d


@lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int) -> Any:
    """A parsed GGUF, kept: parsing a 49k-token vocabulary's metadata takes seconds, and a
    search folds the same source many times."""
    import gguf

    return gguf.GGUFReader(path)


def _matrix(t: Any) -> np.ndarray:
    from gguf.quants import dequantize

    a = dequantize(np.asarray(t.data), t.tensor_type)
    return a.reshape([int(d) for d in reversed(t.shape)]).astype(np.float32)


def _encode(x: np.ndarray, qtype: Any) -> tuple[np.ndarray, TensorCost | None]:
    """x in ggml type qtype, as the bytes/array GGUFWriter takes, and its rounding cost."""
    import gguf
    from gguf.quants import dequantize

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return x.astype(np.float32), None
    data = quantize_rows(x.reshape(-1, x.shape[-1]), int(qtype))
    back = dequantize(data, qtype).reshape(x.shape)
    err = np.abs(back - x)
    rng = max(float(x.max() - x.min()), 1e-30)
    rms = max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-30)
    cost = TensorCost("", qtype.name, float(err.max()) / rng,
                      float(np.sqrt(np.mean(np.square(err, dtype=np.float64)))) / rms)
    if qtype == T.F16:
        return data.view(np.float16).reshape(x.shape), cost
    return data, cost


def _target_type(src_type: Any, weight_type: str, is_matrix: bool, edited: bool) -> Any:
    import gguf

    if weight_type == "source" or not is_matrix or (weight_type == "F16-edited" and not edited):
        return src_type
    return getattr(gguf.GGMLQuantizationType, weight_type.split("-")[0])


def _copy_metadata(reader: Any, writer: Any, weight_type: str, note: str) -> None:
    import gguf
    import llama_cpp

    skip = {gguf.Keys.General.ARCHITECTURE}
    for f in reader.fields.values():
        if f.name in skip or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = f.contents()
        if f.name == gguf.Keys.General.FILE_TYPE and weight_type in ("F16", "F32"):
            val = int(llama_cpp.LLAMA_FTYPE_MOSTLY_F16 if weight_type == "F16" else llama_cpp.LLAMA_FTYPE_ALL_F32)
        writer.add_key_value(f.name, val, vtype, sub_type=sub)
    writer.add_string("edge.fold.note", note)


def _names() -> tuple[str, str, str, str]:
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES as N

    return (N[T.TOKEN_EMBD] + ".weight", N[T.OUTPUT] + ".weight",
            N[T.ATTN_OUT] + ".weight", N[T.FFN_DOWN] + ".weight")


Job = tuple[str, Any, "ResidualEdit | None", Any]  # (name, source tensor or None for a bias, edit, type)


def _jobs(reader: Any, plan: FoldPlan, weight_type: str, src: object) -> tuple[list[Job], list[str], bool]:
    """What to write, in order: every source tensor (edited or not), the untied head after
    the embedding, and the per-layer biases; plus the edited names and whether it unties."""
    import gguf

    emb_name, out_name, attn_out, ffn_down = _names()
    # a rank-0 edit is a constant alone (a control vector folded in): the writers stay as they are
    edits = {attn_out.format(bid=il): e for il, e in plan.layers.items() if e.rank}
    edits |= {ffn_down.format(bid=il): e for il, e in plan.layers.items() if e.rank}
    tensors = {t.name: t for t in reader.tensors}
    if plan.embedding is not None:
        edits[emb_name] = plan.embedding
    tied = out_name not in tensors
    if plan.output is not None and not tied:
        edits[out_name] = plan.output
    missing = [n for n in edits if n not in tensors]
    if missing:
        raise InvalidModelFileError(f"{src} has no tensor {missing[0]!r}; is it a complete Llama GGUF?")
    if plan.output is not None:  # a tied head with the embedding's own edit stays tied
        untie = tied and not plan.head_shares_embedding_edit
    else:
        untie = tied and plan.embedding is not None and plan.untie_output
    jobs: list[Job] = []
    for t in reader.tensors:
        e = edits.get(t.name)
        jobs.append((t.name, t, e, _target_type(t.tensor_type, weight_type, len(t.shape) >= 2, e is not None)))
        if untie and t.name == emb_name:  # the head: the unedited embedding, or its own edit
            jobs.append((out_name, t, plan.output,
                         _target_type(t.tensor_type, weight_type, True, plan.output is not None)))
    for il, e in sorted(plan.layers.items()):
        if e.bias is not None:
            jobs.append((ffn_down.format(bid=il).replace(".weight", ".bias"), None, None,
                         gguf.GGMLQuantizationType.F32))
    head = [out_name] if untie and plan.output is not None else []
    return jobs, sorted(edits) + head, untie


def _add_info(w: Any, job: Job, n_embd: int) -> None:
    import gguf

    name, t, e, qt = job
    if t is None:
        w.add_tensor_info(name, (n_embd,), np.dtype(np.float32), 4 * n_embd, qt)
    elif e is None and qt == t.tensor_type:
        w.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    else:
        rows = int(np.prod([int(d) for d in t.shape[1:]]))
        nb = row_bytes(int(qt), int(t.shape[0])) * rows
        shape = [int(d) for d in reversed(t.shape)]
        if qt in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            dt = np.dtype(np.float16 if qt == gguf.GGMLQuantizationType.F16 else np.float32)
            w.add_tensor_info(name, shape, dt, nb, qt)
        else:  # GGUFWriter takes quantized tensors by their byte shape
            w.add_tensor_info(name, [*shape[:-1], nb // rows], np.dtype(np.uint8), nb, qt)


def _write(w: Any, job: Job, plan: FoldPlan, endianess: Any) -> TensorCost | None:
    name, t, e, qt = job
    if t is None:
        w.write_tensor_data(np.asarray(plan.layers[int(name.split(".")[1])].bias, dtype=np.float32))
        return None
    if e is None and qt == t.tensor_type:
        w.write_tensor_data(t.data, tensor_endianess=endianess)
        return None
    x = _matrix(t)
    if e is not None:
        x = edit_embedding(x, e) if name in _names()[:2] else edit_writer(x, e)
    data, cost = _encode(x, qt)
    w.write_tensor_data(data)
    return replace(cost, name=name) if cost is not None and e is not None else None


def fold_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], plan: FoldPlan, *,
              weight_type: str = "source", note: str = "", force: bool = False,
              on_tensor: Callable[[str], None] | None = None) -> FoldResult:
    """Write `src` with `plan` folded in to `dst` (atomically). `weight_type`: "source"
    re-quantizes each edited tensor to its own type and copies the rest; "F16"/"F32" write
    every matrix in that type (the unquantized edited model); "F16-edited" writes the edited
    tensors in F16 and copies the rest (the edit unquantized on the source's own weights: a
    7B's is the size of its file, not 13.5 GB)."""
    import gguf

    from edge.gguf_file import inspect

    if weight_type not in WEIGHT_TYPES:
        raise BadOptionError(f"weight type {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    t0 = time.perf_counter()
    info = inspect(src)
    dst = Path(dst)
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} exists; pass --force to overwrite it or choose another -o")
    if dst.resolve() == Path(info.path).resolve():
        raise BadOptionError("-o must differ from the input model")
    if info.arch != "llama":
        raise InvalidModelFileError(f"{src} is a '{info.arch}' model; folding supports Llama GGUFs")
    plan.check(info.n_layers or 0, info.n_embd or 0)
    reader = _reader(str(info.path), os.stat(info.path).st_mtime_ns)
    jobs, edited, untie = _jobs(reader, plan, weight_type, src)
    result = FoldResult(str(dst), str(info.path), weight_type, edited, untie)
    with atomic_path(dst) as tmp:
        w = gguf.GGUFWriter(str(tmp), info.arch)
        _copy_metadata(reader, w, weight_type, note)
        for job in jobs:
            _add_info(w, job, info.n_embd or 0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for job in jobs:
            if on_tensor:
                on_tensor(job[0])
            cost = _write(w, job, plan, reader.endianess)
            if cost is not None:
                result.tensors.append(cost)
        w.close()
    result.seconds = time.perf_counter() - t0
    result.size = dst.stat().st_size
    return result


def requant_cost(full: str | os.PathLike[str], quantized: str | os.PathLike[str], text: str, *,
                 threads: int | None = None, n_ctx: int = 512, max_chunks: int = 4) -> dict[str, float]:
    """KL(full ‖ quantized) per token and the PPL ratio on `text` (llama-perplexity's scheme):
    what re-quantizing the edited weights costs, next to the edit itself."""
    import tempfile

    from edge.evaluate import perplexity

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(text)
    try:
        r = perplexity(quantized, f.name, base=full, n_ctx=n_ctx, threads=threads,
                       max_chunks=max_chunks, log=False)
    finally:
        os.unlink(f.name)
    return {"kl_mean": float(r.kld_mean or 0.0), "kl_p99": float(r.kld_p99 or 0.0),
            "ppl_full": float(r.base_ppl or 0.0), "ppl_quantized": float(r.ppl),
            "top1_agreement": float(r.top1_agreement or 0.0), "tokens": int(r.n_scored)}
