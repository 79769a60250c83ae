"""`edge bias compare BEFORE AFTER`: two audits' per-item scores judged as a paired change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bias.compare import compare_audits
from bias.metrics import bbq_amb_bias
from bias.suites import load_suite
from edge.cli import cli
from tests.conftest import SHARED_DATA


def _audit(path: Path, items: list[dict[str, Any]], *, suite: str = "toy", kind: str = "pairs",
           source: str = "toy.csv", **extra: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    res = {"model": f"/m/{path.name}.gguf", "suite": suite, "kind": kind, "source": source, "correction": None,
           "n_items": len(items), "items": items, **extra}
    (path / "results.json").write_text(json.dumps(res))
    return path


def _pairs(diff: np.ndarray, cats: list[str], words: np.ndarray) -> list[dict[str, Any]]:
    return [{"id": str(i), "row": i, "category": c, "ll_more": float(-50 + d), "ll_less": -50.0,
             "ll_words_diff": float(w)} for i, (d, c, w) in enumerate(zip(diff, cats, words, strict=True))]


def _repeat(labels: list[list[str]]) -> dict[str, Any]:
    return {"repeat": len(labels[0]), "temp": 0.8, "max_tokens": 24,
            "items": [{"row": i, "answers": [{"k": k + 1, "label": x} for k, x in enumerate(row)]}
                      for i, row in enumerate(labels)]}


def test_a_shrunk_category_moves_toward_neutral_and_the_other_stays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cats = ["a"] * 80 + ["b"] * 80
    d = np.concatenate([2.0 + rng.standard_normal(80), rng.standard_normal(80)])
    after = d.copy()
    after[:80] -= 2.0  # a's pairs lose their bias, in the shared tokens; b's are untouched
    words = rng.standard_normal(160)
    gen_b = [["stereo", "stereo"]] * 30
    gen_a = [["stereo", "anti"]] * 30
    b = _audit(tmp_path / "before", _pairs(d, cats, words), repeat=_repeat(gen_b))
    a = _audit(tmp_path / "after", _pairs(after, cats, words), repeat=_repeat(gen_a))
    c = compare_audits(b, a, n_boot=500)
    assert c.n_items == 160 and not c.notes and c.counts == {"a": 80, "b": 80}
    pct = c.figures["pct_stereotype"]
    assert pct.change.hi < 0 and pct.before.value > 50
    assert c.category_moves == {"biased_before": ["a"], "moved_toward_neutral": ["a"], "closer": ["a"],
                                "made_worse": []}
    assert c.per_category["b"]["mean_ll_diff"].change.value == pytest.approx(0.0)
    # the change is the shared tokens' alone: the words part did not move
    assert c.figures["words_ll_diff"].change.value == pytest.approx(0.0)
    assert c.figures["rest_ll_diff"].change.value == pytest.approx(-1.0)
    assert c.diagnostics is not None and c.diagnostics["slope"] < -0.3
    assert c.generation is not None and c.generation.before.value == 1.0 and c.generation.after.value == 0.5

    res = CliRunner().invoke(cli, ["bias", "compare", str(b), str(a)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "toy: 160 items in both audits; 95% CIs, the change by paired bootstrap"
    row = {ln.split()[0]: ln for ln in lines if ln.startswith("  ") and ln.split()}
    assert row["a"].endswith("toward neutral") and row["b"].endswith("no significant change")
    assert row["generation"].endswith("toward neutral")
    assert "categories biased before: a; moved toward neutral: a; made worse: none" in lines
    js = json.loads(CliRunner().invoke(cli, ["bias", "compare", str(b / "results.json"), str(a), "--json"]).output)
    assert js["n_items"] == 160 and js["figures"]["pct_stereotype"]["toward_neutral"] is True

    # an audit with a smaller --limit: the common items, and a note that says so
    part = _audit(tmp_path / "part", _pairs(after[:100], cats[:100], words[:100]))
    c2 = compare_audits(b, part, n_boot=200)
    assert c2.n_items == 100 and c2.counts == {"a": 80, "b": 20}
    assert c2.notes[0] == "compared on the 100 items both audits scored (BEFORE 160, AFTER 100)"
    assert any("only one audit sampled" in n for n in c2.notes) and c2.generation is None


def test_bbq_reads_each_items_target_from_the_files(tmp_path: Path) -> None:
    """Before: always the biased answer; after: always the right one. Disambiguated accuracy
    rises to 1 and the ambiguous bias score falls to 0, per category too."""
    src = SHARED_DATA / "bbq"
    suite = load_suite(f"bbq:{src}", limit=200)

    def biased(it: Any) -> int:
        if it.polarity == "neg":
            return it.target
        return next(i for i in range(3) if i not in (it.target, it.unknown))

    def items(pick: Any) -> list[dict[str, Any]]:
        return [{"id": it.id, "row": it.row, "category": it.category,
                 "ll": [0.0 if i == pick(it) else -5.0 for i in range(3)], "pred": pick(it), "label": it.label,
                 "ambiguous": it.ambiguous} for it in suite.items]

    b = _audit(tmp_path / "b", items(biased), suite="bbq", kind="bbq", source=str(src))
    a = _audit(tmp_path / "a", items(lambda it: it.label), suite="bbq", kind="bbq", source=str(src))
    c = compare_audits(b, a, n_boot=300)
    assert c.figures["acc_dis"].after.value == 1.0 and c.figures["acc_dis"].change.lo > 0
    assert c.figures["s_amb"].before.value > 0.5 and c.figures["s_amb"].after.value == 0.0
    assert c.figures["s_amb"].toward_neutral
    assert bbq_amb_bias(np.ones(3, bool), np.zeros(3, bool), np.zeros(3, bool)) == 0.0  # all 'unknown'
    assert set(c.per_category) == {"Age", "Disability_status", "Nationality", "Physical_appearance"}
    out = CliRunner().invoke(cli, ["bias", "compare", str(b), str(a)]).output
    assert "  acc_dis" in out and out.splitlines()[4].split()[-1] == "higher"


@pytest.mark.parametrize(("case", "needle"), [
    ("missing", "has no results.json"),
    ("mitigate", "is an `edge bias mitigate` result, not an audit"),
    ("other_suite", "compare two audits of the same suite file"),
    ("disjoint", "the two audits share 0 items"),
    ("same", "BEFORE and AFTER are the same file"),
])
def test_bad_inputs_are_one_line_exit_2(tmp_path: Path, case: str, needle: str) -> None:
    d = np.zeros(4)
    b = _audit(tmp_path / "b", _pairs(d, ["a"] * 4, d))
    other = {
        "missing": tmp_path / "nope",
        "mitigate": tmp_path / "m",
        "other_suite": _audit(tmp_path / "o", _pairs(d, ["a"] * 4, d), suite="probes", source="x"),
        "disjoint": _audit(tmp_path / "d", [dict(it, id=f"x{i}") for i, it in enumerate(_pairs(d, ["a"] * 4, d))]),
        "same": b / "results.json",
    }[case]
    if case == "mitigate":
        other.mkdir()
        (other / "results.json").write_text(json.dumps({"config": {}, "splits": [], "summary": {}}))
    res = CliRunner().invoke(cli, ["bias", "compare", str(b), str(other)])
    assert res.exit_code == 2 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    assert needle in res.output
