"""edge convert: Hugging Face Llama checkpoint (safetensors) → GGUF, one tensor at a time."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from edge.convert.checkpoint import Checkpoint
from edge.convert.hparams import HParams
from edge.convert.hparams import hf_name as _hf_name
from edge.convert.vocab import add_vocab, load_vocab
from edge.errors import ConversionError, OutputExistsError
from edge.paths import atomic_write

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ARCH = gguf.MODEL_ARCH.LLAMA
# Tensors Hugging Face checkpoints carry that the GGUF does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Progress = Callable[[str, int, int], None]  # (tensor name, index, total)


@dataclass
class ConvertResult:
    path: str
    outtype: str
    n_tensors: int
    n_params: int
    file_size: int
    tokenizer: str
    n_vocab: int
    seconds: float
    peak_rss_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str | None          # None: computed (rope_freqs)
    shape: tuple[int, ...]       # numpy (row-major) shape of the GGUF tensor
    qtype: Q


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half row order → GGUF's interleaved pairs, per head.

    HF stores each head's rows as [x0..x_{d/2-1} | y0..y_{d/2-1}]; llama.cpp's RoPE
    rotates adjacent rows (x0, y0), (x1, y1), … so the halves are interleaved.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk (GGUF → Hugging Face)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(hf_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, outtype: str = "f16",
            force: bool = False, name: str | None = None, progress: Progress | None = None) -> ConvertResult:
    """Write `hf_dir`'s Llama checkpoint to `out` as a GGUF llama.cpp can load.

    Nothing is written until the checkpoint, shapes and tokenizer check out; the GGUF is
    written to a temp file renamed into place on success, so `out` is never partial.
    """
    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ConversionError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a folder; give the Hugging Face model directory")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it or choose another -o")
    hp = HParams.from_dir(hf_dir)
    ckpt = Checkpoint.open(hf_dir)
    plan, hf_shapes = _plan(hp, ckpt, OUTTYPES[outtype][0])
    vocab = load_vocab(hf_dir)
    vocab.pad_to(hf_shapes["token_embd.weight"][0])

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCH])
    n_params = _add_metadata(writer, hp, hf_dir, outtype, plan, name)
    add_vocab(writer, hf_dir, vocab)
    for p in plan:
        nbytes = _nbytes(p.shape, p.qtype)
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)

    try:
        with atomic_write(out, "wb") as f:
            # GGUFWriter opens files itself; hand it atomic_write's temp file instead.
            writer.fout, writer.path, writer.state = [f], out, WriterState.EMPTY
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, p in enumerate(plan):
                if progress:
                    progress(p.gguf_name, i, len(plan))
                writer.write_tensor_data(_tensor_data(p, hp, ckpt))
            writer.fout = None  # atomic_write closes and renames it
            if progress:
                progress("", len(plan), len(plan))
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ConversionError(f"writing {out} failed: {reason}; nothing was written") from None
    from edge.system import peak_rss_bytes

    return ConvertResult(
        path=str(out), outtype=outtype, n_tensors=len(plan), n_params=n_params,
        file_size=out.stat().st_size, tokenizer=f"{vocab.source} ({vocab.model}, pre {vocab.pre})",
        n_vocab=len(vocab.tokens), seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
    )


def _plan(hp: HParams, ckpt: Checkpoint, qtype: Q) -> tuple[list[_Planned], dict[str, tuple[int, ...]]]:
    """Map and shape-check every tensor before a byte is written."""
    tmap = gguf.get_tensor_name_map(ARCH, hp.n_layers)
    expected = hp.expected_shapes()
    found: dict[str, str] = {}
    for hf_name in ckpt.tensors:
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        g = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None or g not in expected:
            raise ConversionError(
                f"tensor {hf_name} has no place in a {hp.architecture} GGUF; is config.json "
                f"(num_hidden_layers={hp.n_layers}) the one for these weights?"
            )
        found[g] = hf_name
    if hp.tie_word_embeddings:
        found.pop("output.weight", None)  # transformers ignores a stored lm_head when tied
    optional = {"output.weight"}  # absent: llama.cpp reuses token_embd
    missing = [g for g in expected if g not in found and g not in optional]
    if missing:
        what = ", ".join(_hf_name(m) or m for m in missing[:3])
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) ({what}); it is incomplete")
    hf_shapes: dict[str, tuple[int, ...]] = {}
    for g, hf_name in found.items():
        shape = tuple(ckpt.tensors[hf_name].shape)
        want = expected[g]
        # The vocabulary dimension may be padded beyond config's vocab_size.
        ok = shape == want or (g in ("token_embd.weight", "output.weight") and shape[1:] == want[1:])
        if not ok:
            raise ConversionError(
                f"tensor {hf_name} has shape {list(shape)} but config.json implies {list(want)}; "
                "the weights and config.json do not match"
            )
        hf_shapes[g] = shape
    if "output.weight" in hf_shapes and hf_shapes["output.weight"][0] != hf_shapes["token_embd.weight"][0]:
        raise ConversionError("lm_head and embed_tokens disagree on the vocabulary size")
    order = list(expected)  # GGUF order: embeddings, output, then layer by layer
    plan = [_Planned(g, found[g], hf_shapes[g], _qtype_for(hf_shapes[g], qtype))
            for g in order if g in found]
    if hp.rope_scaling_type == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_Planned(name, None, (hp.head_dim // 2,), Q.F32))
    return plan, hf_shapes


def _qtype_for(shape: tuple[int, ...], qtype: Q) -> Q:
    if len(shape) == 1:
        return Q.F32  # norms stay f32, as llama.cpp's converter keeps them
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16  # rows not a whole number of blocks: llama.cpp falls back to f16 too
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def _tensor_data(p: _Planned, hp: HParams, ckpt: Checkpoint) -> np.ndarray:
    if p.hf_name is None:
        return hp.llama3_rope_factors()
    # f16 → f16 needs no float32 detour: half the memory and time on the largest tensors.
    same_f16 = p.qtype == Q.F16 and ckpt.dtype_of(p.hf_name) == "F16"
    w = ckpt.load(p.hf_name, np.float16 if same_f16 else np.float32)
    if p.gguf_name.endswith("attn_q.weight"):
        w = permute_qk(w, hp.n_head)
    elif p.gguf_name.endswith("attn_k.weight"):
        w = permute_qk(w, hp.n_head_kv)
    if p.qtype == Q.F32:
        return np.ascontiguousarray(w)
    if p.qtype == Q.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(w, p.qtype)


def _add_metadata(w: gguf.GGUFWriter, hp: HParams, hf_dir: Path, outtype: str,
                  plan: list[_Planned], name: str | None) -> int:
    n_params = sum(int(np.prod(p.shape)) for p in plan if p.hf_name is not None)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or _model_name(hp, hf_dir))
    w.add_size_label(gguf.utility.model_weight_count_rounded_notation(n_params))
    src = hp.name_or_path
    if src and src.count("/") == 1 and not Path(src).exists():
        w.add_source_url(f"https://huggingface.co/{src}")  # a hub id, not a local path
        w.add_source_repo_url(f"https://huggingface.co/{src}")
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.context_length)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layers)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_norm_eps)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    if hp.rope_scaling_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))  # type: ignore[index]
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter, whatever the type
    return n_params


def _model_name(hp: HParams, hf_dir: Path) -> str:
    src = hp.name_or_path
    if src and not Path(src).is_absolute():
        return src.rstrip("/").split("/")[-1]
    return hf_dir.resolve().name
