"""Sparsity profiles: the per-module allocation, tied to one model file and one calibration.

A profile is JSON: per module s, α, k, r, t; the model's fingerprint (sha256 of its first
16 MiB + size) and the calibration text's sha256. Loading checks the model before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.engine.model import Engine
from edge.errors import SparseProfileError
from edge.paths import atomic_write
from edge.sparse.calibrate import Calibration
from edge.sparse.rsparse import ModuleSpec, budget

FORMAT = "edge-sparse-profile/1"
Allocation = dict[tuple[int, str], tuple[float, float]]  # (layer, module) -> (s, α)


def validate_sparsity(s: float) -> None:
    if not 0.0 <= s <= 0.95:
        raise SparseProfileError(f"--sparsity {s} is outside [0, 0.95]; use e.g. 0.5 for 50%")


def module_size(engine: Engine, layer: int, name: str) -> int:
    return int(engine.weights.layers[layer].wt[name].size)


def model_sparsity(engine: Engine, alloc: Allocation) -> float:
    """Fraction of all projection weight reads skipped, weighted by module size."""
    total = sum(module_size(engine, il, n) for il, n in alloc)
    return sum(s * module_size(engine, il, n) for (il, n), (s, _) in alloc.items()) / total


def build_specs(engine: Engine, cal: Calibration, alloc: Allocation) -> list[ModuleSpec]:
    from edge.sparse.svd import max_rank

    specs = []
    for (il, n), (s, alpha) in sorted(alloc.items()):
        n_in, n_out = engine.weights.layers[il].wt[n].shape
        if s <= 0:
            specs.append(ModuleSpec(il, n, 0.0, 1.0, n_in, 0, -1.0))
            continue
        k, r = budget(n_in, n_out, s, alpha)
        r = min(r, max_rank(n_in, n_out))
        specs.append(ModuleSpec(il, n, float(s), float(alpha), k, r, cal.threshold(il, n, k / n_in)))
    return specs


@dataclass
class SparseProfile:
    model_fingerprint: str
    model_name: str | None
    calib_sha256: str
    calib_tokens: int
    target_sparsity: float
    sparsity: float  # achieved, module-size weighted
    search: str
    kl: float | None  # KL(dense ‖ sparse) on the calibration's scored halves
    modules: list[ModuleSpec] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> str | None:
        """The quantized rows format (q8 | q4) `edge sparsify --weights` built for this
        profile; None: the f32 engine runs it."""
        w = self.extra.get("weights")
        return str(w) if w else None

    @property
    def needs_svd(self) -> bool:
        return any(m.r > 0 for m in self.modules)

    def save(self, path: str | os.PathLike[str]) -> None:
        d = asdict(self)
        d["format"] = FORMAT
        with atomic_write(path, "w") as f:
            json.dump(d, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str], engine: Engine | None = None) -> SparseProfile:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            if d.pop("format", None) != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            d["modules"] = [ModuleSpec(**m) for m in d["modules"]]
            prof = cls(**d)
        except FileNotFoundError:
            raise SparseProfileError(f"no sparsity profile at {p}; make one with `edge sparsify`") from None
        except (ValueError, TypeError, KeyError) as e:
            raise SparseProfileError(f"{p} is not a valid sparsity profile ({e}); re-create it with `edge sparsify`") from None
        if engine is not None:
            prof.check(engine, p)
        return prof

    def check_fingerprint(self, fingerprint: str, path: Path | str = "profile") -> None:
        if self.model_fingerprint != fingerprint:
            raise SparseProfileError(
                f"{path} was made for another model (sha {self.model_fingerprint[:12]}…, this model "
                f"is {fingerprint[:12]}…); run `edge sparsify` on this model")

    def check(self, engine: Engine, path: Path | str = "profile") -> None:
        self.check_fingerprint(engine.info.fingerprint, path)
        a = engine.config
        for m in self.modules:
            if not (0 <= m.layer < a.n_layers) or m.name not in engine.weights.layers[0].wt:
                raise SparseProfileError(f"{path} names module {m.layer}.{m.name}, which this model lacks")
