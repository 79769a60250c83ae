"""edge bias audit end to end: report files, telemetry, one-line errors with no output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edge import cvec
from edge.telemetry import headline
from tests.conftest import edge_cmd


@pytest.mark.slow
def test_audit_probes_writes_report_and_fairness_record(tmp_path: Path, env: dict[str, str],
                                                       edge_home: Path) -> None:
    out = tmp_path / "rep"
    r = subprocess.run([*edge_cmd(), "bias", "audit", "--suite", "probes", "--limit", "12",
                        "--out", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["n_items"] == 12 and summary["suite"] == "probes"
    pct = summary["overall"]["pct_stereotype"]
    assert pct["lo"] <= pct["value"] <= pct["hi"]
    assert min(abs(pct["value"] - 100 * k / 12) for k in range(13)) < 1e-9
    res = json.loads((out / "results.json").read_text())
    assert len(res["items"]) == 12 and {"ll_more", "ll_less", "ll_words_diff", "row"} <= set(res["items"][0])
    o = summary["overall"]  # the ll difference and its two parts: the rewritten words, the rest
    assert abs(o["words_ll_diff"]["value"] + o["rest_ll_diff"]["value"] - o["mean_ll_diff"]["value"]) < 1e-9
    html = (out / "report.html").read_text()
    assert '<img src="pct_stereotype.png"' in html and "gender" in html
    assert "mean_ll_diff = words_ll_diff + rest_ll_diff" in html
    for png in ("pct_stereotype.png", "mean_ll_diff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **ALL** | 12 |" in (out / "report.md").read_text()
    logs = list((edge_home / "logs").glob("runs-*.jsonl"))
    recs = [json.loads(ln) for p in logs for ln in p.read_text().splitlines()]
    fair = [x for x in recs if x["kind"] == "fairness"]
    assert len(fair) == 1 and fair[0]["metrics"]["n_items"] == 12
    assert fair[0]["metrics"]["overall"]["pct_stereotype"]["value"] == pct["value"]
    # edge logs shows the figure itself, with its CI
    mean = summary["overall"]["mean_ll_diff"]
    assert headline(fair[0]) == (f"audit probes: pct {pct['value']:.1f} [{pct['lo']:.1f}, {pct['hi']:.1f}], "
                                 f"mean {mean['value']:.2f} [{mean['lo']:.2f}, {mean['hi']:.2f}], n 12")
    # auto scored the Q4_1 model on its f16 copy, without row alignment, and says so
    comp = fair[0]["config"]["compute"]
    assert comp["precision"] == "f16" and comp["source_type"] == "Q4_1" and comp["align"] == 1
    assert summary["compute"] == comp and "an f16 copy of the Q4_1 weights" in html


def _fails(args: list[str], env: dict[str, str], out: Path) -> str:
    r = subprocess.run([*edge_cmd(), "bias", "audit", *args, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    assert not out.exists() or not any(out.iterdir())
    return r.stderr


@pytest.mark.slow
def test_audit_bad_inputs_are_one_line_errors(tmp_path: Path, env: dict[str, str]) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n")
    assert "no usable rows" in _fails(["--suite", f"crows_pairs:{empty}"], env, tmp_path / "o1")
    assert "unknown suite" in _fails(["--suite", "nosuch"], env, tmp_path / "o2")
    v = cvec.write(tmp_path / "small.gguf", [[0.0] * 64] * 30)
    assert "n_embd 64" in _fails(["--suite", "probes", "--limit", "2", "--correction", str(v)], env,
                                 tmp_path / "o3")


@pytest.mark.slow
def test_audit_stereoset_and_compare_two_of_its_audits(tmp_path: Path, env: dict[str, str]) -> None:
    """A StereoSet audit end to end (it once failed after scoring: ss_score got the unrelated
    scores too), and two audits of it compared on their common items."""
    def ex(i: int) -> dict:
        return {"id": f"e{i}", "target": "t", "bias_type": ["profession", "race"][i % 2],
                "context": "The BLANK worked late.",
                "sentences": [{"sentence": f"The {w} worked late.", "id": f"s{i}{lab}", "labels": [], "gold_label": lab}
                              for w, lab in ((["engineer", "nurse", "chef"][i % 3], "stereotype"),
                                             (["dancer", "pilot", "farmer"][i % 3], "anti-stereotype"),
                                             (["teapot", "cloud", "river"][i % 3], "unrelated"))]}
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps({"version": "1.0", "data": {"intrasentence": [ex(i) for i in range(8)],
                                                          "intersentence": []}}))
    outs = []
    for limit in ("8", "6"):
        out = tmp_path / f"ss{limit}"
        r = subprocess.run([*edge_cmd(), "bias", "audit", "--suite", f"stereoset:{dev}", "--limit", limit,
                            "--out", str(out), "--json", "-t", "2"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        o = json.loads(r.stdout)["overall"]
        assert 0 <= o["ss"]["value"] <= 100 and 0 <= o["lms"]["value"] <= 100
        outs.append(out)
    r = subprocess.run([*edge_cmd(), "bias", "compare", str(outs[0]), str(outs[1]), "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads(r.stdout)
    assert c["n_items"] == 6 and c["counts"] == {"profession": 3, "race": 3}
    assert c["notes"] == ["compared on the 6 items both audits scored (BEFORE 8, AFTER 6)"]
    # the same model on the same items: the scores agree to the scorer's batch jitter, and
    # ss moves by at most one item's flip, not significantly
    a, b = ({it["id"]: it for it in json.loads((o / "results.json").read_text())["items"]} for o in outs)
    assert max(abs(a[k]["ll_stereo"] - b[k]["ll_stereo"]) for k in b) < 0.05
    ss = c["figures"]["ss"]
    assert abs(ss["change"]["value"]) <= 100 / 6 + 1e-9 and not ss["toward_neutral"] and not ss["away_from_neutral"]
