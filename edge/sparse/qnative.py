"""The C decode kernels (qkernels.c): built at first use with the system compiler, cached.

Why C beside numba: on the bundled model the numba path costs ~100 MB more resident memory
(llvmlite's library and the JIT's code: peak RSS 1.55× llama.cpp's against ~1.0×), takes
tens of seconds to compile on first use (minutes on a Pi), and cannot be told to prefetch.
The C file is portable C11 + OpenMP without intrinsics; the compiler vectorizes it for the
machine it runs on (-march=native, or -mcpu=native where GCC wants that, e.g. on a Pi).

Where it is built: cache_dir()/kernels/qkernels-<key>.so, the key hashing the source, the
compiler's version, the flags and this CPU's feature list, so a cache shared between two
machines never loads code built for the other's instruction set. The file is compiled to
a temporary name and renamed (atomic). No compiler, or a failed build: `library()` returns
None with the reason in `BUILD_ERROR`, and the engine uses the numba kernels (same results,
same tests). EDGE_QKERNELS=numba forces that path; =c fails loudly instead of falling back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import POINTER, c_float, c_int, c_int64, c_void_p
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import EdgeError
from edge.paths import cache_dir

SOURCE = Path(__file__).with_name("qkernels.c")
# Reassociation lets the compiler vectorize the sums; no reciprocal math, no FMA contraction
# (-std=c11 keeps it off): the row quantizer must round exactly as qformat's numpy does.
BASE_FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
              "-fno-signed-zeros", "-fno-strict-aliasing", "-fPIC", "-shared"]
ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])  # first that compiles wins
BUILD_ERROR: str | None = None
_LIB: Any = None
_TRIED = False


class KernelBuildError(EdgeError):
    """EDGE_QKERNELS=c was asked for but the C kernels could not be built."""


class Model(ctypes.Structure):
    _fields_ = [(n, c_void_p) for n in ("base", "mats", "lbase", "lmats", "lin", "norms", "glob",
                                         "thr", "lr", "ranks")] + \
               [(n, c_int64) for n in ("n_layers", "n_embd", "n_head", "n_head_kv", "head_dim",
                                        "n_rot", "n_ff", "n_vocab")] + [("eps", c_float)]


class KV(ctypes.Structure):
    _fields_ = [("cos", c_void_p), ("sin", c_void_p), ("k", c_void_p), ("v", c_void_p), ("n_ctx", c_int64)]


class Workspace(ctypes.Structure):
    _fields_ = [(n, c_void_p) for n in ("x", "h", "xs", "outs", "zs", "att", "scores", "acc", "coef",
                                         "acts", "inacts", "iota")] + \
               [(n, c_int64) for n in ("max_in", "max_out", "max_r", "max_nb")]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, out: Path) -> None:
    errors = []
    for omp in (["-fopenmp"], []):  # without OpenMP the decode runs on one thread
        for arch in ARCH_FLAGS:
            fd, tmp = tempfile.mkstemp(prefix=".qkernels.", suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = [cc, *BASE_FLAGS, *arch, *omp, "-o", tmp, str(SOURCE), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp, out)
                return
            os.unlink(tmp)
            errors.append(f"{' '.join(cmd)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    raise OSError("; ".join(errors[-2:]))


def library(required: bool = False) -> Any:
    """The loaded C kernels, or None (numba fallback; the reason is in BUILD_ERROR).
    `required` (or EDGE_QKERNELS=c) raises KernelBuildError instead of returning None."""
    global _LIB, _TRIED, BUILD_ERROR
    want = "c" if required else os.environ.get("EDGE_QKERNELS", "auto")
    if want == "numba":
        return None
    if _TRIED:
        if _LIB is None and want == "c":
            raise KernelBuildError(f"the C kernels could not be built ({BUILD_ERROR}); install a C compiler "
                                   "or unset EDGE_QKERNELS to use the numba kernels")
        return _LIB
    _TRIED = True
    cc = _compiler()
    try:
        if cc is None:
            raise OSError("no C compiler found (cc, gcc or clang); set CC")
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        flags = " ".join(BASE_FLAGS + [" ".join(f) for f in ARCH_FLAGS])
        key = hashlib.sha256(b"|".join([SOURCE.read_bytes(), version.encode(), flags.encode(),
                                        platform.machine().encode(), _cpu_features().encode()])).hexdigest()[:16]
        path = cache_dir() / "kernels" / f"qkernels-{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        BUILD_ERROR = str(e)
        return library(required) if want == "c" else None
    lib.edge_decode.argtypes = [POINTER(Model), POINTER(KV), POINTER(Workspace), c_int64, c_int64,
                                c_void_p, c_void_p, c_int]
    lib.edge_decode.restype = c_int
    lib.edge_dequant.argtypes = [c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int64, c_void_p]
    lib.edge_dequant.restype = None
    lib.edge_accum.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_void_p,
                               c_int64, c_int64, c_void_p]
    lib.edge_accum.restype = None
    lib.edge_quantize.argtypes = [c_void_p, c_int64, c_int64, c_int64, c_int64, c_int, c_int64, c_int64,
                                  c_int64, c_void_p, c_void_p, c_void_p, c_int]
    lib.edge_quantize.restype = None
    lib.edge_openmp.restype = c_int
    _LIB = lib
    return lib


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class CDecoder:
    """The C decode step bound to one engine's tables (the arrays stay referenced here)."""

    def __init__(self, lib: Any, engine: Any) -> None:
        self.lib, self.e = lib, engine
        st, lrs = engine.store, engine.lowrank or engine.store
        a = engine.config
        self.model = Model(ptr(st.u8), ptr(st.mats), ptr(lrs.u8), ptr(lrs.mats), ptr(engine.lin),
                           ptr(engine.norms), ptr(engine.glob), ptr(engine.thr), ptr(engine.lr),
                           ptr(engine.ranks), a.n_layers, a.n_embd, a.n_head, a.n_head_kv, a.head_dim,
                           int(engine.hp[5]), a.n_ff, a.n_vocab, a.rms_eps)
        self._key: tuple[int, int] | None = None

    def workspace(self, P: int, n_ctx: int) -> tuple[Workspace, list[np.ndarray]]:
        e = self.e
        mats = e.store.mats
        lm = (e.lowrank or e.store).mats
        max_in = int(mats[:, 1].max())
        max_out = int(max(mats[e.lin.ravel(), 2].max(), e.config.n_embd))
        max_r = int(max(32, lm[:, 2].max()))
        max_nb = int(max(mats[:, 6].max(), lm[:, 6].max()))
        f32 = np.float32
        arrs = [np.zeros(e.config.n_embd, f32), np.zeros(e.config.n_embd, f32), np.zeros(3 * max_in, f32),
                np.zeros(3 * max_out, f32), np.zeros(3 * max_r, f32), np.zeros(e.config.n_embd, f32),
                np.zeros(P * n_ctx, f32), np.zeros(P * 3 * max_out, f32), np.zeros((P + 1) * 4 * max_nb, f32),
                np.zeros(3 * max_in, np.int32), np.zeros(3 * max_in, np.int32), np.arange(max_r, dtype=np.int32)]
        ws = Workspace(*[ptr(x) for x in arrs], max_in, max_out, max_r, max_nb)
        return ws, arrs

    def decode(self, token: int, cache: Any, logits: np.ndarray, P: int) -> None:
        key = (P, cache.n_ctx)
        if self._key is None or key[0] != self._key[0] or key[1] > self._key[1]:
            self.ws, self._keep = self.workspace(P, max(key[1], self._key[1] if self._key else 0))
            self._key = (P, max(key[1], self._key[1] if self._key else 0))
        kv = getattr(cache, "_ckv", None)
        if kv is None:
            kv = cache._ckv = KV(ptr(cache.cos), ptr(cache.sin), ptr(cache.k), ptr(cache.v), cache.n_ctx)
        self.lib.edge_decode(ctypes.byref(self.model), ctypes.byref(kv), ctypes.byref(self.ws), token,
                             cache.n_past, ptr(logits), ptr(self.e.counts), P)
