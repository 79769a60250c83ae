"""What `edge tune` searches: one Candidate per (model file, loader, context) setting.

Quality depends on the weights (quant type), the KV cache type and flash attention (the
CPU kernel with it sums in another order: up to 0.5 nats on a token's log-prob), not on
threads or batch sizes; speed depends on all of them. Batch sizes change only prompt
processing, so they are searched for the pp and ttft objectives only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

OBJECTIVES = ("tg", "pp", "ttft")
# Quant types tried from an f16/bf16 (or Q8_0) source, widest first; types llama.cpp's
# quantizer cannot give this model's rows fall back per tensor, as `edge quantize` does.
QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_NL")
KV_TYPES = ("f16", "q8_0", "q4_0")  # a quantized V cache needs flash attention (llama.cpp)
BATCHES = ((512, 512), (2048, 512), (256, 256), (512, 128))


@dataclass(frozen=True)
class Candidate:
    quant: str  # file type of the weights (the source's own type for the source file)
    threads: int
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    repack: bool = True
    use_mmap: bool = True
    use_mlock: bool = False

    @property
    def key(self) -> str:
        """Stable id in the journal and the profile."""
        return (f"{self.quant}/t{self.threads}/b{self.n_batch}.{self.n_ubatch}/kv{self.type_k}.{self.type_v}"
                f"/fa{int(self.flash_attn)}/rp{int(self.repack)}/mm{int(self.use_mmap)}{int(self.use_mlock)}")

    @property
    def quality_key(self) -> str:
        return f"{self.quant}/kv{self.type_k}.{self.type_v}/fa{int(self.flash_attn)}"

    @property
    def load_key(self) -> tuple[str, bool, bool, bool]:
        """Candidates sharing it share one loaded model (contexts differ)."""
        return (self.quant, self.repack, self.use_mmap, self.use_mlock)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        kv = self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"
        bits = [self.quant, f"{self.threads} threads", f"KV {kv}", "flash attn" if self.flash_attn else "no FA"]
        if (self.n_batch, self.n_ubatch) != (512, 512):
            bits.append(f"batch {self.n_batch}/{self.n_ubatch}")
        if not self.repack:
            bits.append("no repack")
        if not self.use_mmap:
            bits.append("no mmap")
        if self.use_mlock:
            bits.append("mlock")
        return ", ".join(bits)


def defaults(quant: str, threads: int) -> Candidate:
    """What `edge run MODEL` does untuned (RuntimeConfig's defaults)."""
    return Candidate(quant=quant, threads=threads)


def thread_counts(cores: int) -> list[int]:
    if cores <= 4:
        return list(range(1, cores + 1))
    return sorted({cores // 2, cores - 2, cores - 1, cores})


def build_space(quants: list[str], *, cores: int, objective: str,
                repacks: dict[str, bool] | None = None) -> list[Candidate]:
    """Every combination worth measuring. `repacks[q]`: does this CPU repack q's weights
    (else repack on and off are the same run and only "on" is listed)."""
    batches = BATCHES if objective in ("pp", "ttft") else BATCHES[:1]
    kvs = [("f16", False), ("f16", True)] + [(t, True) for t in KV_TYPES[1:]]
    out = []
    for q in quants:
        for t in thread_counts(cores):
            for nb, nu in batches:
                for kv, fa in kvs:
                    for rp in ((True, False) if (repacks or {}).get(q) else (True,)):
                        out.append(Candidate(q, t, nb, nu, kv, kv, fa, rp))
    return out


def loader_variants(c: Candidate) -> list[Candidate]:
    """mmap and mlock move memory and load time, rarely speed: tried on the winner only."""
    return [replace(c, use_mlock=True), replace(c, use_mmap=False)]
