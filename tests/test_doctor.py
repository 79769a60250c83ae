"""Issue 12: the installed llama.cpp runs here, crashes are caught in a child, edge doctor."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge import hostcheck
from edge.cli import cli
from edge.hostcheck import Verdict
from tests.conftest import edge_cmd

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
AMX_INFO = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 | "


def _sigill_child(info: str = AMX_INFO) -> list[str]:
    """A child that says what the library has, then dies as a trapped AMX tile would."""
    code = (f"import json, os, signal; print(json.dumps({{'system_info': {info!r}}}), flush=True); "
            "os.kill(os.getpid(), signal.SIGILL)")
    return [sys.executable, "-c", code]


def test_no_amx_kernels_compiled_in_on_x86():
    """The regression the set-up guards against: a host without AMX still catches it."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    if platform.machine() in ("x86_64", "AMD64"):
        assert "AMX_INT8" not in hostcheck.parse_features(info), (
            f"llama.cpp was built with AMX kernels ({info}); rebuild with firmware_scripts/install.sh")


def test_parse_features_and_missing():
    feats = hostcheck.parse_features("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | MATMUL_INT8 = 0 | ")
    assert feats == ["NEON", "ARM_FMA", "DOTPROD"]
    pi4 = hostcheck.cpu_flags(FIXTURES / "pi4")
    pi5 = hostcheck.cpu_flags(FIXTURES / "pi5")
    assert hostcheck.missing_features(feats, pi4) == ["DOTPROD"]  # a Pi 5 wheel on a Pi 4
    assert hostcheck.missing_features(feats, pi5) == []


def test_child_sigill_is_a_verdict_not_a_crash():
    v = hostcheck.run_check("unused.gguf", argv=_sigill_child())
    assert not v.ok and v.reason == "SIGILL"
    assert "AMX" in v.detail and "SIGILL" in v.detail
    assert "AMX_INT8" in v.features
    assert "install.sh" in v.fix or "pip install" in v.fix
    assert sys.executable in v.fix


def test_child_error_and_timeout():
    v = hostcheck.run_check("x", argv=[sys.executable, "-c", "import sys; sys.exit('no such model')"])
    assert not v.ok and v.reason == "exit 1" and "no such model" in v.detail
    v = hostcheck.run_check("x", argv=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert not v.ok and v.reason == "timeout"


def test_real_child_check_passes(bundled_model):
    v = hostcheck.run_check(bundled_model, threads=1)
    assert v.ok, v.detail
    assert v.prompt_tokens >= 64 and v.gen_tokens >= 1
    assert v.system_info.startswith("CPU")


def test_verdict_cached_per_library(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_CACHE", str(tmp_path))
    calls = []

    def fake(model=None, **kw):
        calls.append(model)
        return Verdict(ok=True, key=hostcheck.library_key())

    monkeypatch.setattr(hostcheck, "run_check", fake)
    hostcheck.ensure_llama_works()
    hostcheck.ensure_llama_works()
    assert len(calls) == 1  # the second load reads the verdict
    monkeypatch.setattr(hostcheck, "library_key", lambda: "reinstalled")
    hostcheck.ensure_llama_works()
    assert len(calls) == 2  # a new library is checked again


def test_failing_verdict_stops_inference_commands(tmp_path, env, bundled_model):
    """A cached SIGILL verdict for the installed library: every inference command exits 2
    with one line that names the cause and the fix, and never loads the model."""
    cache = tmp_path / "cache"
    env["EDGE_CACHE"] = str(cache)
    bad = hostcheck.run_check("x", argv=_sigill_child())
    bad.key = hostcheck.library_key()
    cache.mkdir()
    (cache / hostcheck.VERDICT_FILE).write_text(json.dumps(bad.to_dict()))
    for args in (["run", "-p", "hi", "-n", "2"], ["bench", "--pp", "8", "--tg", "2", "--reps", "1"]):
        p = subprocess.run(edge_cmd() + args, capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "SIGILL" in lines[0] and "Fix:" in lines[0] and "edge doctor" in lines[0]
        assert "Traceback" not in p.stderr


def _ok_check(info: str):
    def run(model=None, **kw):
        return Verdict(ok=True, key="k", system_info=info, features=hostcheck.parse_features(info),
                       prompt_tokens=72, gen_tokens=4, prompt_tps=100.0, seconds=1.0)
    return run


def _doctor(monkeypatch, runner_check, tree: str | None = None, arch: str | None = None,
            args: tuple[str, ...] = ()):
    from edge import doctor

    monkeypatch.setattr(doctor.hostcheck, "run_check", runner_check)
    monkeypatch.setattr(doctor.hostcheck, "save_verdict", lambda v: None)
    if tree:
        monkeypatch.setenv("EDGE_SYSFS_ROOT", str(FIXTURES / tree))
    if arch:
        monkeypatch.setenv("EDGE_ARCH", arch)
    return CliRunner().invoke(cli, ["doctor", *args], catch_exceptions=False)


def test_doctor_simulated_trap_exits_1_with_fix(monkeypatch):
    real = hostcheck.run_check
    r = _doctor(monkeypatch, lambda model=None, **kw: real(model, argv=_sigill_child()))
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    fail = [ln for ln in r.output.splitlines() if ln.startswith("FAIL")]
    assert any("inference" in ln and "SIGILL" in ln for ln in fail)
    assert hostcheck.reinstall_command() in r.output


def test_doctor_pi5_wheel_on_pi4_fails_build(monkeypatch):
    arm = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | OPENMP = 1 | "
    r = _doctor(monkeypatch, _ok_check(arm), tree="pi4", arch="aarch64")
    assert r.exit_code == 1
    line = next(ln for ln in r.output.splitlines() if "llama.cpp build" in ln)
    assert line.startswith("FAIL") and "DOTPROD" in line
    board = next(ln for ln in r.output.splitlines() if " board " in ln)
    # the Pi 4 fixture reports under-voltage and throttling (0x50005)
    assert board.startswith("warn") and "Raspberry Pi 4 Model B" in board and "under-voltage now" in board
    r = _doctor(monkeypatch, _ok_check(arm), tree="pi5", arch="aarch64")
    assert r.exit_code == 0, r.output
    assert "ARM Cortex-A76" in r.output and "not throttled" in r.output


def test_doctor_armv7_warns(monkeypatch):
    r = _doctor(monkeypatch, _ok_check("CPU : NEON = 1 | "), tree="armv7l", arch="armv7l")
    line = next(ln for ln in r.output.splitlines() if " cpu " in ln)
    assert line.startswith("warn") and "32-bit" in line


def test_doctor_json_schema(monkeypatch):
    r = _doctor(monkeypatch, _ok_check(AMX_INFO.replace("AMX_INT8 = 1", "AMX_INT8 = 0")), args=("--json",))
    d = json.loads(r.output)
    assert set(d) == {"edge_version", "ok", "checks", "facts"}
    assert isinstance(d["ok"], bool)
    names = [c["name"] for c in d["checks"]]
    for want in ("versions", "llama.cpp build", "rpc", "cpu", "memory", "disk", "board",
                 "bundled model", "inference"):
        assert want in names
    for c in d["checks"]:
        assert set(c) == {"name", "status", "summary", "fix"} and c["status"] in ("ok", "warn", "FAIL")
    for key in ("llama_cpp_python", "ggml", "cores", "ram_bytes", "edge_home_free_bytes",
                "edge_cache_free_bytes", "system_info"):
        assert key in d["facts"]


@pytest.mark.slow
def test_doctor_real_all_ok(env):
    """The real thing, as a user runs it: every check ok here, exit 0."""
    p = subprocess.run(edge_cmd() + ["doctor", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    d = json.loads(p.stdout)
    bad = [c for c in d["checks"] if c["status"] == "FAIL"]
    assert p.returncode == 0 and d["ok"] and not bad, bad
    inf = next(c for c in d["checks"] if c["name"] == "inference")
    assert inf["status"] == "ok" and "72-token" in inf["summary"]
    assert os.path.isfile(d["facts"]["bundled_model"])
