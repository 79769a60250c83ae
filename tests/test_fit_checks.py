"""Sessions are refused before llama.cpp loads a model that would swap or run out of memory
(a fake /proc/meminfo through EDGE_SYSFS_ROOT stands for a small device)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli import cli
from edge.errors import InsufficientMemoryError
from edge.runtime import RuntimeConfig
from edge.session import open_runtime


def _small_device(root: Path, available_mib: int) -> None:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    kib = available_mib * 1024
    (root / "proc/meminfo").write_text(f"MemTotal: {4 * 1024 * 1024} kB\nMemFree: {kib} kB\n"
                                       f"MemAvailable: {kib} kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n")


def test_run_refuses_when_it_would_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           bundled_model: Path) -> None:
    _small_device(tmp_path, 300)  # 300 MiB available, 256 MiB of it the safety margin
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(tmp_path))
    res = CliRunner().invoke(cli, ["run", "-p", "hi", "-n", "2", "--ctx", "8192"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "needs" in line and "--ctx 8192" in line and "--force" in line
    assert "largest context that fits" in line or "no context fits" in line


def test_library_check_and_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundled_model: Path) -> None:
    _small_device(tmp_path, 300)
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(tmp_path))
    with pytest.raises(InsufficientMemoryError, match="needs"):
        open_runtime(None, RuntimeConfig(n_ctx=8192, threads=1))
    rt = open_runtime(None, RuntimeConfig(n_ctx=256, threads=1, check_memory=False))  # forced: loads
    try:
        assert rt.generate("Hello", max_tokens=2, sampling=None).n_gen_tokens >= 1
    finally:
        rt.close()


def test_bench_checks_memory_at_its_own_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                bundled_model: Path) -> None:
    """bench holds the weights in a 16-token session and makes its contexts at --ctx: the
    check must be made at --ctx, before anything loads."""
    _small_device(tmp_path, 300)
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(tmp_path))
    args = ["bench", "--pp", "8", "--tg", "4", "--reps", "1", "--warmup", "0", "-t", "1", "--json"]
    res = CliRunner().invoke(cli, [*args, "--ctx", "8192"])
    assert res.exit_code == 2 and "--ctx 8192" in res.output and "--force" in res.output, res.output
    assert '"tests"' not in res.output
    res = CliRunner().invoke(cli, [*args, "--ctx", "8192", "--force"])
    assert res.exit_code == 0 and '"tests"' in res.output, res.output


def test_enough_memory_runs(bundled_model: Path) -> None:
    res = CliRunner().invoke(cli, ["run", "-p", "hi", "-n", "2", "--temp", "0", "--ctx", "512"])
    assert res.exit_code == 0, res.output
