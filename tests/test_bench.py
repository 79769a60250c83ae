"""edge bench on the bundled model: records, files, bad input, Ctrl-C, cooldown, throttling."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.bench.llama_ops import BenchContext
from edge.bench.runner import BenchConfig, mean_std, run_bench, throttled_during
from edge.cli import cli
from edge.device import probe_state
from edge.telemetry import headline, read_records
from tests.conftest import edge_cmd

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
TINY = ["--threads", "1", "--pp", "8", "--tg", "4", "--reps", "2", "--warmup", "0"]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_mean_std_hand_computed():
    assert mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0)  # sample std (n-1), as llama-bench
    assert mean_std([5.0]) == (5.0, 0.0)


def test_bench_context_decodes_exactly_pp_and_tg_tokens(runtime):
    """llama.cpp's own counters confirm what was timed: pp tokens in batches, tg one by one."""
    import llama_cpp

    with BenchContext(runtime.llm.model, n_ctx=64, threads=1, n_batch=16) as b:
        b.perf_reset()
        b.prompt(40)  # 3 llama_decode calls of 16, 16, 8 tokens
        p = b.perf()
        assert p.n_p_eval == 40 and p.t_eval_ms == 0  # llama.cpp floors the counts at 1
        mem = llama_cpp.llama_get_memory(b.ctx)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 39
        assert 0 <= b.first_token() < b.n_vocab
        b.clear()
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == -1  # an empty cache before each rep
        b.perf_reset()
        b.generate(5)
        p = b.perf()
        assert p.n_eval == 5 and p.t_p_eval_ms == 0
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 4


def test_bench_json_out_and_telemetry(tmp_path):
    out = tmp_path / "b.jsonl"
    r = invoke(["bench", *TINY, "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    (rec,) = doc["tests"]
    m = rec["metrics"]
    assert rec["kind"] == "bench" and rec["run_id"] == doc["run_id"]
    assert rec["config"]["threads"] == 1 and rec["config"]["n_ctx"] == 512
    assert rec["model"]["quant"] == "Q4_1" and rec["model"]["arch"] == "llama"
    assert (m["test"], m["n_prompt"], m["n_gen"], m["reps"]) == ("pp8+tg4", 8, 4, 2)
    for k in ("pp_tps", "tg_tps"):
        assert len(m[f"{k}_samples"]) == 2 and all(s > 0 for s in m[f"{k}_samples"])
        assert (m[k], m[f"{k}_std"]) == pytest.approx(mean_std(m[f"{k}_samples"]))
    assert m["ttft_ms"] > 0 and m["load_ms"] > 0 and m["peak_rss_bytes"] > 50 * 2**20
    assert set(m["state_before"]) >= {"temp_c", "freq_mhz", "governor", "throttled"}
    # the same record went to the run log and to --out
    logged = read_records("bench").records
    assert [x["run_id"] for x in logged] == [doc["run_id"]]
    assert headline(logged[0]).startswith(f"pp8+tg4: pp {m['pp_tps']:.1f} t/s, tg {m['tg_tps']:.1f} t/s")
    assert [json.loads(line) for line in out.read_text().splitlines()] == logged


@pytest.mark.slow  # 2 threads on a shared, busy 2-core machine can take ~20 s
def test_bench_csv_and_two_thread_counts_and_table(tmp_path):
    out = tmp_path / "b.csv"
    r = invoke(["bench", "--threads", "1,2", "--pp", "4", "--tg", "2", "--reps", "1", "--warmup", "0",
                "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["threads"] for row in rows] == ["1", "2"]
    assert all(float(row["pp_tps"]) > 0 and row["quant"] == "Q4_1" for row in rows)
    assert "pp t/s" in r.stdout and "pp4+tg2" in r.stdout and "Wrote 2 record(s)" in r.stdout
    assert len(read_records("bench").records) == 2


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "0 is out of range"),
    (["--threads", "257"], "257 is out of range"),
    (["--threads", "1,x"], "'x' is not a whole number"),
    (["--pp", "0"], "--pp"),
    (["--tg", "-3"], "--tg"),
    (["--reps", "0"], "--reps"),
    (["no-such-model"], "no-such-model"),
    (["--pp", "600"], "--ctx 512 must exceed --pp 600"),
    (["--out", "{tmp}/file.txt/out.jsonl"], "not writable"),
    (["--out", "{tmp}/out.txt"], "use a .jsonl or .csv"),
    (["--cooldown", "-5"], "--cooldown"),
])
def test_bad_input_one_line_exit_2(tmp_path, env, args, message):
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    p = subprocess.run([*edge_cmd(), "bench", *args], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and message in p.stderr
    assert p.stdout == ""
    assert sorted(x.name for x in tmp_path.iterdir()) == ["file.txt"]  # no partial output
    assert read_records("bench").records == []


def test_cooldown_needs_a_sensor(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(FIXTURES / "empty"))
    r = CliRunner().invoke(cli, ["bench", *TINY, "--cooldown", "50"])
    assert r.exit_code == 2 and "temperature sensor" in r.stderr


def _pi_tree(tmp_path: Path, temp_milli: int, throttled: str) -> Path:
    root = tmp_path / "pi5"
    shutil.copytree(FIXTURES / "pi5", root)
    (root / "sys/class/thermal/thermal_zone0/temp").write_text(f"{temp_milli}\n")
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text(throttled)
    return root


def test_cooldown_waits_then_flags_throttling(tmp_path, monkeypatch):
    """A hot Pi: the test waits until it cools, then the firmware reports throttling mid-test."""
    root = _pi_tree(tmp_path, 72000, "0x0\n")
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(root))
    temp = root / "sys/class/thermal/thermal_zone0/temp"
    sleeps: list[float] = []

    def fake_sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 3:  # cools on the third poll, then throttles while running
            temp.write_text("44000\n")
            (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("0x20002\n")

    res = run_bench(BenchConfig(threads=[1], n_prompt=4, n_gen=2, reps=1, warmup=0, cooldown_c=50),
                    sleep=fake_sleep)
    m = res.tests[0].metrics
    assert m["cooldown_wait_s"] == pytest.approx(sum(sleeps)) and len(sleeps) == 3
    assert m["cooldown_reached"] is True
    assert m["state_before"]["temp_c"] == 44.0
    assert m["throttled"] is True
    assert m["state_after"]["throttled"]["arm_frequency_capped"] is True


def test_cooldown_timeout_runs_anyway_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(_pi_tree(tmp_path, 90000, "0x0\n")))
    res = run_bench(BenchConfig(threads=[1], n_prompt=4, n_gen=2, reps=1, warmup=0, cooldown_c=50,
                                cooldown_timeout_s=4), sleep=lambda s: None)
    m = res.tests[0].metrics
    assert m["cooldown_reached"] is False and m["cooldown_wait_s"] == 4
    assert m["throttled"] is False  # the Pi reported nothing: known not throttled


def test_throttled_during_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(FIXTURES / "pi5"))
    clean = probe_state()
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(FIXTURES / "pi4"))
    hot = probe_state()
    assert throttled_during(clean, clean) is False
    assert throttled_during(clean, hot) is True
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(_pi_tree(tmp_path, 50000, "0x50000\n")))
    old_flags = probe_state()  # throttled earlier since boot, not now and not during the test
    assert throttled_during(old_flags, old_flags) is False
    assert throttled_during(clean, old_flags) is True  # the since-boot flag appeared during it
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(FIXTURES / "x86"))
    assert throttled_during(probe_state(), probe_state()) is None  # no report: unknown


def test_interrupt_keeps_finished_tests(tmp_path):
    out = tmp_path / "sweep.jsonl"
    seen = []

    def stop_after_first(t):
        seen.append(t)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(threads=[1, 1, 1], n_prompt=4, n_gen=2, reps=1, warmup=0, out=out),
                  on_test=stop_after_first)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == [seen[0].record] == read_records("bench").records


@pytest.mark.slow
def test_ctrl_c_mid_sweep_subprocess(tmp_path, env, edge_home):
    """A real SIGINT during a sweep: exit 130, finished tests in the log and in --out."""
    out = tmp_path / "sweep.jsonl"
    p = subprocess.Popen([*edge_cmd(), "bench", "--threads", ",".join(["1"] * 12), "--pp", "64",
                          "--tg", "16", "--reps", "2", "--out", str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = edge_home / "logs"
    deadline = time.time() + 120
    while time.time() < deadline and not any(f.stat().st_size for f in logs.glob("runs-*.jsonl")):
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    logged = read_records("bench").records
    assert 1 <= len(logged) < 12
    assert [json.loads(x) for x in out.read_text().splitlines()] == logged
    assert f"{len(logged)} finished test(s) kept" in stderr


def test_sigint_is_deferred_to_a_safe_point(tmp_path):
    """SIGINT mid-test (even inside a llama.cpp log callback) stops the sweep at the next
    decode; the unfinished test is not logged, the finished ones are kept."""
    out = tmp_path / "s.jsonl"
    calls = []

    def progress(what: str, done: int, total: int) -> None:
        calls.append(done)
        if done == 3:  # first timed step of the second test
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(threads=[1, 1, 1], n_prompt=4, n_gen=2, reps=1, warmup=0, out=out),
                  on_progress=progress)
    assert calls[-1] == 3  # nothing ran after the signal
    assert len(read_records("bench").records) == 1 == len(out.read_text().splitlines())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
