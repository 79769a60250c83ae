"""Which weights llama.cpp copies into a repacked (interleaved) layout on a given CPU.

llama.cpp's CPU backend offers "extra buffer types" before the plain CPU buffer: a weight
whose matmul kernel exists in an interleaved layout is copied there at load time (anonymous
memory), while the mmap'd file pages it was read from stay mapped. The rules below are
ggml-cpu/repack.cpp's `ggml_repack_get_optimal_repack_type` and amx/common.h's
`qtype_has_amx_kernels` of the vendored ggml 0.25.3 (llama-cpp-python 0.3.36). The
features are llama.cpp's *build* flags (what `llama_print_system_info()` reports): a
generic aarch64 wheel on a Pi 5 has no DOTPROD even though the core does.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

from edge.hostcheck import CPU_FLAG_FOR, cpu_flags, parse_features

# /proc/cpuinfo flag → llama.cpp feature name (hostcheck's table, inverted).
_FEATURE_FOR_FLAG = {flag: feat for feat, flag in CPU_FLAG_FOR.items()}

# Types the AMX buffer takes (x86 Sapphire Rapids+, only in builds compiled with AMX).
_AMX_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})


@dataclass(frozen=True)
class CpuFeatures:
    """The SIMD features llama.cpp was built with, as named in its system info."""

    arch: str  # "x86_64", "aarch64", ...
    features: frozenset[str] = field(default_factory=frozenset)
    sve_bytes: int = 0  # SVE vector length (SVE_CNT); the Q4_0 8x8 SVE path needs 32
    label: str = ""  # where it came from: "llama.cpp build", "/proc/cpuinfo", a preset name

    def has(self, name: str) -> bool:
        return name in self.features

    @property
    def family(self) -> str:
        """One short name per repack behaviour: x86-avx2, x86-avx512, arm, arm-dotprod, arm-i8mm."""
        if self.arch in ("x86_64", "AMD64", "i686"):
            return "x86-avx512" if self.has("AVX512") else "x86-avx2" if self.has("AVX2") else "x86"
        if self.has("NEON"):
            return "arm-i8mm" if self.has("MATMUL_INT8") else "arm-dotprod" if self.has("DOTPROD") else "arm"
        return self.arch

    @classmethod
    def from_system_info(cls, text: str, arch: str | None = None) -> CpuFeatures:
        """From `llama_cpp.llama_print_system_info()`: 'CPU : AVX2 = 1 | SVE_CNT = 32 | …'."""
        sve = 0
        for part in text.replace("\n", "|").split("|"):
            name, eq, val = part.rpartition("=")
            if eq and name.rsplit(":", 1)[-1].strip() == "SVE_CNT" and val.strip().isdigit():
                sve = int(val.strip())
        return cls(arch or platform.machine(), frozenset(parse_features(text)), sve, "llama.cpp build")

    @classmethod
    def from_cpu_flags(cls, flags: set[str], arch: str) -> CpuFeatures:
        """From /proc/cpuinfo's flags (x86) or Features (ARM), assuming a native build."""
        feats = {_FEATURE_FOR_FLAG[f] for f in flags if f in _FEATURE_FOR_FLAG}
        if arch == "aarch64":
            feats.add("NEON")  # every AArch64 core has Advanced SIMD
        return cls(arch, frozenset(feats), 0, "/proc/cpuinfo")

    @classmethod
    def detect(cls) -> CpuFeatures:
        """This machine: the loaded llama.cpp's build flags, else /proc/cpuinfo."""
        try:
            import llama_cpp

            return cls.from_system_info(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))
        except Exception:  # no llama.cpp here (e.g. a planning machine): trust the CPU
            root = os.environ.get("EDGE_SYSFS_ROOT", "/")
            return cls.from_cpu_flags(cpu_flags(root), platform.machine())


def _preset(label: str, arch: str, *feats: str, sve: int = 0) -> CpuFeatures:
    return CpuFeatures(arch, frozenset(feats), sve, label)


# Device families, as native llama.cpp builds see them.
PRESETS: dict[str, CpuFeatures] = {p.label: p for p in (
    _preset("x86-avx2", "x86_64", "AVX", "AVX2", "F16C", "FMA"),
    _preset("x86-avx512", "x86_64", "AVX", "AVX2", "F16C", "FMA", "AVX512"),
    _preset("pi4", "aarch64", "NEON", "ARM_FMA"),  # Cortex-A72: ARMv8.0, no dot product
    _preset("pi5", "aarch64", "NEON", "ARM_FMA", "FP16_VA", "DOTPROD"),  # Cortex-A76
    _preset("arm-i8mm", "aarch64", "NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8"),
)}


def repack_layout(qtype: str, rows: int, cpu: CpuFeatures) -> str | None:
    """The interleaved layout llama.cpp gives a 2-D matmul weight of `qtype` with `rows`
    output rows (ne[1]) on `cpu`, e.g. "Q4_0 8x8", "AMX"; None when it stays as mapped."""
    if cpu.has("AMX_INT8") and qtype in _AMX_TYPES:
        return "AMX"  # first in the extra buffer list, so it wins over the repack
    avx2, avx512 = cpu.has("AVX2"), cpu.has("AVX512")
    neon, dot, i8mm = cpu.has("NEON"), cpu.has("DOTPROD"), cpu.has("MATMUL_INT8")
    sve256 = cpu.has("SVE") and i8mm and cpu.sve_bytes == 32
    # (condition, rows multiple, layout) in repack.cpp's order: the first that holds wins.
    rules: dict[str, list[tuple[bool, int, str]]] = {
        "Q4_0": [(avx2 or sve256, 8, "8x8"), (neon and i8mm, 4, "4x8"), (neon and dot, 4, "4x4")],
        "Q4_K": [(avx2, 8, "8x8"), (neon and i8mm, 8, "8x8"), (neon and dot, 8, "8x4")],
        "Q2_K": [(avx512, 8, "8x8")],
        "Q5_K": [(neon and i8mm, 8, "8x8"), (neon and dot, 8, "8x4")],
        "Q6_K": [(neon and i8mm, 8, "8x8"), (neon and dot, 8, "8x4")],
        "IQ4_NL": [(avx2, 8, "8x8"), (neon and dot, 4, "4x4")],
        "MXFP4": [(avx2, 8, "8x8"), (neon and dot, 4, "4x4")],
        "Q8_0": [(neon and i8mm, 4, "4x8"), (neon and dot, 4, "4x4")],
        "Q1_0": [(neon and i8mm, 4, "4x8"), (neon and dot, 4, "4x4")],
    }
    for ok, multiple, layout in rules.get(qtype, []):
        if ok and rows % multiple == 0:
            return f"{qtype} {layout}"
    return None


def repacked_types(cpu: CpuFeatures) -> list[str]:
    """Weight types this CPU repacks (for a tensor whose rows divide evenly)."""
    types = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q2_K", "IQ4_NL", "IQ4_XS", "MXFP4", "Q1_0")
    return [t for t in types if repack_layout(t, 4096, cpu)]
