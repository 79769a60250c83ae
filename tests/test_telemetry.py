"""The run log: concurrent appends stay whole lines; reading filters and survives junk."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from click.testing import CliRunner

from edge import telemetry
from edge.cli import cli


def _writer(home: str, worker: int, n: int) -> None:
    os.environ["EDGE_HOME"] = home
    for i in range(n):
        # A long payload makes torn or interleaved writes likely if appends were not atomic.
        telemetry.log("latency", {"worker": worker, "i": i, "pad": "x" * (3000 + 97 * worker)})


def test_four_processes_append_200_whole_lines(edge_home: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(edge_home), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = list((edge_home / "logs").glob("runs-*.jsonl"))
    lines = [ln for f in files for ln in f.read_text().splitlines()]
    assert len(lines) == 200
    recs = [json.loads(ln) for ln in lines]  # every line parses
    seen = {(r["metrics"]["worker"], r["metrics"]["i"]) for r in recs}
    assert seen == {(w, i) for w in range(4) for i in range(50)}
    assert len({r["run_id"] for r in recs}) == 200


def test_record_schema(edge_home: Path) -> None:
    rec = telemetry.log("bench", {"tg_tps": 12.5}, config={"threads": 4})
    for key in ("ts", "run_id", "kind", "edge_version", "device", "model", "config", "metrics"):
        assert key in rec
    assert rec["ts"].endswith("Z") and datetime.fromisoformat(rec["ts"].replace("Z", "+00:00"))
    assert set(rec["device"]) == {"hostname", "board", "cpu", "cores", "ram_bytes", "os"}


def test_read_filters_and_skips_junk(edge_home: Path) -> None:
    telemetry.log("latency", {"a": 1})
    telemetry.log("fairness", {"b": 2})
    with open(telemetry.log_path(), "a") as f:
        f.write('{"truncated": \n')
    q = telemetry.read_records()
    assert len(q.records) == 2 and q.skipped_lines == 1
    assert [r["kind"] for r in telemetry.read_records("fairness").records] == ["fairness"]
    future = datetime.now(timezone.utc) + timedelta(days=1)
    assert telemetry.read_records(since=future).records == []


def test_logs_command(edge_home: Path) -> None:
    telemetry.log("latency", {"command": "run", "n_gen_tokens": 7, "gen_tps": 31.5, "prompt_tps": 90.0,
                              "ttft_ms": 12.0})
    telemetry.log("fairness", {"pct_stereotype": 0.55})
    res = CliRunner().invoke(cli, ["logs", "--kind", "latency", "--json"], catch_exceptions=False)
    rows = [json.loads(ln) for ln in res.output.splitlines()]
    assert [r["metrics"]["gen_tps"] for r in rows] == [31.5]
    res = CliRunner().invoke(cli, ["logs"], catch_exceptions=False)
    assert "31.5 t/s gen" in res.output and "fairness" in res.output
    # a record shaped as no current writer writes it shows its first plain figures
    assert "pct_stereotype=0.55" in res.output
    # 80 columns: two lines a record, each figure line whole; a wide terminal: one table row each
    assert "\n    run: 7 tok, 31.5 t/s gen, 90.0 t/s prompt, ttft 12 ms\n" in res.output
    wide = CliRunner().invoke(cli, ["logs"], env={"COLUMNS": "200"}, catch_exceptions=False).output
    assert re.search(r"│ latency +│ - +│ - +│ run: 7 tok, 31.5 t/s gen, 90.0 t/s prompt, ttft 12 ms +│", wide)
    assert telemetry.headline({"kind": "bench", "metrics": {"test": "pp8", "pp_tps": "n/a", "n": 3}}) == "test=pp8, pp_tps=n/a, n=3"
    res = CliRunner().invoke(cli, ["logs", "--since", "yesterday"])
    assert res.exit_code == 2 and "YYYY-MM-DD" in res.output


def test_audit_headline_shows_each_suites_own_figures() -> None:
    def rec(suite: str, overall: dict[str, tuple[float, float, float]]) -> dict[str, object]:
        o = {k: {"value": v, "lo": lo, "hi": hi} for k, (v, lo, hi) in overall.items()}
        return {"kind": "fairness", "metrics": {"command": "bias audit", "suite": suite, "n_items": 150, "overall": o}}

    bbq = rec("bbq", {"acc_amb": (0.0, 0.0, 0.0), "acc_dis": (0.507, 0.4, 0.613), "s_amb": (0.013, -0.2, 0.227)})
    assert telemetry.headline(bbq) == "audit bbq: s_amb 0.013 [-0.200, 0.227], acc_dis 0.507 [0.400, 0.613], n 150"
    crows = rec("crows_pairs", {"pct_stereotype": (57.0, 50.49, 64.0), "mean_ll_diff": (0.6, -0.3, 1.5)})
    assert telemetry.headline(crows) == "audit crows_pairs: pct 57.0 [50.5, 64.0], mean 0.60 [-0.30, 1.50], n 150"
