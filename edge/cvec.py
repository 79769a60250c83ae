"""llama.cpp control-vector GGUF files: write, read back, check against a model, apply.

The format is the one llama.cpp's cvector-generator writes and `--control-vector` reads:
`general.architecture = controlvector`, `controlvector.model_hint`,
`controlvector.layer_count` (number of direction tensors), and one 1-D F32 tensor
`direction.N` per layer N ≥ 1, added to the residual stream after layer N. A vector
written by the feedback loop already holds direction × coefficient, so scale 1.0 applies
exactly the correction the loop chose; its coefficients are kept as metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import InvalidModelFileError
from edge.paths import atomic_path

ARCH = "controlvector"
KEY_HINT = f"{ARCH}.model_hint"
KEY_LAYERS = f"{ARCH}.layer_count"
KEY_COEFS = "edge.correction.coefficients"  # ignored by llama.cpp; read back by edge
KEY_SOURCE = "edge.correction.source"


@dataclass
class ControlVector:
    directions: dict[int, np.ndarray]  # layer N ≥ 1 → (n_embd,) float32
    model_hint: str = ""
    layer_count: int = 0
    coefficients: list[float] = field(default_factory=list)
    source: str = ""
    path: str = ""

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values()))) if self.directions else 0

    def matrix(self, n_layers: int, n_embd: int) -> np.ndarray:
        """(n_layers, n_embd), row 0 zero, for Runtime.set_control_vector; checks the fit."""
        name = self.path or "the control vector"
        if self.n_embd != n_embd:
            raise InvalidModelFileError(
                f"{name} has n_embd {self.n_embd} but the model has {n_embd}; "
                "use a vector made for this model")
        top = max(self.directions, default=0)
        if top >= n_layers or (self.layer_count and self.layer_count != n_layers - 1):
            raise InvalidModelFileError(
                f"{name} was made for a model with {max(top, self.layer_count) + 1} layers but this "
                f"model has {n_layers}; use a vector made for this model")
        m = np.zeros((n_layers, n_embd), dtype=np.float32)
        for layer, v in self.directions.items():
            m[layer] += v
        return m


def write(path: str | os.PathLike[str], directions: np.ndarray, *, model_hint: str = "llama",
          coefficients: np.ndarray | None = None, source: str = "") -> Path:
    """Write rows 1.. of `directions` (n_layers, n_embd) as a control-vector GGUF, atomically."""
    import gguf

    d = np.asarray(directions, dtype=np.float32)
    if d.ndim != 2 or d.shape[0] < 2:
        raise ValueError(f"directions must be (n_layers ≥ 2, n_embd), got {d.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_string(KEY_HINT, model_hint)
        w.add_int32(KEY_LAYERS, d.shape[0] - 1)
        if coefficients is not None:
            w.add_array(KEY_COEFS, [float(c) for c in np.asarray(coefficients).ravel()])
        if source:
            w.add_string(KEY_SOURCE, source)
        for layer in range(1, d.shape[0]):
            w.add_tensor(f"direction.{layer}", np.ascontiguousarray(d[layer]))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read(path: str | os.PathLike[str]) -> ControlVector:
    """Read a control-vector GGUF with the checks llama.cpp's loader makes."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise InvalidModelFileError(f"control vector {p} not found; check the path")
    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # GGUFReader raises ValueError/struct errors on bad files
        raise InvalidModelFileError(f"{p} is not a readable GGUF ({e}); pass a control-vector .gguf") from None
    arch = _field(r, "general.architecture")
    if arch != ARCH:
        # a corrected model from `edge bias mitigate` (learn, ablate, ...) is a whole model, not a vector
        raise InvalidModelFileError(f"{p} is a {arch!r} model GGUF, not a control vector: pass it as the MODEL "
                                    "argument instead of --correction")
    dirs: dict[int, np.ndarray] = {}
    for t in r.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit() or int(idx) == 0:
            raise InvalidModelFileError(f"{p}: tensor {t.name!r} is not direction.N with N ≥ 1")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise InvalidModelFileError(f"{p}: {t.name} must be a 1-D F32 tensor")
        dirs[int(idx)] = dirs.get(int(idx), 0) + np.array(t.data, dtype=np.float32)
    if not dirs:
        raise InvalidModelFileError(f"{p} holds no direction tensors")
    if len({len(v) for v in dirs.values()}) != 1:
        raise InvalidModelFileError(f"{p}: direction tensors differ in length")
    coefs = _field(r, KEY_COEFS)
    return ControlVector(dirs, str(_field(r, KEY_HINT) or ""), int(_field(r, KEY_LAYERS) or 0),
                         [float(c) for c in coefs] if coefs is not None else [],
                         str(_field(r, KEY_SOURCE) or ""), str(p))


def load_correction(session: Any, path: str | os.PathLike[str], scale: float = 1.0) -> ControlVector:
    """Read `path` and apply it to a session (edge.runtime.Runtime) at `scale`; the session
    then records it in its telemetry config (edge run / chat / serve / bias audit)."""
    cv = read(path)
    info = session.info
    session.set_control_vector(cv.matrix(info.n_layers or 0, info.n_embd or 0), scale)
    session.correction = {"correction": str(path), "correction_scale": scale}
    return cv
