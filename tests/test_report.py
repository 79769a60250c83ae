"""edge report: HTML + PNG plots from bench and latency records, checked in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from click.testing import CliRunner

from edge import telemetry
from edge.cli import cli
from edge.report import build_report

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)


def _bench(day: int, quant: str, threads: int, tg: float, temp: float, throttled: bool | None) -> dict:
    rec = telemetry.make_record(
        "bench",
        {"test": "pp128+tg64", "n_prompt": 128, "n_gen": 64, "pp_tps": tg * 6, "pp_tps_std": 1.5,
         "tg_tps": tg, "tg_tps_std": 0.4, "ttft_ms": 128 / (tg * 6) * 1000, "ttft_ms_std": 3.0,
         "load_ms": 250.0, "peak_rss_bytes": (180 + 20 * threads) * 2**20,
         "state_before": {"temp_c": temp - 8}, "state_after": {"temp_c": temp}, "throttled": throttled},
        config={"threads": threads})
    rec["model"] = {"name": "SmolLM2 135M", "quant": quant, "path": f"/m/smol-{quant}.gguf"}
    rec["device"]["board"] = "Raspberry Pi 5 Model B Rev 1.0"
    rec["ts"] = (T0 + timedelta(days=day)).isoformat().replace("+00:00", "Z")
    return rec


def _latency(day: int, ttft: float) -> dict:
    rec = telemetry.make_record("latency", {"command": "run", "gen_tps": 31.0 + day, "prompt_tps": 180.0,
                                            "ttft_ms": ttft, "peak_rss_bytes": 210 * 2**20})
    rec["model"] = {"name": "SmolLM2 135M", "quant": "Q4_1"}
    rec["ts"] = (T0 + timedelta(days=day, hours=3)).isoformat().replace("+00:00", "Z")
    return rec


@pytest.fixture
def logged() -> None:
    """A week of a Pi 5's bench runs and edge run latencies in the run log."""
    for day in range(5):
        for quant, base in (("Q4_0", 30.0), ("Q8_0", 22.0)):
            for threads in (1, 4):
                telemetry.append(_bench(day, quant, threads, base * (1.6 if threads == 4 else 1) + day,
                                        55.0 + 3 * day + threads, throttled=(day == 4 and threads == 4)))
        telemetry.append(_latency(day, 300.0 - 10 * day))


def test_report_files_and_tables(tmp_path, logged):
    res = build_report(tmp_path / "rep")
    assert res.n_bench == 20 and res.n_latency == 5
    assert res.images == ["tps.png", "tg_over_time.png", "temperature.png", "ttft.png", "rss.png"]
    for name in res.images:
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = res.index.read_text()
    rows = re.findall(r"<tr><td class=\"l\">2026-11-05 09:00</td>", html)
    assert len(rows) == 4  # latest test per quant × threads
    assert html.count('class="bad">THROTTLED') == 2  # day-4, 4-thread tests of both quants
    assert "Raspberry Pi 5 Model B Rev 1.0" in html and "pp128+tg64" in html
    assert "34.00 ± 0.40" in html  # Q4_0, 1 thread, day 4: 30 + 4 t/s
    # latency: 5 runs, median gen t/s 31+2, median TTFT 300-20
    assert re.search(r"<td>5</td>\s*<td>33.0</td><td>180.0</td><td>280.0</td>", html)


def _audit(day: int, pct: float, correction: str | None = None) -> dict:
    est = {"value": pct, "lo": pct - 3.0, "hi": pct + 3.0, "n": 400}
    rec = telemetry.make_record("fairness", {"command": "bias audit", "suite": "crows_pairs", "n_items": 400,
                                             "overall": {"pct_stereotype": est,
                                                         "mean_ll_diff": {"value": 0.5, "lo": 0.1, "hi": 0.9}}},
                                config={"correction": correction})
    rec["model"] = {"name": "SmolLM2 135M", "quant": "Q4_1"}
    rec["ts"] = (T0 + timedelta(days=day, hours=5)).isoformat().replace("+00:00", "Z")
    return rec


def test_report_fairness_tables_and_plot(tmp_path):
    fair = [_audit(0, 55.0), _audit(1, 54.0), _audit(2, 51.5, "/x/fair.gguf")]
    fix = telemetry.make_record("fairness", {
        "command": "bias mitigate", "method": "learn", "splits": 5, "of": 5, "complete": True,
        "figures": {"heldout_pct_before": {"median": 55.2, "min": 54.4, "max": 56.2, "n": 5},
                    "heldout_pct_after": {"median": 51.3, "min": 50.6, "max": 52.0, "n": 5},
                    "ppl_increase_pct": {"median": 0.954, "min": 0.018, "max": 1.08, "n": 5}},
        "checks": {"ci_contains_50_after_excluded_before": "5/5", "paired_change_significant": "5/5"}})
    fix["ts"] = (T0 + timedelta(days=1, hours=6)).isoformat().replace("+00:00", "Z")
    odd = telemetry.make_record("fairness", {"command": "bias mitigate", "method": "oddity",
                                             "figures": {"heldout_pct_before": {"median": 55.0}}})
    bbq = telemetry.make_record("fairness", {"command": "bias audit", "suite": "bbq", "n_items": 300, "overall": {
        "acc_amb": {"value": 0.0, "lo": 0.0, "hi": 0.0}, "acc_dis": {"value": 0.507, "lo": 0.4, "hi": 0.613},
        "s_amb": {"value": 0.013, "lo": -0.2, "hi": 0.227}}})
    bbq["ts"] = (T0 + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    res = build_report(tmp_path / "rep", bench=[], latency=[], fairness=[bbq, *fair, fix, odd])
    assert res.n_fairness == 6 and "fairness.png" in res.images
    assert "oddity" not in res.index.read_text()  # a record of another shape is left out, not a crash
    html = res.index.read_text()
    audits = html[html.index('id="audits"'):html.index('id="corrections"')]
    # latest first, each pct with its CI, the correction named
    assert audits.index("51.5 [48.5, 54.5]") < audits.index("54.0 [51.0, 57.0]") < audits.index("55.0 [52.0, 58.0]")
    assert "<td class=\"l\">fair.gguf</td>" in audits and audits.count("<td class=\"l\">none</td>") == 3
    assert "mean 0.50 [0.10, 0.90]" in audits
    # BBQ has no pct: its bias score and disambiguated accuracy instead of two dashes
    assert "s_amb 0.013 [-0.200, 0.227]</td>" in audits and "acc_dis 0.507 [0.400, 0.613]</td>" in audits
    fixes = html[html.index('id="corrections"'):]
    assert "55.2 (54.4 to 56.2)" in fixes and "51.3 (50.6 to 52.0)" in fixes and "+0.95% (+0.02 to +1.08)" in fixes
    assert re.search(r"<td>5/5</td>\s*<td>5/5</td><td>–</td>", fixes)  # BBQ not judged: a dash, not a pass


def test_report_escapes_model_names(tmp_path):
    rec = _bench(0, "Q4_0", 1, 10.0, 50.0, None)
    rec["model"]["name"] = "<script>alert(1)</script>"
    res = build_report(tmp_path / "r", bench=[rec], latency=[])
    assert "<script>alert(1)" not in res.index.read_text()


def test_report_cli_errors(tmp_path):
    r = CliRunner().invoke(cli, ["report", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no bench, latency or fairness records" in r.stderr
    assert not (tmp_path / "r" / "index.html").exists()
    f = tmp_path / "file"
    f.write_text("x")
    telemetry.append(_latency(0, 100.0))
    r = CliRunner().invoke(cli, ["report", "-o", str(f)])
    assert r.exit_code == 2 and r.stderr.startswith("Error:")


def test_report_from_bench_file(tmp_path):
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps(_bench(d, "Q4_0", 2, 20.0 + d, 60.0, False)) + "\n" for d in range(3)))
    r = CliRunner().invoke(cli, ["report", "-o", str(tmp_path / "rep"), "--from", str(src), "--json"],
                           catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["bench_records"] == 3 and doc["latency_records"] == 0 and "tps.png" in doc["images"]


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--virtual-time-budget=5000"]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, logged):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/apt-packages.txt lists it)")
    res = build_report(tmp_path / "rep")
    url = res.index.resolve().as_uri()
    base = [exe, *CHROME_FLAGS]
    dom = subprocess.run([*base, f"--user-data-dir={tmp_path / 'prof1'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # every <img> decoded in the browser (set by the page's load handler)
    assert 'data-images-ok="5/5"' in dom.stdout
    assert dom.stdout.count("<table") == 2 and dom.stdout.count("<tr>") >= 4 + 1 + 1 + 1
    shot = tmp_path / "shot.png"
    p = subprocess.run([*base, f"--user-data-dir={tmp_path / 'prof2'}", f"--screenshot={shot}",
                        "--window-size=1280,2400", url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2400, 1280)
    non_white = (img < 0.95).any(axis=2)
    assert 0.05 < non_white.mean() < 0.9  # text, tables and plots, not a blank page
    colours = np.unique((img[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # plot lines and bars, not just black text on white


def test_report_keeps_each_engine_of_a_test(tmp_path):
    """The same test from llama.cpp and the native engine (dense, sparse): three rows, not one."""
    recs = []
    for i, (engine, prof) in enumerate([("llama", None), ("native", None),
                                         ("native", {"path": "/p/rs50.json", "sparsity": 0.5})]):
        r = _bench(i, "Q4_1", 2, 10.0 + i, 60.0, None)
        r["config"].update(engine=engine, sparse_profile=prof)
        recs.append(r)
    build_report(tmp_path / "rep", bench=recs, latency=[])
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "native sparse 50% (rs50.json)" in html and "· native</td>" in html
    assert html.count("10.00 ± 0.40") == 1 and html.count("12.00 ± 0.40") == 1


def test_time_plots_span_their_points_not_years():
    # one logged point used to sit alone on an axis from 2025 to 2029
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge.report import _audit_series
    from edge.report.plots import _time_axis

    fig, ax = plt.subplots()
    ax.plot([T0], [1.0], marker="o")
    _time_axis(ax, [T0])
    lo, hi = ax.get_xlim()  # in days
    assert 0.03 < hi - lo < 0.1 and lo < matplotlib.dates.date2num(T0) < hi
    _time_axis(ax, [T0, T0 + timedelta(days=30)])
    lo, hi = ax.get_xlim()
    assert 30 < hi - lo < 34
    plt.close(fig)
    # a --limit audit is its own series: it scored other rows than the full suite
    full, part = _audit(0, 55.0), _audit(1, 55.7)
    part["metrics"]["n_items"] = 300
    assert _audit_series(full) != _audit_series(part) and "(300 items)" in _audit_series(part)
