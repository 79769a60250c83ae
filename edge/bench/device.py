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


def _cpu_model() -> str | None:
    text = _read("proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == key and v.strip():
                return v.strip()
    return platform.processor() or None


def _ram_bytes() -> int | None:
    for line in (_read("proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def _cores() -> int:
    text = _read("proc/cpuinfo") or ""
    n = sum(1 for line in text.splitlines() if line.split(":")[0].strip() == "processor")
    return n or os.cpu_count() or 1


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


def _throttled_raw() -> int | None:
    # Tests (and boards without vcgencmd) can provide the value as a file.
    text = _read("sys/devices/platform/soc/soc:firmware/get_throttled")
    if text is None and sysfs_root() == Path("/") and shutil.which("vcgencmd"):
        try:
            out = subprocess.run(
                ["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5
            ).stdout
            text = out.strip().partition("=")[2]
        except (OSError, subprocess.SubprocessError):
            return None
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_state() -> DeviceState:
    freq = _read("sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    raw = _throttled_raw()
    return DeviceState(
        temp_c=_soc_temp_c(),
        freq_mhz=int(freq) / 1000.0 if freq and freq.isdigit() else None,
        governor=_read("sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        throttled_raw=raw,
        throttled=decode_throttled(raw) if raw is not None else None,
    )
