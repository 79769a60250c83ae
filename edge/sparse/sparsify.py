"""`edge sparsify` as a library call: calibrate, search an allocation, write the profile."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edge.engine.model import Engine
from edge.errors import OutputExistsError, SparseProfileError
from edge.sparse.calibrate import calibrate, write_imatrix
from edge.sparse.profile import SparseProfile, build_specs, model_sparsity, validate_sparsity
from edge.sparse.search import ALPHAS, Objective, search, uniform

METHODS = ("greedy", "evolutionary", "uniform")
Progress = Callable[[str, int, int], None]


@dataclass
class SparsifyResult:
    profile: str
    target: float
    sparsity: float
    search: str
    kl: float  # KL(dense ‖ sparse) of the chosen allocation on the calibration halves
    uniform_kl: float  # the same for uniform TEAL-style α = 1 at the same sparsity
    n_lowrank_modules: int
    calib_tokens: int
    n_evals: int
    seconds: float
    imatrix: str | None = None
    rows: dict | None = None  # edge.sparse.qrows.QRowsResult of --weights q8|q4

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SparseProfileError(f"cannot read the calibration text {path} ({e.strerror})") from None


def sparsify(model: str | os.PathLike[str] | Engine, *, sparsity: float, calib: str | os.PathLike[str],
             out: str | os.PathLike[str], method: str = "greedy", budget_minutes: float = 5.0,
             alpha: float = 1.0, lowrank: bool = True, groups: int = 1, max_calib_tokens: int = 1024,
             imatrix: str | os.PathLike[str] | None = None, force: bool = False,
             weights: str | None = None, progress: Progress | None = None) -> SparsifyResult:
    """Calibrate MODEL on `calib`, search a per-module allocation at `sparsity`, save it to `out`.

    `alpha` is used by the uniform method (1 = TEAL-style); greedy and evolutionary choose
    α per unit among (1, 0.8) — or α = 1 only with lowrank=False, which needs no SVD.
    `weights` (q8 | q4) also builds the quantized rows the profile then runs on
    (edge.sparse.qrows, cached under EDGE_CACHE) and names the format in the profile.
    """
    validate_sparsity(sparsity)
    if weights is not None:
        from edge.sparse.qformat import row_format

        row_format(weights)  # an unknown format fails before any work
    if method not in METHODS:
        raise SparseProfileError(f"--search {method!r} is unknown; use one of {', '.join(METHODS)}")
    if not 0.0 <= alpha <= 1.0:
        raise SparseProfileError(f"--alpha {alpha} is outside [0, 1]; 1 is TEAL-style, 0.8 keeps a fifth in low rank")
    for p in (out, imatrix):
        if p is not None and Path(p).exists() and not force:
            raise OutputExistsError(f"{p} exists; pass --force to overwrite it")
    text = read_text(calib)
    t0 = time.perf_counter()
    engine = model if isinstance(model, Engine) else Engine.from_gguf(_resolve(model))

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda d, n: progress(name, d, n)) if progress else None

    cal = calibrate(engine, text, max_tokens=max_calib_tokens, progress=stage("calibrating"))
    alphas = ALPHAS if (lowrank and method != "uniform") else (alpha,)
    svd = None
    if any(a < 1 for a in alphas):
        from edge.sparse.svd import SvdCache

        svd = SvdCache.load_or_build(engine, progress=stage("SVD (once per model)"))
    obj = Objective(engine, cal, svd)
    res = search(engine, cal, sparsity, method=method, svd=svd, groups=groups,
                 budget_minutes=budget_minutes, alphas=alphas, objective=obj, progress=stage("searching"))
    base = res.kl if method == "uniform" and alpha == 1.0 else obj(uniform(engine, sparsity, 1.0))
    specs = build_specs(engine, cal, res.alloc)
    prof = SparseProfile(
        model_fingerprint=engine.info.fingerprint, model_name=engine.info.name,
        calib_sha256=cal.text_sha256, calib_tokens=len(cal.tokens), target_sparsity=sparsity,
        sparsity=round(model_sparsity(engine, res.alloc), 4), search=method, kl=res.kl,
        modules=specs, extra={"uniform_teal_kl": base, "groups": groups, "n_evals": res.n_evals,
                              **({"weights": weights} if weights else {})},
    )
    prof.save(out)
    rows = None
    if weights is not None:
        from edge.sparse.qrows import build_qrows

        rows = build_qrows(engine.path, out, weights=weights, progress=progress).to_dict()
    if imatrix is not None:
        write_imatrix(cal, engine, imatrix, dataset=str(calib))
    result = SparsifyResult(
        profile=str(out), target=sparsity, sparsity=prof.sparsity, search=method, kl=res.kl,
        uniform_kl=base, n_lowrank_modules=sum(m.r > 0 for m in specs), calib_tokens=len(cal.tokens),
        n_evals=res.n_evals + 1, seconds=time.perf_counter() - t0,
        imatrix=str(imatrix) if imatrix is not None else None, rows=rows)
    from edge import telemetry

    metrics = {k: v for k, v in result.to_dict().items() if k != "rows"}
    telemetry.log("sparsity", {**metrics, "weights": weights, "calib": str(calib)}, model=engine.info,
                  config={"sparse_profile": str(out)})
    return result


def _resolve(model: str | os.PathLike[str]) -> Path:
    from edge.catalog import resolve_model

    return resolve_model(str(model) if model else None)
