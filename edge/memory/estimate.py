"""Peak RSS of a llama.cpp session, predicted from a GGUF's metadata alone.

The parts follow what llama.cpp (vendored ggml 0.25.3) allocates on a CPU:
- weights: with mmap the file is mapped with MAP_POPULATE and only the span outside the
  first..last weight kept in a plain CPU buffer is unmapped, so every page of that span
  stays in RSS as file-backed page cache; weights the CPU repacks (edge.memory.cpu) are
  copied to anonymous memory and their mapped source pages are never read again.
- KV cache: n_layers × kv_size × (K row + V row), kv_size = n_ctx padded to 256; cleared
  at creation, so all of it is resident at once.
- compute: the graph buffer is sized for the worst case (a full ubatch with every row an
  output) but only the pages a graph actually used count; the worst graph edge runs is
  the last full ubatch of a prompt that fills the context (the K·Q scores, n_kv × u ×
  n_head floats, and without flash attention their f16 copy in the CPU work buffer).
- output: the logits buffer, n_vocab floats per output row.
- runtime and process: llama.cpp's vocabulary, llama-cpp-python's batch, Python and
  its imports. These are measured constants (benchmarks/memory_model.py, x86-64 here).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edge.errors import BadOptionError
from edge.gguf_file import ModelInfo, TensorInfo
from edge.memory.cpu import CpuFeatures, repack_layout

MiB = 1 << 20
PAGE = 4096
CTX_PAD = 256  # llama.cpp pads n_ctx (and the attended span, n_kv) to a multiple of 256
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")

# Measured on x86-64 (Python 3.11, numpy 2, llama-cpp-python 0.3.36 built with AVX512 and
# OpenMP), benchmarks/memory_model.py. Process: RSS after the imports, anonymous and
# file-backed (shared libraries, .pyc). numba is no longer imported by edge.cli (it cost
# 18 MiB anonymous and 96 MiB file-backed: llvmlite alone maps ~60 MiB).
PROCESS = {
    "cli": (33 * MiB, 18 * MiB),  # `edge run`: edge.cli imports every subcommand
    "library": (24 * MiB, 26 * MiB),  # a script importing edge.runtime
    "resident": (0, 0),  # checked from inside the running process: MemAvailable already counts it
}
LIB_CODE_FILE = 9 * MiB  # llama.cpp code pages faulted in by loading and the first graphs
RUNTIME_BASE = 12 * MiB  # llama.cpp model/context objects, OpenMP/thread pool stacks, first-graph scratch
VOCAB_PER_TOKEN = 230  # bytes: token text, score, attributes, lookup maps
VOCAB_PER_MERGE = 110  # bytes: one BPE rank-map entry
BPE_BASE = 2 * MiB  # pre-tokenizer regexes of BPE vocabularies


@dataclass(frozen=True)
class SessionParams:
    """The settings that decide a session's memory (RuntimeConfig's, plus how it is used)."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    use_mmap: bool = True
    use_mlock: bool = False
    repack: bool = True  # llama.cpp's extra buffer types (use_extra_bufts)
    n_outputs: int = 1  # logits rows per batch: 1 when generating, n_batch when scoring every token
    n_filled: int | None = None  # tokens in the KV cache at the peak; None: the whole context
    process: str = "cli"  # whose overhead: "cli" (the edge command) or "library"

    @classmethod
    def from_config(cls, config: Any, **extra: Any) -> SessionParams:
        """From a RuntimeConfig (read by attribute name, so this module needs no llama.cpp)."""
        names = ("n_ctx", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "use_mmap", "use_mlock", "repack")
        return cls(**{n: getattr(config, n) for n in names if hasattr(config, n)}, **extra)

    def validate(self) -> None:
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise BadOptionError(f"KV cache type {getattr(self, name)!r} is not one of {', '.join(KV_TYPES)}")
        if self.type_v not in ("f32", "f16", "bf16") and not self.flash_attn:
            raise BadOptionError(f"a {self.type_v} V cache needs flash attention (llama.cpp refuses it otherwise)")
        if self.n_ctx < 1 or self.n_batch < 1 or self.n_ubatch < 1:
            raise BadOptionError("n_ctx, n_batch and n_ubatch must be ≥ 1")
        if self.process not in PROCESS:
            raise BadOptionError(f"process must be one of {', '.join(PROCESS)}")


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    kind: str  # "anonymous" | "file, in use" | "file, reclaimable"


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak RSS, in named parts (bytes). `required` is what must stay in RAM."""

    params: SessionParams
    cpu: CpuFeatures
    kv_size: int  # cells: n_ctx padded to 256
    weights_mapped: int  # file-backed: the mapped GGUF span, resident (page cache)
    weights_mapped_idle: int  # of which: sources of repacked weights, never read again
    weights_mapped_lookup: int  # of which: token embeddings, read a row per token (counted as needed)
    weights_anon: int  # weights read into anonymous memory (use_mmap off)
    weights_repacked: int  # interleaved copies (anonymous)
    kv_cache: int
    compute: int  # graph buffer pages used + CPU work buffer
    output: int  # logits buffer
    runtime: int  # vocabulary, llama.cpp objects, batch, threads
    process_anon: int  # Python and imports
    process_file: int  # shared libraries and code mapped from disk
    repacked: dict[str, int] = field(default_factory=dict)  # layout → bytes
    info: ModelInfo | None = field(default=None, repr=False, compare=False)

    @property
    def anon(self) -> int:
        return (self.weights_anon + self.weights_repacked + self.kv_cache + self.compute
                + self.output + self.runtime + self.process_anon)

    @property
    def file(self) -> int:
        return self.weights_mapped + self.process_file

    @property
    def peak_rss(self) -> int:
        return self.anon + self.file

    @property
    def reclaimable(self) -> int:
        """Mapped pages the kernel can drop at no cost (mlock pins them)."""
        return 0 if self.params.use_mlock else self.weights_mapped_idle

    @property
    def required(self) -> int:
        """RAM the session needs to run without swapping or re-reading weights from disk."""
        return self.peak_rss - self.reclaimable

    @property
    def working_set(self) -> int:
        """`required` less the embedding rows a session never looks up: what stays resident
        after the kernel has reclaimed all it could (measured with MADV_PAGEOUT)."""
        return self.required - (0 if self.params.use_mlock else self.weights_mapped_lookup)

    def parts(self) -> list[Part]:
        mapped_kind = "file, in use" if not self.params.use_mlock else "file, locked"
        rows = [
            Part("weights, mapped and read every token",
                 self.weights_mapped - self.weights_mapped_idle - self.weights_mapped_lookup, mapped_kind),
            Part("token embeddings, mapped (a row per token)", self.weights_mapped_lookup, mapped_kind),
            Part("weights, mapped but repacked (idle)", self.weights_mapped_idle,
                 "file, reclaimable" if not self.params.use_mlock else "file, locked"),
            Part("weights, read into memory", self.weights_anon, "anonymous"),
            Part("weights, repacked copies", self.weights_repacked, "anonymous"),
            Part(f"KV cache ({self.kv_size} cells, K {self.params.type_k}, V {self.params.type_v})",
                 self.kv_cache, "anonymous"),
            Part("compute buffers", self.compute, "anonymous"),
            Part("logits", self.output, "anonymous"),
            Part("llama.cpp runtime and vocabulary", self.runtime, "anonymous"),
            Part(f"process ({self.params.process})", self.process_anon, "anonymous"),
            Part("shared libraries", self.process_file, "file, in use"),
        ]
        return [r for r in rows if r.bytes]


def type_size(name: str, n: int) -> int:
    """Bytes of a row of n values of ggml type `name` (Q8_0, F16, ...)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    return n // block * size


def pad(n: int, to: int = CTX_PAD) -> int:
    return -(-n // to) * to


def _dims(info: ModelInfo) -> tuple[int, int, int, int, int, int]:
    embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    n_vocab = info.n_vocab or (embd.shape[1] if embd else 0)
    if not (info.n_layers and info.n_embd and info.n_head and n_vocab):
        raise BadOptionError(f"{info.path} lacks the shape fields a memory estimate needs (layers, embedding, heads)")
    n_head_kv = info.n_head_kv or info.n_head
    n_ff = info.n_ff or 4 * info.n_embd
    return info.n_layers, info.n_embd, info.n_head, n_head_kv, n_ff, n_vocab


def kv_cache_bytes(info: ModelInfo, kv_size: int, type_k: str = "f16", type_v: str = "f16") -> int:
    n_layers, n_embd, n_head, n_head_kv, _, _ = _dims(info)
    n_embd_kv = n_embd // n_head * n_head_kv
    return n_layers * kv_size * (type_size(type_k, n_embd_kv) + type_size(type_v, n_embd_kv))


def _ubatches(n_tokens: int, n_batch: int, n_ubatch: int) -> list[tuple[int, int]]:
    """(tokens, end position) of every ubatch of a prompt of n_tokens, in order."""
    out = []
    for start in range(0, n_tokens, n_batch):
        chunk = min(n_batch, n_tokens - start)
        for off in range(0, chunk, n_ubatch):
            u = min(n_ubatch, chunk - off)
            out.append((u, start + off + u))
    return out


def compute_bytes(info: ModelInfo, p: SessionParams, kv_size: int) -> int:
    """Graph-buffer pages touched plus the CPU work buffer, worst ubatch of the fill."""
    return sum(compute_parts(info, p, kv_size))


def compute_parts(info: ModelInfo, p: SessionParams, kv_size: int) -> tuple[int, int]:
    """(graph, work) bytes: the largest graph-buffer high-water mark of the ubatches a
    prompt of n_filled tokens makes, and the largest CPU work buffer they need."""
    n_layers, n_embd, n_head, n_head_kv, n_ff, n_vocab = _dims(info)
    n_embd_kv = n_embd // n_head * n_head_kv
    filled = min(p.n_filled or p.n_ctx, kv_size)
    graph = work = 0
    for u, end in _ubatches(filled, min(p.n_batch, kv_size), min(p.n_ubatch, p.n_batch, kv_size)):
        n_kv = min(kv_size, max(CTX_PAD, pad(end)))
        n_out = min(p.n_outputs, u) if end == filled or p.n_outputs > 1 else 0
        e, e_kv, f = 4 * n_embd * u, 4 * n_embd_kv * u, 4 * n_ff * u
        if p.flash_attn:
            mask = 2 * n_kv * u  # f16 mask; scores never materialise
            attn = mask + 5 * e + 2 * e_kv
        else:
            mask = 4 * n_kv * u
            kq = 4 * n_kv * u * n_head
            attn = mask + kq + 5 * e + 2 * e_kv
            # the work buffer holds the scores converted to the V cache's dot type (f16)
            work = max(work, type_size(_vec_dot(p.type_v), n_kv) * u * n_head)
        ffn = mask + 3 * f + 3 * e
        out = 4 * n_vocab * n_out + 2 * 4 * n_embd * max(n_out, 1)
        graph = max(graph, attn, ffn, out)
        work = max(work, type_size("Q8_0", pad(n_ff, 32)) * u)  # activations quantized for the matmuls
    return graph, work


def _vec_dot(kv_type: str) -> str:
    return "F16" if kv_type in ("f16", "f32", "bf16") else "Q8_0"


def _tensor_offsets(tensors: tuple[TensorInfo, ...], alignment: int = 32) -> list[int]:
    offs, pos = [], 0
    for t in tensors:
        offs.append(pos)
        pos = pad(pos + t.n_bytes, alignment)
    return offs


def _weights(info: ModelInfo, p: SessionParams, cpu: CpuFeatures) -> tuple[int, int, int, int, int, dict[str, int]]:
    """(mapped, mapped idle, mapped lookup, anonymous, repacked, repacked per layout) in bytes."""
    repacked: dict[str, int] = {}
    host = []  # (offset, bytes) of weights llama.cpp keeps in a plain CPU buffer
    idle = []
    offsets = _tensor_offsets(info.tensors)
    data_start = info.file_size - (offsets[-1] + info.tensors[-1].n_bytes if info.tensors else 0)
    names = {t.name for t in info.tensors}
    for t, off in zip(info.tensors, offsets, strict=True):
        # every 2-D weight but the token embeddings (a row lookup) feeds a matmul
        layout = None
        if p.repack and len(t.shape) == 2 and t.name != "token_embd.weight":
            layout = repack_layout(t.type, t.shape[1], cpu)
        if layout:
            repacked[layout] = repacked.get(layout, 0) + t.n_bytes
            idle.append((off, t.n_bytes))
        else:
            host.append((off, t.n_bytes))
        if t.name == "token_embd.weight" and "output.weight" not in names and p.repack:
            tied = repack_layout(t.type, t.shape[1], cpu)  # tied output: a second, repacked copy
            if tied:
                repacked[tied] = repacked.get(tied, 0) + t.n_bytes
    n_repacked = sum(repacked.values())
    if not p.use_mmap:
        return 0, 0, 0, sum(b for _, b in host), n_repacked, repacked
    if not host:
        return 0, 0, 0, 0, n_repacked, repacked
    first = data_start + min(o for o, _ in host)
    last = data_start + max(o + b for o, b in host)
    lo, hi = first // PAGE * PAGE, pad(last, PAGE)
    mapped = hi - lo
    idle_bytes = sum(min(hi, data_start + o + b) - max(lo, data_start + o)
                     for o, b in idle if data_start + o < hi and data_start + o + b > lo)
    tied = "output.weight" not in names
    lookup = 0 if tied else sum(t.n_bytes for t in info.tensors if t.name == "token_embd.weight")
    return mapped, idle_bytes, lookup, 0, n_repacked, repacked


def _runtime_bytes(info: ModelInfo, p: SessionParams, kv_size: int) -> int:
    _, _, _, _, _, n_vocab = _dims(info)
    vocab = VOCAB_PER_TOKEN * n_vocab
    if info.n_merges:
        vocab += BPE_BASE + VOCAB_PER_MERGE * info.n_merges
    batch = min(p.n_batch, kv_size) * min(4 * kv_size, PAGE)  # llama-cpp-python's per-token seq_id arrays
    return RUNTIME_BASE + vocab + batch


def estimate(info: ModelInfo, params: SessionParams | None = None, cpu: CpuFeatures | None = None) -> MemoryEstimate:
    """Predict the peak RSS of a session on `info` with `params` on `cpu` (default: this one)."""
    p = params or SessionParams()
    p.validate()
    cpu = cpu or CpuFeatures.detect()
    n_ctx = min(p.n_ctx, info.context_length) if info.context_length else p.n_ctx  # as Runtime caps it
    if n_ctx != p.n_ctx:
        p = replace(p, n_ctx=n_ctx)
    kv_size = pad(n_ctx)
    mapped, idle, lookup, anon_w, repacked_total, repacked = _weights(info, p, cpu)
    _, _, _, _, _, n_vocab = _dims(info)
    proc_anon, proc_file = PROCESS[p.process]
    return MemoryEstimate(
        params=p, cpu=cpu, kv_size=kv_size,
        weights_mapped=mapped, weights_mapped_idle=idle, weights_mapped_lookup=lookup, weights_anon=anon_w,
        weights_repacked=repacked_total,
        kv_cache=kv_cache_bytes(info, kv_size, p.type_k, p.type_v),
        compute=compute_bytes(info, p, kv_size),
        output=4 * n_vocab * max(1, min(p.n_outputs, p.n_batch)),
        runtime=_runtime_bytes(info, p, kv_size),
        process_anon=proc_anon, process_file=proc_file + LIB_CODE_FILE,
        repacked=repacked, info=info,
    )
