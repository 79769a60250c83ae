"""Memory model of a llama.cpp session (estimate) and the fit checks built on it (fit)."""

from edge.memory.cpu import PRESETS, CpuFeatures, repack_layout
from edge.memory.estimate import MemoryEstimate, SessionParams, estimate
from edge.memory.fit import FitVerdict, MemorySnapshot, fit, largest_context

__all__ = ["PRESETS", "CpuFeatures", "FitVerdict", "MemoryEstimate", "MemorySnapshot", "SessionParams",
           "estimate", "fit", "largest_context", "repack_layout"]
