"""Device probe on fixture /proc and /sys trees: Pi 4, Pi 5, armv7l, x86-64, broken, empty."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edge.device import (
    THROTTLE_BITS,
    decode_throttled,
    parse_throttled,
    probe_device,
    probe_state,
)

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch):
    def use(name: str | Path) -> Path:
        path = FIXTURES / name if isinstance(name, str) else name
        monkeypatch.setenv("EDGE_SYSFS_ROOT", str(path))
        monkeypatch.delenv("EDGE_VCGENCMD", raising=False)
        return path

    return use


@pytest.mark.parametrize("tree, board, cpu, cores, ram_kib", [
    ("pi4", "Raspberry Pi 4 Model B Rev 1.4", "ARM Cortex-A72", 4, 3884332),
    ("pi5", "Raspberry Pi 5 Model B Rev 1.0", "ARM Cortex-A76", 4, 8245264),
    ("armv7l", "Raspberry Pi 2 Model B Rev 1.1", "ARM Cortex-A7", 4, 948304),
    ("x86", None, "Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz", 2, 16303848),
])
def test_probe_device_boards(root, tree, board, cpu, cores, ram_kib):
    root(tree)
    d = probe_device()
    assert d.board == board  # the device-tree string's trailing NUL is stripped
    assert d.cpu == cpu
    assert d.cores == cores
    assert d.ram_bytes == ram_kib * 1024


@pytest.mark.parametrize("tree, temp, freq, fmax, governor, raw", [
    ("pi4", 54.53, 1500.0, 1800.0, "ondemand", 0x50005),
    ("pi5", 61.85, 2400.0, 2400.0, "performance", 0),
    ("armv7l", 47.236, 900.0, None, "ondemand", None),
    # two zones: the x86_pkg_temp sensor wins over the ACPI zone listed first
    ("x86", 45.0, 3400.123, None, "powersave", None),
])
def test_probe_state_readings(root, tree, temp, freq, fmax, governor, raw):
    root(tree)
    s = probe_state()
    assert s.temp_c == pytest.approx(temp)
    assert s.freq_mhz == pytest.approx(freq)
    assert s.freq_max_mhz == (pytest.approx(fmax) if fmax else None)
    assert s.governor == governor
    assert s.throttled_raw == raw
    assert (s.throttled is None) == (raw is None)


def test_pi4_throttle_flags_now_and_since_boot(root):
    root("pi4")  # 0x50005: under-voltage and throttled, now and since boot
    t = probe_state().throttled
    assert t == {
        "under_voltage": True, "arm_frequency_capped": False, "throttled": True,
        "soft_temp_limit": False, "under_voltage_occurred": True,
        "arm_frequency_capped_occurred": False, "throttled_occurred": True,
        "soft_temp_limit_occurred": False,
    }
    root("pi5")  # 0x0: nothing
    assert probe_state().throttled is not None and not any(probe_state().throttled.values())


@pytest.mark.parametrize("bit, name", sorted(THROTTLE_BITS.items()))
def test_every_throttle_bit_decodes_alone(bit, name):
    flags = decode_throttled(1 << bit)
    assert [k for k, v in flags.items() if v] == [name]


def test_all_bits_and_unrelated_bits():
    assert all(decode_throttled(0xF000F).values())
    assert not any(decode_throttled(0xFFF0 | 0xFFF00000).values())  # bits the firmware does not define


@pytest.mark.parametrize("text, value", [
    ("0x50005", 0x50005), ("throttled=0x80008\n", 0x80008), ("327685", 327685), ("0x0", 0),
    ("throttled=", None), ("", None), (None, None), ("garbage", None),
])
def test_parse_throttled(text, value):
    assert parse_throttled(text) == value


@pytest.mark.parametrize("tree", ["broken", "empty"])
def test_missing_or_garbled_files_give_nulls(root, tree):
    root(tree)
    d, s = probe_device(), probe_state()
    assert (d.board, d.cpu, d.ram_bytes) == (None, None, None)
    assert d.cores == 1 and d.hostname
    assert s.to_dict() == {"temp_c": None, "freq_mhz": None, "governor": None, "throttled_raw": None,
                           "throttled": None, "freq_max_mhz": None}


def test_nonexistent_root(root, tmp_path):
    root(tmp_path / "does-not-exist")
    assert probe_state().temp_c is None and probe_device().board is None


def test_vcgencmd_used_when_no_firmware_file(root, tmp_path, monkeypatch):
    """Older Pi kernels: the flags come from `vcgencmd get_throttled`."""
    root("armv7l")
    fake = tmp_path / "vcgencmd"
    fake.write_text('#!/bin/sh\n[ "$1" = get_throttled ] && echo "throttled=0x80008"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("EDGE_VCGENCMD", str(fake))
    s = probe_state()
    assert s.throttled_raw == 0x80008
    assert [k for k, v in s.throttled.items() if v] == ["soft_temp_limit", "soft_temp_limit_occurred"]


def test_telemetry_device_uses_probe(root, monkeypatch):
    from edge import telemetry

    root("pi5")
    telemetry._device.cache_clear()
    try:
        rec = telemetry.make_record("bench", {})
        assert rec["device"]["board"] == "Raspberry Pi 5 Model B Rev 1.0"
        assert rec["device"]["cpu"] == "ARM Cortex-A76"
    finally:
        telemetry._device.cache_clear()  # later tests must not see the fake board
