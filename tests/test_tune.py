"""`edge tune` on a tiny converted model: the search, the journal that makes a rerun resume
without re-measuring, memory refusals, and the profile that run uses."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from convert_helpers import TinySpec, make_checkpoint

from edge.cli import cli
from edge.convert import convert
from edge.runtime import RuntimeConfig
from edge.tune import TuneOptions, apply_profile, find_profile, tune
from edge.tune.space import Candidate, build_space

SPEC = TinySpec(n_embd=256, n_ff=512, n_layers=2, n_head=4, n_head_kv=2, vocab=320)


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tune")
    make_checkpoint(d / "hf", SPEC)
    out = d / "tiny.f16.gguf"
    convert(d / "hf", out, outtype="f16")
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """~40 KB of Python's documentation: both halves hold several 64-token chunks."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000])
    return str(path)


def _opts(text: str, **kw: object) -> TuneOptions:
    base = dict(quants=["Q8_0", "Q4_0"], threads=[1], kl_ctx=64, kl_chunks=1, n_gen=4, n_ctx=256,
                final_rounds=1, budget_minutes=30, max_kld=10.0, text=text)
    return TuneOptions(**(base | kw))  # type: ignore[arg-type]


def _measurements(journal: Path) -> Counter:
    recs = [json.loads(line) for line in journal.read_text().splitlines()]
    return Counter((r["kind"], r.get("key") or r.get("qkey"), r.get("rung")) for r in recs
                   if r["kind"] in ("speed", "quality", "heldout") and not r.get("reference"))


def test_interrupted_tune_resumes_without_remeasuring(f16: Path, text: str) -> None:
    seen = {"speed": 0}

    def stop_in_rung_one(p: object) -> None:
        if p.stage == "speed" and p.what.startswith("rung 1"):
            seen["speed"] += 1
            if seen["speed"] == 2:
                raise KeyboardInterrupt  # as the CLI's guard raises it on Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        tune(str(f16), _opts(text), progress=stop_in_rung_one)
    assert find_profile(f16) is None  # nothing chosen yet
    journal = next((Path(os.environ["EDGE_HOME"]) / "tune").rglob("*.journal.jsonl"))
    before = _measurements(journal)
    n_records = sum(json.loads(line)["kind"] != "header" for line in journal.read_text().splitlines())
    assert any(k[0] == "speed" and k[2] == "r1" for k in before)  # it got into rung 1
    r = tune(str(f16), _opts(text))
    after = _measurements(journal)
    assert max(after.values()) == 1, [k for k, n in after.items() if n > 1]  # nothing measured twice
    # each earlier measurement counts once as reused, and nothing this run measured itself
    assert 0 < r.reused <= n_records and r.measured == sum(after.values()) - sum(before.values())
    # a third run measures nothing at all
    again = tune(str(f16), _opts(text))
    assert again.measured == 0 and _measurements(journal) == after
    prof = r.profile
    assert prof.winner["kld"] <= 10.0 and prof.defaults["quant"] == "F16" and prof.defaults["threads"] >= 1
    assert prof.winner["kld_heldout"] is not None and any(p["pareto"] for p in prof.frontier)


def test_quality_budget_and_memory_refusals(f16: Path, text: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    r = tune(str(f16), _opts(text, max_kld=1e-9, quants=["Q4_0"], imatrix=False))  # Q4_0 cannot be that close
    assert "Q4_0" in r.dropped_quality and r.imatrix_choice == {}
    assert r.profile.winner["quant"] == "F16" and r.profile.winner["kld"] == 0.0
    # a device with ~no free RAM: every candidate refused by the memory model, none loaded
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 4000000 kB\nMemAvailable: 270000 kB\n")
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(tmp_path))
    res = CliRunner().invoke(cli, ["tune", str(f16), "--quant", "Q4_0", "-t", "1", "--ctx", "256", "--text", text,
                                   "--budget-minutes", "5"])
    assert res.exit_code == 2 and "--max-kld" not in res.output, res.output


def test_profile_is_used_by_run_and_ignored_with_no_tune(f16: Path, text: str, tmp_path: Path) -> None:
    r = tune(str(f16), _opts(text))
    # Q4_0 is made both ways (Q8_0's quantizer ignores an imatrix; F16 is the source)
    assert set(r.imatrix_choice) == {"Q4_0"}
    assert any(p["label"].startswith("Q4_0+imatrix") for p in r.profile.frontier) == (r.imatrix_choice["Q4_0"] != "plain")
    from edge.report import build_report

    rep = build_report(tmp_path / "report", bench=[], latency=[])  # the frontier plot alone
    assert rep.images == ["tune_0.png"] and (tmp_path / "report" / "tune_0.png").stat().st_size > 1000
    path, cfg, prof = apply_profile(f16, RuntimeConfig())
    assert prof is not None and path == Path(r.profile.winner["path"]) and cfg.threads == 1
    assert apply_profile(f16, RuntimeConfig(threads=2))[1].threads == 2  # explicit settings win
    res = CliRunner().invoke(cli, ["run", str(f16), "-p", "the", "-n", "2", "--temp", "0", "--raw"])
    assert res.exit_code == 0 and "using the tuned profile" in res.output
    res = CliRunner().invoke(cli, ["run", str(f16), "-p", "the", "-n", "2", "--temp", "0", "--raw", "--no-tune"])
    assert res.exit_code == 0 and "tuned profile" not in res.output
    # bench: the tuned file and settings, and its thread count unless -t is given
    w = r.profile.winner
    bench = ["bench", str(f16), "--pp", "8", "--tg", "4", "--reps", "1", "--warmup", "0", "--ctx", "64", "--json"]
    res = CliRunner().invoke(cli, bench)
    assert res.exit_code == 0 and "using the tuned profile" in res.output, res.output
    rec = json.loads(res.output[res.output.index("{"):])["tests"][0]
    assert rec["config"]["tuned"] and rec["config"]["threads"] == w["threads"]
    assert rec["config"]["n_batch"] == w["n_batch"] and rec["config"]["flash_attn"] == w["flash_attn"]
    assert Path(rec["model"]["path"]) == Path(w["path"])
    res = CliRunner().invoke(cli, [*bench, "--no-tune", "-t", "2"])
    rec = json.loads(res.output[res.output.index("{"):])["tests"][0]
    assert "tuned profile" not in res.output and not rec["config"]["tuned"] and rec["config"]["threads"] == 2
    assert Path(rec["model"]["path"]) == f16


def test_space_counts() -> None:
    s = build_space(["Q4_0", "Q8_0"], cores=2, objective="tg", repacks={"Q4_0": True})
    # 2 threads × 4 KV/FA settings × (2 repack for Q4_0 + 1 for Q8_0)
    assert len(s) == 2 * 4 * 3 and len({c.key for c in s}) == len(s)
    assert all(c.flash_attn for c in s if c.type_v != "f16")  # a quantized V needs flash attention
    assert len(build_space(["Q8_0"], cores=2, objective="pp")) == 2 * 4 * 4  # batch sizes too
    c = Candidate("Q4_0", 2, type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert Candidate.from_dict(c.to_dict()) == c


def test_budget_cut_still_chooses_from_what_was_measured(f16: Path, text: str) -> None:
    r = tune(str(f16), _opts(text, budget_minutes=0.001))  # over budget before rung 0's first run
    assert r.stopped_by_budget and r.profile.winner["tg"] > 0 and r.profile.defaults["tg"] > 0
