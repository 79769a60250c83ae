"""edge bench compare: matching tests side by side, B/A ratios computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.bench.compare import compare
from edge.cli import cli


def rec(model: str, quant: str, threads: int, pp: float, tg: float, ttft: float,
        throttled: bool | None = None, n_prompt: int = 128) -> dict:
    return {"ts": "2026-11-20T10:00:00.000Z", "run_id": "r", "kind": "bench",
            "model": {"name": model, "quant": quant, "path": f"/m/{model}-{quant}.gguf"},
            "config": {"threads": threads},
            "metrics": {"n_prompt": n_prompt, "n_gen": 64, "pp_tps": pp, "tg_tps": tg, "ttft_ms": ttft,
                        "throttled": throttled}}


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    a = write(tmp_path / "pi4.jsonl", [
        rec("smol", "Q4_0", 1, 40.0, 10.0, 3200.0),
        rec("smol", "Q4_0", 4, 120.0, 20.0, 1067.0),
        rec("smol", "Q8_0", 4, 100.0, 12.0, 1280.0),  # only in A
    ])
    b = write(tmp_path / "pi5.jsonl", [
        rec("smol", "Q4_0", 4, 300.0, 45.0, 426.8, throttled=True),
        rec("smol", "Q4_0", 1, 100.0, 25.0, 1280.0),
        rec("smol", "Q4_0", 1, 96.0, 24.0, 1333.0, n_prompt=512),  # other test shape: only in B
    ])
    return a, b


def test_compare_matches_and_ratios(files):
    c = compare(*files)
    got = {(r.model, r.quant, r.threads): r for r in c.rows}
    assert set(got) == {("smol", "Q4_0", 1), ("smol", "Q4_0", 4)}
    r1, r4 = got["smol", "Q4_0", 1], got["smol", "Q4_0", 4]
    assert (r1.pp_ratio, r1.tg_ratio, r1.ttft_ratio) == pytest.approx((2.5, 2.5, 0.4))
    assert (r4.pp_ratio, r4.tg_ratio, r4.ttft_ratio) == pytest.approx((2.5, 2.25, 0.4))
    assert r4.b_throttled is True and r4.a_throttled is None
    assert c.only_a == [("smol", "Q8_0", 4, 128, 64)]
    assert c.only_b == [("smol", "Q4_0", 1, 512, 64)]


def test_compare_later_record_wins(tmp_path):
    a = write(tmp_path / "a.jsonl", [rec("m", "Q4_0", 2, 10.0, 5.0, 1.0), rec("m", "Q4_0", 2, 20.0, 5.0, 1.0)])
    b = write(tmp_path / "b.jsonl", [rec("m", "Q4_0", 2, 30.0, 5.0, 1.0)])
    assert compare(a, b).rows[0].pp_ratio == pytest.approx(1.5)


def test_compare_cli_table_and_json(files):
    r = CliRunner().invoke(cli, ["bench", "compare", *map(str, files)], catch_exceptions=False)
    assert r.exit_code == 0
    assert "2.500×" in r.stdout and "2.250×" in r.stdout and "0.400×" in r.stdout
    assert "only in A: smol Q8_0 threads=4 pp128+tg64" in r.stdout
    j = CliRunner().invoke(cli, ["bench", "compare", "--json", *map(str, files)])
    doc = json.loads(j.stdout)
    assert len(doc["rows"]) == 2 and doc["only_b"] == [["smol", "Q4_0", 1, 512, 64]]


@pytest.mark.parametrize("content, message", [
    ("not json\n", "line 1 is not JSON"),
    (json.dumps({"kind": "latency", "metrics": {}}) + "\n", "no bench records"),
])
def test_compare_bad_files(tmp_path, files, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    r = CliRunner().invoke(cli, ["bench", "compare", str(bad), str(files[1])])
    assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1
    missing = CliRunner().invoke(cli, ["bench", "compare", str(tmp_path / "nope.jsonl"), str(files[1])])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
