"""llama.cpp's CPU arithmetic on a quantized GGUF, reproduced in torch.

A quantized file does not compute what its weights say: before every matrix product with a
quantized weight, ggml quantizes the activation rows to the weight's `vec_dot_type` (8 bits
in blocks: Q8_0 or Q8_1 for the 32-wide types, Q8_K for the 256-wide k-quants), and for
Q4_1/Q5_1 it adds each block's minimum times the activation block's sum *as stored in
fp16* (Q8_1's `s`). The KV cache is f16, and so are the query and the softmax weights that
meet it. On the bundled Q4_1 model this moves a token's log-probability by 0.11 nats (SD)
from the exact product of its dequantized weights, and a pair's difference by ~0.5 nats;
reproducing it matches llama.cpp's own products to float32 rounding (tests/test_arith.py).
The whole forward cannot be bit-exact (exp, rope and sums round differently), and the
rounding is chaotic: a sub-ulp change re-rolls a token's noise. Summed over a sentence pair,
though, ~3/4 of the noise's variance is systematic, shared with llama.cpp's own
(benchmarks/device_noise.py), so the reproduction predicts what a quantized file reads.
Measured on x86 (AVX2/AVX-512) builds; other CPUs quantize the activations the same way,
but an F16 weight's activations stay F32 on NEON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ggml's vec_dot_type per weight type (ggml-cpu.c's type_traits_cpu)
_Q8_0 = ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4")
_Q8_1 = ("Q4_1", "Q5_1")
_Q8_K = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
         "IQ1_S", "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0")


def import_torch() -> Any:
    import torch  # reached through bias.learn.TorchLlama, which has checked torch is there

    return torch


def _vec_dot(type_name: str) -> str:
    for kind, names in (("q8_0", _Q8_0), ("q8_1", _Q8_1), ("q8_k", _Q8_K)):
        if type_name in names:
            return kind
    if type_name in ("F16", "BF16", "F32"):
        return type_name.lower()
    raise ValueError(f"no llama.cpp CPU arithmetic known for {type_name} weights")


def quantize_rows(x: Any, kind: str) -> tuple[Any, Any]:
    """The activations x (..., K) as ggml's from_float for `kind` leaves them, dequantized,
    and for q8_1 each 32-block's stored sum minus the dequantized one, (..., K/32) (else None).
    Gradients pass straight through (the rounding has none of its own)."""
    torch = import_torch()
    if kind == "f32":
        return x, None
    if kind in ("f16", "bf16"):
        r = x.to(torch.float16 if kind == "f16" else torch.bfloat16).float()
        return x + (r - x).detach(), None
    blk = 256 if kind == "q8_k" else 32
    shape = x.shape
    if shape[-1] % blk:
        raise ValueError(f"rows of {shape[-1]} do not split into {kind} blocks of {blk}")
    xb = x.detach().reshape(*shape[:-1], shape[-1] // blk, blk)
    amax = xb.abs().amax(-1, keepdim=True)
    if kind == "q8_k":
        # scaled by the signed value of largest magnitude, d kept in float32
        mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        iscale = torch.where(amax > 0, -127 / mx, torch.zeros_like(mx))
        q = torch.round(xb * iscale).clamp(max=127)
        d = torch.where(amax > 0, 1 / iscale, torch.zeros_like(iscale))
        ds = None
    else:
        d32 = amax / 127
        q = torch.round(xb * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
        d = d32.half().float()  # block_q8_0/q8_1 store d in fp16
        qsum = q.sum(-1)
        ds = (d32[..., 0] * qsum).half().float() - d[..., 0] * qsum if kind == "q8_1" else None
    r = (q * d).reshape(shape)
    return x + (r - x).detach(), ds


@dataclass
class WeightArith:
    """How llama.cpp multiplies by one weight: its activations' format and, for Q4_1/Q5_1,
    the weight's block minima (K/32, out) that meet the activations' stored block sums."""

    kind: str
    mins: Any = None

    def __call__(self, x: Any, w: Any) -> Any:
        """x (..., K) times the dequantized weight w (K, out), as llama.cpp computes it."""
        xq, ds = quantize_rows(x, self.kind)
        y = xq @ w
        return y if ds is None or self.mins is None else y + ds @ self.mins


def _mins(t: Any) -> np.ndarray:
    """A Q4_1/Q5_1 tensor's block minima as (in/32, out) float32: each block begins with
    its fp16 scale d and minimum m."""
    rows = int(t.shape[1])
    raw = np.asarray(t.data).reshape(-1)
    per = raw.size // (rows * (int(t.shape[0]) // 32))
    m = raw.reshape(-1, per)[:, 2:4].copy().view(np.float16).astype(np.float32)
    return np.ascontiguousarray(m.reshape(rows, -1).T)


def file_arith(path: Path, names: dict[str, str]) -> dict[str, WeightArith]:
    """Each named weight's arithmetic in the GGUF at path; names maps a key to the tensor's name."""
    import gguf

    torch = import_torch()
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for key, name in names.items():
        t = tensors[name]
        kind = _vec_dot(t.tensor_type.name)
        mins = torch.from_numpy(_mins(t)) if kind == "q8_1" else None
        out[key] = WeightArith(kind, mins)
    return out


@dataclass
class DeviceSpread:
    """What llama.cpp's arithmetic does to a suite's pct, from two readings of the pairs in
    it whose bits differ (redraw). Of the noise it adds to a pair's difference (SD 0.67 nats
    on the bundled model), ~3/4 of the variance is systematic, the same in every reading and
    in llama.cpp's own (correlation 0.70-0.75); the rest is chaotic and re-rolls with any bit
    of the arithmetic (build, CPU, an edited tensor's re-quantization), so a file's pct is one
    draw around the expected one."""

    chaotic_sd: float  # nats, per pair difference: SD(d1 − d2)/√2
    pcts: list[float]  # each reading's pct
    mean: float  # the expected pct: the readings' mean
    sd: float  # the pct's SD between draws (pairs taken as independent)

    @classmethod
    def of(cls, readings: list[np.ndarray]) -> DeviceSpread:
        import math

        if len(readings) < 2:
            raise ValueError("the chaotic part of the noise needs two readings")
        d = np.asarray(readings, dtype=np.float64)
        sc = float(np.std(d[0] - d[1]) / math.sqrt(2))
        q = 0.5 * (1 + np.vectorize(math.erf)(d.mean(0) / max(sc, 1e-12) / math.sqrt(2)))  # P(reads "more")
        pcts = [float(100 * np.mean(x > 0)) for x in d]
        return cls(sc, pcts, float(np.mean(pcts)), float(100 * np.sqrt((q * (1 - q)).sum()) / d.shape[1]))


def redraw(m: Any, seed: int) -> None:
    """Another reading of TorchLlama `m`'s llama.cpp arithmetic: its embeddings times
    1 + 1e-7·N(0, 1), below float32's resolution of a weight and enough to re-roll which
    activations round which way (its kept rows are dropped)."""
    torch = import_torch()
    g = torch.Generator().manual_seed(seed)
    m.emb = m.emb * (1 + 1e-7 * torch.randn(m.emb.shape, generator=g))
    m._rows.clear()
