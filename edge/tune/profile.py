"""Device profiles: what `edge tune` chose, under $EDGE_HOME/tune/, keyed by device and model.

run, chat, serve and bench look the profile up by the fingerprint of the MODEL they were
given; the profile names the file to load (a quantized copy in the cache, or the model
itself) and the settings. Settings the user gave explicitly win over the profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge.device import probe_device
from edge.gguf_file import inspect
from edge.paths import atomic_write, edge_home
from edge.tune.space import Candidate

VERSION = 1


def device_key() -> str:
    """Readable and unique enough: board or CPU, cores, RAM (GiB), and a short hash."""
    d = probe_device()
    name = d.board or d.cpu or "device"
    gib = round((d.ram_bytes or 0) / (1 << 30))
    ident = f"{d.board}|{d.cpu}|{d.cores}|{gib}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    return f"{slug}-{d.cores}c-{gib}g-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def profile_path(fingerprint: str, device: str | None = None) -> Path:
    return edge_home() / "tune" / (device or device_key()) / f"{fingerprint[:16]}.json"


@dataclass
class DeviceProfile:
    model: str  # the MODEL tuned (path)
    fingerprint: str
    device: str
    objective: str
    max_kld: float
    n_ctx: int
    winner: dict[str, Any]  # Candidate fields + "path" (file to load) + measured figures
    defaults: dict[str, Any]  # the untuned configuration, measured in the same final round
    runners_up: dict[str, dict[str, Any]] = field(default_factory=dict)  # objective → entry
    frontier: list[dict[str, Any]] = field(default_factory=list)  # speed vs KL, memory
    created: str = ""
    version: int = VERSION

    @property
    def candidate(self) -> Candidate:
        return Candidate.from_dict(self.winner)

    @property
    def path(self) -> Path:
        return Path(self.winner["path"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self) -> Path:
        path = profile_path(self.fingerprint, self.device)
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    def notice(self) -> str:
        """The one line run/chat/serve/bench print when they use it."""
        w = self.winner
        return (f"using the tuned profile ({self.candidate.describe()}; {w.get(self.objective, 0):.1f} "
                f"{'ms' if self.objective == 'ttft' else 't/s'} {self.objective}, KL {w.get('kld', 0):.3f}); "
                "--no-tune ignores it")


def find_profile(model: str | os.PathLike[str]) -> DeviceProfile | None:
    """This device's profile for the GGUF at `model`, if `edge tune` made one and the file
    it names still exists."""
    path = profile_path(inspect(model).fingerprint)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        prof = DeviceProfile(**d)
    except (OSError, ValueError, TypeError):
        return None  # an unreadable profile is ignored; `edge tune` writes a new one
    return prof if prof.version == VERSION and prof.path.is_file() else None


def apply_profile(model: str | os.PathLike[str], config: Any) -> tuple[Path, Any, DeviceProfile | None]:
    """(file to load, RuntimeConfig with the profile's settings, the profile) — settings the
    caller changed from RuntimeConfig's defaults are kept."""
    prof = find_profile(model)
    if prof is None:
        return Path(model), config, None
    c = prof.candidate
    base = type(config)()
    chosen = {"threads": c.threads, "n_batch": c.n_batch, "n_ubatch": c.n_ubatch, "type_k": c.type_k,
              "type_v": c.type_v, "flash_attn": c.flash_attn, "repack": c.repack, "use_mmap": c.use_mmap,
              "use_mlock": c.use_mlock}
    keep = {k: v for k, v in chosen.items() if getattr(config, k) == getattr(base, k)}
    return prof.path, replace(config, **keep), prof
