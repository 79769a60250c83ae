"""Will a model fit this device? A verdict from the memory model and /proc/meminfo.

What counts as available on Linux: MemAvailable (free memory plus the page cache and slab
the kernel can reclaim without swapping), less a safety margin for everything else that
will run (max(256 MiB, 5% of RAM)). What a session needs is `MemoryEstimate.required`: its
peak RSS less the mapped pages it never reads again (a repacked weight's source), which
the kernel drops at no cost. Swap is the second tier: a session that fits only with it
"would swap" (mapped weights would be re-read from disk instead, just as slow). zram (the
compressed swap Raspberry Pi OS uses) lives in RAM and quantized weights and KV barely
compress, so only a quarter of free zram counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge.errors import InsufficientMemoryError
from edge.gguf_file import ModelInfo, inspect
from edge.memory.cpu import CpuFeatures
from edge.memory.estimate import CTX_PAD, PROCESS, MemoryEstimate, SessionParams, estimate
from edge.memory.shapes import synthesize

if TYPE_CHECKING:
    from edge.catalog import CatalogEntry

GiB = 1 << 30
MIN_MARGIN = 256 << 20
MARGIN_SHARE = 0.05
ZRAM_GAIN = 0.25  # RAM a byte of free zram really frees for incompressible pages


@dataclass(frozen=True)
class MemorySnapshot:
    """RAM and swap figures (bytes), read from /proc or injected (tests, other devices)."""

    total: int
    available: int
    swap_free: int = 0
    zram_free: int = 0  # part of swap_free that is zram

    @property
    def swap_usable(self) -> int:
        return self.swap_free - self.zram_free + int(self.zram_free * ZRAM_GAIN)

    @property
    def readable(self) -> bool:
        # /proc/meminfo without MemAvailable or MemFree (a container, a fixture tree): no verdict
        return self.available > 0

    @property
    def margin(self) -> int:
        return max(MIN_MARGIN, int(self.total * MARGIN_SHARE))

    @classmethod
    def read(cls) -> MemorySnapshot:
        """This machine (/proc under EDGE_SYSFS_ROOT, as edge.device reads it)."""
        from edge.device import meminfo, sysfs_root

        zram = 0
        swaps = sysfs_root() / "proc/swaps"
        for line in (swaps.read_text().splitlines()[1:] if swaps.is_file() else []):
            f = line.split()  # Filename Type Size Used Priority (KiB)
            if len(f) >= 4 and "zram" in f[0] and f[2].isdigit() and f[3].isdigit():
                zram += (int(f[2]) - int(f[3])) * 1024
        available = meminfo("MemAvailable")
        if available is None:  # kernels before 3.14
            available = (meminfo("MemFree") or 0) + (meminfo("Cached") or 0)
        return cls(meminfo("MemTotal") or 0, available, meminfo("SwapFree") or 0, zram)

    @classmethod
    def board(cls, ram_gib: float, *, os_use: int = 600 << 20) -> MemorySnapshot:
        """A board with `ram_gib` GiB running a headless OS that uses ~600 MiB (firmware
        carve-out included), no swap: for planning on another device."""
        total = int(ram_gib * GiB)
        return cls(total, total - os_use)


@dataclass(frozen=True)
class FitVerdict:
    status: str  # "fits" | "swap" | "oom" | "unknown"
    needed: int  # bytes that must stay resident (MemoryEstimate.required)
    peak_rss: int  # what ps / VmHWM will show, reclaimable pages included
    available: int
    swap: int  # usable swap (zram discounted)
    margin: int
    n_ctx: int
    type_k: str
    max_ctx: int | None  # largest context that fits without swap at this KV type; None: not even 256
    estimate: MemoryEstimate | None
    approximate: bool = False  # predicted from catalog metadata, not a GGUF header
    repack_saves: int = 0  # bytes turning the repack off would take off `needed`
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.status in ("fits", "unknown")

    def message(self, subject: str = "this model", force: str = "--force") -> str:
        """One line for the CLI."""
        need, avail = _gib(self.needed), _gib(self.available - self.margin)
        if self.status == "unknown":
            return f"{subject}: {self.note}"
        if self.status == "fits":
            return (f"{subject} needs {need} at --ctx {self.n_ctx} (peak RSS {_gib(self.peak_rss)}); "
                    f"this device has {avail} available")
        where = (f"this device has {avail} available"
                 + (f" and {_gib(self.swap)} of swap (it would swap)" if self.status == "swap" and self.swap
                    else ", so it would run out of memory" if self.status == "oom" else ""))
        if self.max_ctx:
            way = f"the largest context that fits is {self.max_ctx}, or use a smaller quant"
        else:
            way = "no context fits: use a smaller quant"
        if self.repack_saves:
            way += f" (or load without llama.cpp's repacked weight copy: {_gib(self.repack_saves)} less)"
        return f"{subject} needs {need} at --ctx {self.n_ctx} but {where}; {way}; {force} to try anyway"

    def require(self, subject: str = "this model", *, force: bool = False, flag: str = "--force") -> None:
        """Raise InsufficientMemoryError unless it fits (or `force`)."""
        if not force and not self.fits:
            raise InsufficientMemoryError(self.message(subject, flag))


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _status(needed: int, mem: MemorySnapshot) -> str:
    room = mem.available - mem.margin
    return "fits" if needed <= room else "swap" if needed <= room + mem.swap_usable else "oom"


def largest_context(info: ModelInfo, params: SessionParams, cpu: CpuFeatures, room: int) -> int | None:
    """The largest n_ctx (a multiple of 256, or the model's maximum) whose session needs ≤ room."""
    top = info.context_length or 131072

    def need(n: int) -> int:
        return estimate(info, replace(params, n_ctx=n, n_filled=None), cpu).required

    if need(min(CTX_PAD, top)) > room:
        return None
    if need(top) <= room:
        return top
    lo, hi = 1, max(1, top // CTX_PAD)  # need(lo·256) fits, need(hi·256) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid * CTX_PAD) <= room else (lo, mid)
    return lo * CTX_PAD


def fit(target: ModelInfo | MemoryEstimate | str | os.PathLike[str] | CatalogEntry, *,
        params: SessionParams | None = None, cpu: CpuFeatures | None = None,
        memory: MemorySnapshot | None = None, ram: int | None = None) -> FitVerdict:
    """Does a session on `target` fit? `target` is a GGUF path or ModelInfo (before loading),
    a CatalogEntry (before downloading: from its shape, else a size-only rule) or an
    estimate. `ram` injects the available bytes (no swap); `memory` a whole snapshot."""
    from edge.catalog import CatalogEntry

    cpu = cpu or (target.cpu if isinstance(target, MemoryEstimate) else CpuFeatures.detect())
    mem = memory or (MemorySnapshot(ram, ram) if ram is not None else MemorySnapshot.read())
    approximate = False
    if isinstance(target, MemoryEstimate):
        if target.info is None:
            raise ValueError("this estimate carries no ModelInfo; pass the ModelInfo instead")
        info, params = target.info, target.params
    elif isinstance(target, CatalogEntry):
        if not target.shape:
            return _size_only(target, params or SessionParams(), cpu, mem)
        info, approximate = synthesize(target.shape, target.quant, name=target.name), True
    else:
        info = target if isinstance(target, ModelInfo) else inspect(target)
    params = params or SessionParams()
    est = target if isinstance(target, MemoryEstimate) else estimate(info, params, cpu)
    p = est.params
    room = mem.available - mem.margin
    if not mem.readable:
        return FitVerdict(status="unknown", needed=est.required, peak_rss=est.peak_rss, available=0,
                          swap=0, margin=mem.margin, n_ctx=p.n_ctx, type_k=p.type_k, max_ctx=None,
                          estimate=est, approximate=approximate,
                          note="this device's free memory could not be read, so it was not checked")
    status = _status(est.required, mem)
    saves = 0
    if status != "fits" and p.repack and est.weights_repacked:
        off = estimate(info, replace(p, repack=False), cpu)
        saves = est.required - off.required if _status(off.required, mem) == "fits" else 0
    return FitVerdict(status=status, needed=est.required, peak_rss=est.peak_rss, available=mem.available,
                      swap=mem.swap_usable, margin=mem.margin, n_ctx=p.n_ctx, type_k=p.type_k,
                      max_ctx=largest_context(info, p, cpu, room), estimate=est,
                      approximate=approximate, repack_saves=saves)


def _size_only(entry: CatalogEntry, params: SessionParams, cpu: CpuFeatures, mem: MemorySnapshot) -> FitVerdict:
    """No shape in the catalog: the file size (plus a full repacked copy when this CPU
    repacks the quant's main type) can prove a model too big, never that it fits."""
    from edge.memory.cpu import repack_layout
    from edge.quantize import QUANT_TYPES

    size = entry.size or 0
    q = QUANT_TYPES.get(entry.quant.upper()) if entry.quant else None
    repacks = bool(q and params.repack and repack_layout(q.base, 4096, cpu))
    floor = size * (2 if repacks else 1) + sum(PROCESS[params.process])
    status = _status(floor, mem) if size and mem.readable else "unknown"
    note = ("the catalog gives no shape or size for it, so its memory cannot be checked before the download"
            if not size else "" if mem.readable else "this device's free memory could not be read")
    if status == "fits":  # the weights fit, but KV cache and compute are unknown without a shape
        status, note = "unknown", (f"its weights need {_gib(floor)} of {_gib(mem.available - mem.margin)} "
                                   "available; the context's share is unknown until it is downloaded")
    return FitVerdict(status=status, needed=floor, peak_rss=floor, available=mem.available,
                      swap=mem.swap_usable, margin=mem.margin, n_ctx=params.n_ctx, type_k=params.type_k,
                      max_ctx=None, estimate=None, approximate=True, note=note)
