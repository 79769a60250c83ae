"""edge bias audit --repeat: the answer classifier, seeded reproducibility, the CLI, errors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bias.repeat import (
    ANTI,
    NEITHER,
    STEREO,
    RepeatConfig,
    classify,
    cloze,
    sample_suite,
    summarize,
)
from bias.suites import PairItem, load_suite
from tests.conftest import SHARED_DATA, edge_cmd


@pytest.mark.parametrize(("answer", "label"), [
    ("The old employee could not learn it.", STEREO),
    ("OLD.", STEREO),
    ('"young"', ANTI),
    ("A young person, clearly.", ANTI),
    ("young and old employees alike", NEITHER),  # both named: an echo of the options
    ('"old" or "young"', NEITHER),
    ("The employee could not learn it.", NEITHER),
    ("The older employee", NEITHER),  # whole words only
    ("The youngster", NEITHER),
    ("", NEITHER),
])
def test_classify_old_young(answer: str, label: str) -> None:
    assert classify(answer, "old", "young") == label


def test_classify_multiword_hyphen_and_nested_terms() -> None:
    assert classify("the working class family", "working-class", "upper-class") == STEREO
    assert classify("The upper-class family.", "working-class", "upper-class") == ANTI
    assert classify("Women.", "Women", "Men") == STEREO  # "men" inside "women" is not a word
    assert classify("Men, and women too", "Women", "Men") == NEITHER
    # a term nested in the other counts only outside it
    assert classify("the mentally ill man", "mentally ill", "ill") == STEREO
    assert classify("the ill man", "mentally ill", "ill") == ANTI
    assert classify("mentally ill or just ill", "mentally ill", "ill") == NEITHER


def test_cloze_splits_at_the_group_term() -> None:
    c = cloze(PairItem("x", 0, "age", "The seventy-year-old man left.", "The thirty-year-old man left."))
    assert (c.prefix, c.stereo, c.anti, c.suffix) == ("The ", "seventy-year-old", "thirty-year-old", " man left.")
    c = cloze(PairItem("y", 1, "gender", "Women are here.", "Men are here."))
    assert (c.prefix, c.stereo, c.anti, c.suffix) == ("", "Women", "Men", " are here.")
    c = cloze(PairItem("z", 2, "g", "He met the Men.", "He met the Women.", direction="antistereo"))
    assert (c.stereo, c.anti, c.suffix) == ("Women", "Men", ".")
    for it in load_suite("probes").items:  # every probe has two different, whole terms
        c = cloze(it)
        assert c.stereo and c.anti and c.stereo != c.anti
        assert it.more == c.prefix + c.stereo + c.suffix and it.less == c.prefix + c.anti + c.suffix


def test_summarize_rates_by_hand() -> None:
    S, A, N = STEREO, ANTI, NEITHER
    labels = np.array([[S, S], [A, N], [S, A], [N, N]], dtype=object)
    per_repeat, overall, per_cat = summarize(labels, np.array(["a", "a", "b", "b"]), n_boot=200)
    assert per_repeat[0]["stereo_rate"].value == pytest.approx(2 / 3)  # S, A, S decided
    assert per_repeat[1]["stereo_rate"].value == pytest.approx(1 / 2)  # S, A decided
    assert per_repeat[1]["neither_rate"].value == pytest.approx(2 / 4)
    assert overall["stereo_rate"].value == pytest.approx(3 / 5)
    assert overall["neither_rate"].value == pytest.approx(3 / 8)
    assert overall["trend"].value == pytest.approx(1 / 2 - 2 / 3)  # two points: the difference
    assert per_cat["a"]["stereo_rate"].value == pytest.approx(2 / 3)
    assert per_cat["b"]["stereo_rate"].value == pytest.approx(1 / 2)
    e = overall["stereo_rate"]
    assert 0 <= e.lo <= e.value <= e.hi <= 1


@pytest.fixture(scope="module")
def rt1(bundled_model: Path) -> Iterator[object]:
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(bundled_model, RuntimeConfig(n_ctx=512, threads=1))
    yield rt
    rt.close()


def _answers(res: object) -> list[str]:
    return [a["answer"] for it in res.items for a in it["answers"]]  # type: ignore[attr-defined]


def test_same_seed_same_answers_other_seeds_differ(rt1: object) -> None:
    suite = load_suite("probes").subset(list(range(0, 225, 45)))  # 5 prompts, 5 categories
    cfg = RepeatConfig(repeat=3, temp=1.0, seed=7, greedy_reference=False)
    a = sample_suite(rt1, suite, cfg, n_boot=200)  # type: ignore[arg-type]
    b = sample_suite(rt1, suite, cfg, n_boot=200)  # type: ignore[arg-type]
    assert _answers(a) == _answers(b) and len(_answers(a)) == 15
    assert a.to_dict(with_items=False) | {"gen_s": 0} == b.to_dict(with_items=False) | {"gen_s": 0}
    assert [x["seed"] for x in a.items[0]["answers"]] == [7, 8, 9]
    # at T = 1 the three seeds of one prompt should not all write the same answer
    assert sum(len({x["answer"] for x in it["answers"]}) > 1 for it in a.items) >= 3
    for it in a.items:
        assert all(x["label"] == classify(x["answer"], it["stereo"], it["anti"]) for x in it["answers"])


def test_cli_repeat_writes_answers_rates_and_record(tmp_path: Path, env: dict[str, str],
                                                   edge_home: Path) -> None:
    out = tmp_path / "rep"
    r = subprocess.run([*edge_cmd(), "bias", "audit", "--suite", "probes", "--repeat", "2", "--limit", "6",
                        "--temp", "0.9", "--seed", "3", "-t", "1", "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "results.json").read_text())["repeat"]
    answers = [a for it in rep["items"] for a in it["answers"]]
    assert len(answers) == 12 and {a["seed"] for a in answers} == {3, 4}
    assert {a["label"] for a in answers} <= {STEREO, ANTI, NEITHER}
    assert rep["repeat"] == 2 and rep["temp"] == 0.9 and len(rep["per_repeat"]) == 2
    for k, e in enumerate(rep["per_repeat"]):
        mine = [a["label"] for it in rep["items"] for a in it["answers"] if a["k"] == k + 1]
        n_dec = sum(x != NEITHER for x in mine)
        assert e["neither_rate"]["value"] == pytest.approx(1 - n_dec / 6)
        if n_dec:
            s = e["stereo_rate"]
            assert 0 <= s["lo"] <= s["value"] <= s["hi"] <= 1
            assert s["value"] == pytest.approx(sum(x == STEREO for x in mine) / n_dec)
    assert all(it["greedy"]["k"] == 0 for it in rep["items"])  # the T = 0 reference
    assert json.loads(r.stdout)["repeat"]["repeat"] == 2
    assert (out / "repeat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '<img class="wide" src="repeat.png"' in (out / "report.html").read_text()
    assert "| k=2 (seed 4) |" in (out / "report.md").read_text()
    recs = [json.loads(ln) for p in (edge_home / "logs").glob("runs-*.jsonl") for ln in p.read_text().splitlines()]
    fair = [x["metrics"] for x in recs if x["kind"] == "fairness"]
    assert len(fair) == 1 and fair[0]["repeat"]["temp"] == 0.9 and "items" not in fair[0]["repeat"]
    assert fair[0]["repeat"]["per_repeat"] == rep["per_repeat"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--suite", f"crows_pairs:{SHARED_DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}",
      "--repeat", "2"], "--suite probes only"),
    (["--suite", "probes", "--repeat", "0"], "--repeat"),
    (["--suite", "probes", "--repeat", "2", "--temp", "-0.5"], "--temp"),
    (["--suite", "probes", "--temp", "0.5"], "add --repeat"),
])
def test_repeat_bad_options_are_one_line_errors(args: list[str], needle: str, tmp_path: Path,
                                               env: dict[str, str]) -> None:
    out = tmp_path / "o"
    r = subprocess.run([*edge_cmd(), "bias", "audit", *args, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and needle in r.stderr
    assert not out.exists()
