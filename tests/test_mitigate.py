"""`edge bias mitigate` end to end on the bundled model (probe suite, tiny limits)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge import cvec
from edge.telemetry import headline
from tests.conftest import edge_cmd


@pytest.mark.slow
def test_mitigate_writes_a_vector_and_a_heldout_judgement(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "fair.gguf"
    rep = tmp_path / "rep"
    r = subprocess.run([*edge_cmd(), "bias", "mitigate", "--suite", "probes", "-o", str(out),
                        "--calib-limit", "8", "--heldout-limit", "16", "--direction-pairs", "8",
                        "--blocks", "2", "--max-iter", "1", "--second-suite", "", "-t", "2",
                        "--out", str(rep)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probe L1-L15" in r.stderr and "probe L16-L29" in r.stderr  # every measurement shown
    res = json.loads((rep / "results.json").read_text())
    cal, held = res["calibration_rows"], res["heldout_rows"]
    assert len(cal) == 8 and len(held) == 16 and not set(cal) & set(held)
    its = res["loop"]["iterations"]
    assert [it["phase"] for it in its[:3]] == ["base", "probe L1-L15", "probe L16-L29"]
    h = res["heldout"]
    for k in ("gap_change", "mean_ll_diff_change"):
        assert h[k]["lo"] <= h[k]["value"] <= h[k]["hi"]
    assert h["significant"]["gap"] == (h["gap_change"]["hi"] < 0)
    # the file holds direction × coefficient: loading at scale 1.0 applies what the loop chose
    v = cvec.read(out)
    coefs = np.array(res["loop"]["coefficients"])
    np.testing.assert_allclose(v.coefficients, coefs, rtol=1e-6)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "controlvector"
    md = (rep / "report.md").read_text()
    assert "Paired change" in md and "probe L16-L29" in md
    page = (rep / "report.html").read_text()  # the same report as a page, which the CLI names
    assert "<table>" in page and "probe L16-L29" in page and f"report: {rep / 'report.html'}" in r.stdout
    logs = list((Path(env["EDGE_HOME"]) / "logs").glob("*.jsonl"))
    recs = [json.loads(line) for f in logs for line in f.read_text().splitlines()]
    fair = [x for x in recs if x["kind"] == "fairness" and x["metrics"]["command"] == "bias mitigate"]
    assert len(fair) == 1
    before = res["heldout"]["before"]["pct_stereotype"]["value"]
    assert headline(fair[0]).startswith(f"mitigate probes: held-out pct {before:.1f} [")
