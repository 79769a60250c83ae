"""Device probe: what board this is, and how hot and throttled it is right now.

Every path is read below a root (EDGE_SYSFS_ROOT, default "/") so tests can point the
probe at a fake /proc and /sys tree of a Pi 4, a Pi 5 or an x86 laptop.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def sysfs_root() -> Path:
    return Path(os.environ.get("EDGE_SYSFS_ROOT", "/"))


def _read(rel: str) -> str | None:
    try:
        return (sysfs_root() / rel).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


@dataclass(frozen=True)
class DeviceInfo:
    """Static facts: the `device` object of every telemetry record."""

    hostname: str
    board: str | None
    cpu: str | None
    cores: int
    ram_bytes: int | None
    os: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ARM "CPU part" numbers (implementer 0x41) of the cores found on Raspberry Pi boards and
# similar SBCs; 64-bit Pi kernels print no "model name", only this number.
ARM_CORES = {
    "0xb76": "ARM1176", "0xc07": "Cortex-A7", "0xd03": "Cortex-A53", "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73",
    "0xd0b": "Cortex-A76",
}


def _on_real_root() -> bool:
    # Host fallbacks (platform, vcgencmd, os.cpu_count) would leak the test machine's
    # facts into a fake tree, so they apply only when reading the real /.
    return sysfs_root() == Path("/")


def _cpuinfo_fields() -> list[tuple[str, str]]:
    out = []
    for line in (_read("proc/cpuinfo") or "").splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip():
            out.append((k.strip(), v.strip()))
    return out


def _cpu_model() -> str | None:
    fields = _cpuinfo_fields()
    first = {}
    for k, v in fields:
        first.setdefault(k, v)
    part = first.get("CPU part", "").lower()
    if first.get("CPU implementer", "").lower() == "0x41" and part in ARM_CORES:
        return f"ARM {ARM_CORES[part]}"
    for key in ("model name", "cpu model", "Hardware"):
        if first.get(key):
            return first[key]
    return (platform.processor() or None) if _on_real_root() else None


def meminfo(key: str) -> int | None:
    """A /proc/meminfo figure in bytes (e.g. "MemTotal", "MemAvailable"), or None."""
    for line in (_read("proc/meminfo") or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == f"{key}:" and parts[1].isdigit():
            return int(parts[1]) * 1024
    return None


def _ram_bytes() -> int | None:
    return meminfo("MemTotal")


def _cores() -> int:
    n = sum(1 for k, _ in _cpuinfo_fields() if k == "processor")
    return n or (os.cpu_count() if _on_real_root() else None) or 1


def probe_device() -> DeviceInfo:
    return DeviceInfo(
        hostname=socket.gethostname(),
        board=_read("proc/device-tree/model") or None,
        cpu=_cpu_model(),
        cores=_cores(),
        ram_bytes=_ram_bytes(),
        os=f"{platform.system()} {platform.release()}",
    )


# vcgencmd get_throttled bits (Raspberry Pi firmware documentation).
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temp_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}


def decode_throttled(value: int) -> dict[str, bool]:
    return {name: bool(value >> bit & 1) for bit, name in THROTTLE_BITS.items()}


def _vcgencmd() -> str | None:
    # EDGE_VCGENCMD names a stand-in (tests); otherwise only on the real root.
    exe = os.environ.get("EDGE_VCGENCMD") or ("vcgencmd" if _on_real_root() else None)
    return shutil.which(exe) if exe else None


def parse_throttled(text: str | None) -> int | None:
    """'0x50005', 'throttled=0x50005' or '327685' → int; anything else → None."""
    if not text:
        return None
    value = text.strip().rpartition("=")[2].strip()
    try:
        return int(value, 0)
    except ValueError:
        return None


def _throttled_raw() -> int | None:
    # Recent Pi kernels expose the firmware's flags as a file; older ones need vcgencmd.
    text = _read("sys/devices/platform/soc/soc:firmware/get_throttled")
    exe = _vcgencmd() if text is None else None
    if exe:
        try:
            text = subprocess.run([exe, "get_throttled"], capture_output=True, text=True,
                                  timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return parse_throttled(text)


def _soc_temp_c() -> float | None:
    base = sysfs_root() / "sys/class/thermal"
    zones = sorted(base.glob("thermal_zone*")) if base.is_dir() else []
    # Prefer the SoC/CPU zone by type; fall back to the first readable zone.
    preferred = [z for z in zones if (_read(str(z.relative_to(sysfs_root()) / "type")) or "")
                 .lower().startswith(("cpu", "soc", "x86_pkg", "bcm2"))]
    for zone in preferred + zones:
        raw = _read(str(zone.relative_to(sysfs_root()) / "temp"))
        if raw and raw.lstrip("-").isdigit():
            return int(raw) / 1000.0
    return None


@dataclass(frozen=True)
class DeviceState:
    """Dynamic readings taken before and after each benchmark test."""

    temp_c: float | None
    freq_mhz: float | None
    governor: str | None
    throttled_raw: int | None
    throttled: dict[str, bool] | None
    freq_max_mhz: float | None = None  # scaling_max_freq: below the hardware max = capped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _khz_to_mhz(rel: str) -> float | None:
    text = _read(rel)
    return int(text) / 1000.0 if text and text.isdigit() else None


def probe_state() -> DeviceState:
    cpufreq = "sys/devices/system/cpu/cpu0/cpufreq/"
    raw = _throttled_raw()
    return DeviceState(
        temp_c=_soc_temp_c(),
        freq_mhz=_khz_to_mhz(cpufreq + "scaling_cur_freq"),
        governor=_read(cpufreq + "scaling_governor") or None,
        throttled_raw=raw,
        throttled=decode_throttled(raw) if raw is not None else None,
        freq_max_mhz=_khz_to_mhz(cpufreq + "scaling_max_freq"),
    )
