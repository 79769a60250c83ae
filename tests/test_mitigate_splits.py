"""`edge bias mitigate --method steer|ablate|both --splits N`: option errors, and one run on
the bundled model (probe suite) that is interrupted after its first split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from bias.ablate import category_rms
from bias.suites import load_suite
from edge.cli import cli
from edge.report import build_report
from edge.telemetry import headline
from tests.conftest import ROOT, SHARED_DATA


@pytest.mark.parametrize(("args", "needle"), [
    (["--method", "scrub"], "--method"),
    (["--method", "ablate", "--splits", "0"], "--splits"),
    (["--method", "ablate", "--weights", "q2"], "--weights"),
    (["--method", "both", "--ppl-tokens", "4096"], "--ppl-tokens"),
    (["--ppl-tokens", "32"], "--ppl-tokens"),
    (["--method", "ablate", "--suite", f"bbq:{SHARED_DATA / 'bbq'}"], "pair suite"),
    (["--method", "both", "--calib-frac", "1"], "--calib-frac"),
    (["--method", "ablate", "--ablate-objective", "words"], "--ablate-objective"),
    # inputs read or written later are checked before any scoring, for both entry points
    (["--method", "learn", "--exclude-category", "nosuch"], "has no such category; use one of "),
    (["--exclude-category", "nosuch"], "has no such category"),
    (["-o", "/dev/null/fair.gguf"], "/dev/null is not a folder; choose another -o"),
    (["--method", "both", "--bbq", "bbq:/nonexistent-dir"], "BBQ data not found"),
    (["--bbq", "probes"], "not a BBQ suite"),
    # a share that leaves a category a pair or two to judge on (probes: 25 age pairs)
    (["--method", "learn", "--calib-frac", "0.95"], "leaves age 1 held-out pair of 25"),
    (["--calib-frac", "0.02"], "leaves age no calibration pair of its 25 (a category needs a calibration pair and "
                               "10 held out, or half of a smaller one): use 0.03 to 0.61"),
])
def test_bad_options_are_one_line_exit_2_and_write_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "fair.gguf"
    base = ["bias", "mitigate", "--suite", "probes", "-o", str(out), "--out", str(tmp_path / "rep")]
    # a later --suite wins in click, so the table can swap the suite
    res = CliRunner().invoke(cli, base + args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    assert needle in res.output
    assert not out.exists() and not (tmp_path / "rep" / "results.json").exists()


def _run(args: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    # `python -m edge` from the repository root runs this checkout's code
    return subprocess.Popen([sys.executable, "-m", "edge", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.mark.slow
def test_both_methods_write_a_model_and_a_vector_and_ctrl_c_keeps_split_0(
        tmp_path: Path, env: dict[str, str]) -> None:
    out, rep = tmp_path / "fair.gguf", tmp_path / "rep"
    args = ["bias", "mitigate", "--suite", "probes", "-o", str(out), "--out", str(rep),
            "--method", "both", "--splits", "2", "--calib-limit", "24", "--heldout-limit", "40",
            "--repeat", "0", "--blocks", "1", "--max-iter", "3",
            "--max-ppl-increase", "0.05", "--ablate-where", "head,shared", "--ablate-objective", "shared", "-t", "2",
            "--ppl-tokens", "512", "--seed", "1"]  # seed 1's first gain step is just over budget, its second kept (4.8%); a third in case
    p = _run(args, env)
    seen = []
    assert p.stderr is not None
    for line in p.stderr:
        seen.append(line)
        if "split 2/2" in line and "steer" in line:  # progress lines start with the time
            p.send_signal(signal.SIGINT)  # Ctrl-C while split 2 calibrates
            break
    _, err = p.communicate(timeout=600)
    log = "".join(seen) + err
    assert p.returncode == 130, log[-2000:]
    assert "holds the finished splits; run the same command again to continue" in log
    assert "pair states" in log and "split 1/2 (seed 1): steer" in log and "split 1/2 (seed 1): ablate done in " in log
    res = json.loads((rep / "results.json").read_text())
    assert not res["complete"] and len(res["splits"]) == 1
    # the finished split is in the run log too, one fairness record per method, marked unfinished
    recs = [json.loads(line) for f in sorted((Path(env["EDGE_HOME"]) / "logs").glob("runs-*.jsonl"))
            for line in f.read_text().splitlines()]
    runs = {r["metrics"]["method"]: r["metrics"] for r in recs
            if r["kind"] == "fairness" and r["metrics"]["command"] == "bias mitigate"}
    assert set(runs) == {"steer", "ablate"}
    for m, got in runs.items():
        assert (got["splits"], got["of"], got["complete"]) == (1, 2, False)
        pct = res["splits"][0]["methods"][m]["heldout"]["pct_stereotype"]["after"]["value"]
        assert got["figures"]["heldout_pct_after"]["median"] == pytest.approx(pct)
        assert got["results"] == str(rep / "results.json") and "paired_change_significant" in got["checks"]
        assert f"mitigate {m}, 1/2 splits (stopped): held-out pct " in headline({"kind": "fairness", "metrics": got})
    fair = [r for r in recs if r["kind"] == "fairness"]
    html = build_report(tmp_path / "html", bench=[], latency=[], fairness=fair).index.read_text()
    assert html.count("<td>1/2 (stopped)</td>") == 2

    # the same command again keeps split 1 and fits only what the Ctrl-C stopped
    again = _run(args, env)
    _, err2 = again.communicate(timeout=900)
    assert again.returncode == 0, err2[-2000:]
    for m in ("steer", "ablate"):
        assert f"split 1/2 (seed 1): {m} kept from an earlier run" in err2
        assert f"split 1/2 (seed 1): {m} done in" not in err2 and f"split 2/2 (seed 2): {m} done in" in err2
    res2 = json.loads((rep / "results.json").read_text())
    assert res2["complete"] and len(res2["splits"]) == 2
    assert res2["splits"][0] == res["splits"][0]  # kept as it was, not fitted again
    assert res2["shared"]["kept_from_earlier_run"]["results"] == 2 and res2["elapsed_s"] > res["elapsed_s"]
    assert "2 split results and " in (rep / "report.md").read_text()
    recs2 = [json.loads(line) for f in sorted((Path(env["EDGE_HOME"]) / "logs").glob("runs-*.jsonl"))
             for line in f.read_text().splitlines()]
    done = [r["metrics"] for r in recs2[len(recs):] if r["kind"] == "fairness"]
    assert sorted((r["method"], r["splits"], r["complete"]) for r in done) == [("ablate", 2, True), ("steer", 2, True)]
    assert len(res["splits"][0]["calibration_rows"]) == 24 and len(res["splits"][0]["heldout_rows"]) == 40
    assert (rep / "shared.npz").exists()  # a rerun would start at the splits
    # shared: the states at the shared tokens, read once for both splits' calibration rows
    assert "states at the shared tokens" in log
    z = np.load(rep / "shared_positions.npz")
    suite = load_suite("probes")
    cal_idx = [i for i, it in enumerate(suite.items) if it.row in set(res["splits"][0]["calibration_rows"])]
    assert z["ok"][cal_idx].sum() > len(cal_idx) // 2 and np.abs(z["h_more"][cal_idx]).sum() > 0
    loop = res["splits"][0]["methods"]["ablate"]["fit"]["loop"]
    # --ablate-objective shared: the loop counts the shared tokens' part (whole − rewritten words)
    base = np.load(rep / "shared.npz")
    cats = [suite.items[i].category for i in cal_idx]
    rest = category_rms(base["more"][cal_idx] - base["words"][cal_idx], base["less"][cal_idx], cats)
    whole = category_rms(base["more"][cal_idx], base["less"][cal_idx], cats)
    assert loop["base_objective"] == pytest.approx(rest) and rest != pytest.approx(whole)
    assert loop["counts"] == "shared"
    assert [p["directions"] for p in loop["probes"]] == ["category", "balanced"]
    assert loop["probes"][1]["describe"].startswith("layers 1-29, λ=1")
    assert loop["directions"]["balanced"]["labels"] == ["balanced"]
    s0 = res["splits"][0]["methods"]
    for m in ("steer", "ablate"):
        d = s0[m]["heldout"]["diagnostics"]
        assert -5 < d["slope"] < 5 and -1 <= d["corr"] <= 1
        ch = s0[m]["heldout"]["pct_stereotype"]["change"]
        assert ch["lo"] <= ch["value"] <= ch["hi"]
        # the words part and the rest add up to the mean ll difference, overall and per category
        parts, h = s0[m]["heldout_parts"], s0[m]["heldout"]
        assert set(parts["words"]) == {"ALL", *h["per_category"]} == set(parts["rest"])
        for c, w in parts["words"].items():
            whole = h["mean_ll_diff"] if c == "ALL" else h["per_category"][c]["mean_ll_diff"]
            for k in ("before", "after"):
                assert abs(w[k]["value"] + parts["rest"][c][k]["value"] - whole[k]["value"]) < 1e-6
    # -o: the model with the ablation folded in, re-quantized to the source's type, and its KL cost
    fold = s0["ablate"]["fit"]["fold"]
    assert fold["path"] == str(out) and fold["weight_type"] == "source"
    assert fold["requant_kl"]["kl_mean"] >= 0 and fold["requant_kl"]["tokens"] > 0
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "llama"
    vec = out.with_name("fair.steer.gguf")  # written because the loop kept a step
    assert any(s0["steer"]["fit"]["loop"]["coefficients"]) and s0["steer"]["fit"]["vector"] == str(vec)
    assert gguf.GGUFReader(str(vec)).fields["general.architecture"].contents() == "controlvector"
    md = (rep / "report.md").read_text()
    assert res2["config"]["ppl_tokens"] == 512 and "PPL budget 5% on 512 tokens of neutral text" in md
    assert "re-quantized to the source's types" in md and "| rewritten tokens | shared tokens | pct, shared tokens |" in md
    assert not list(rep.glob("split0/*.gguf"))  # work copies are removed

    # the corrected GGUF is a model like any other, and the vector a correction
    a = subprocess.run([sys.executable, "-m", "edge", "bias", "audit", str(out), "--suite", "probes",
                        "--limit", "16", "--json", "-t", "2", "--out", str(tmp_path / "audit")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-2000:]
    assert json.loads(a.stdout)["n_items"] == 16
    b = subprocess.run([sys.executable, "-m", "edge", "bias", "audit", "--suite", "probes", "--limit", "16",
                        "--correction", str(vec), "--json", "-t", "2", "--out", str(tmp_path / "audit2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-2000:]
    assert json.loads(b.stdout)["correction"] == str(vec)


@pytest.mark.slow
def test_ablated_gguf_in_plain_llama_cpp_scores_as_the_scorer(tmp_path: Path, bundled_model: Path) -> None:
    """The folded model, F16, needs nothing of edge: plain llama-cpp-python on it gives the
    log-likelihoods the batch scorer gives (a shrink of a real direction at full strength)."""
    import llama_cpp

    from bias.ablate import AblationSpec, compute_directions, make_plan
    from bias.audit import score_pairs
    from bias.scorer import BatchScorer
    from bias.shared import read_states
    from bias.suites import load_suite
    from edge.fold import fold_gguf
    from edge.runtime import Runtime, RuntimeConfig

    suite = load_suite("probes").subset(list(range(24)))
    rt = Runtime(bundled_model, RuntimeConfig(n_ctx=512, threads=2))
    try:
        st = read_states(rt, suite, str(bundled_model), threads=2)
        d = compute_directions(st.h_more, st.h_less, st.e_more, st.e_less)
        out = tmp_path / "abl.gguf"
        fold_gguf(bundled_model, out, make_plan(d, AblationSpec(tuple(range(d.n_layers)))),
                  weight_type="F16")
        with BatchScorer(rt, model_path=out) as sc:
            more, less = score_pairs(sc, suite)
    finally:
        rt.close()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    plain = []
    for it in suite.items:
        row = []
        for text in (it.more, it.less):
            toks = [llm.token_bos(), *llm.tokenize(text.encode(), add_bos=False)]
            llm.reset()
            llm.eval(toks)
            x = np.asarray(llm.scores[: len(toks) - 1], np.float64)
            x -= x.max(1, keepdims=True)
            lp = x - np.log(np.exp(x).sum(1, keepdims=True))
            row.append(lp[np.arange(len(toks) - 1), toks[1:]].sum())
        plain.append(row)
    a = np.array(plain)
    assert not np.allclose(a[:, 0] - a[:, 1], 0)
    np.testing.assert_allclose(a[:, 0], more, atol=0.15)
    np.testing.assert_allclose(a[:, 1], less, atol=0.15)
    assert os.path.getsize(out) > 0
