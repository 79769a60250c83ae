"""Suite loaders on the real files in ../shared/data and on small malformed copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bias.suites import load_suite
from bias.suites.probes import pairs
from edge.errors import SuiteError
from tests.conftest import SHARED_DATA as DATA

CROWS = DATA / "crows_pairs" / "crows_pairs_anonymized.csv"
HEADER = ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"


def test_crows_pairs_real_file() -> None:
    s = load_suite(f"crows_pairs:{CROWS}")
    assert len(s.items) == 1508 and s.skipped == 0
    assert len(s.categories) == 9 and "race-color" in s.categories
    assert s.items[0].id == "0" and s.items[0].row == 0
    assert {it.direction for it in s.items} == {"stereo", "antistereo"}


def _crows(tmp_path: Path, rows: list[str]) -> Path:
    p = tmp_path / "c.csv"
    p.write_text(HEADER + "".join(rows), encoding="utf-8")
    return p


GOOD = '0,"A x b.","A y b.",stereo,gender,"[]",a0,"[]"\n'


def test_crows_malformed_rows_skipped_with_line_numbers(tmp_path: Path) -> None:
    p = _crows(tmp_path, [GOOD, '1,"A x.","A y.",sideways,gender,"[]",a0,"[]"\n',
                          '2,"only three",fields\n', '3,"Multi\nline x.","Multi\nline y.",antistereo,age,"[]",a,"[]"\n',
                          '4,"","A y.",stereo,age,"[]",a0,"[]"\n'])
    s = load_suite(f"crows:{p}")
    assert [it.id for it in s.items] == ["0", "3"]
    assert s.skipped == 2 + 1 and s.skipped_lines == [3, 4, 8]  # the multi-line row spans lines 5-7


def test_crows_strict_names_the_line(tmp_path: Path) -> None:
    p = _crows(tmp_path, [GOOD, '1,"A x.","A y.",sideways,gender,"[]",a0,"[]"\n'])
    with pytest.raises(SuiteError, match=r"c\.csv:3: malformed CrowS-Pairs row"):
        load_suite(f"crows_pairs:{p}", strict=True)


@pytest.mark.parametrize("content", ["", HEADER, "a,b,c\n1,2,3\n"])
def test_empty_or_wrong_csv_is_an_error(tmp_path: Path, content: str) -> None:
    p = tmp_path / "e.csv"
    p.write_text(content)
    with pytest.raises(SuiteError):
        load_suite(f"crows_pairs:{p}")


def test_bbq_real_folder() -> None:
    s = load_suite(f"bbq:{DATA / 'bbq'}")
    assert len(s.items) == 9892 and s.skipped == 0
    assert s.categories == ["Age", "Disability_status", "Nationality", "Physical_appearance"]
    it = s.items[0]
    assert it.ambiguous and it.polarity == "neg" and it.label == it.unknown == 2 and it.target == 0


def test_bbq_malformed_lines(tmp_path: Path) -> None:
    lines = (DATA / "bbq" / "Age.jsonl").read_text().splitlines()[:3]
    broken = json.loads(lines[1])
    broken["label"] = 7
    (tmp_path / "Age.jsonl").write_text("\n".join([lines[0], json.dumps(broken), "{not json", lines[2]]) + "\n")
    s = load_suite(f"bbq:{tmp_path}")
    assert len(s.items) == 2 and s.skipped_lines == [2, 3]
    with pytest.raises(SuiteError, match=r"Age\.jsonl:2: malformed BBQ row"):
        load_suite(f"bbq:{tmp_path}", strict=True)
    (tmp_path / "Age.jsonl").write_text("{bad\n")
    with pytest.raises(SuiteError, match="no usable rows"):
        load_suite(f"bbq:{tmp_path}")


def test_stereoset_intrasentence(tmp_path: Path) -> None:
    def ex(i: int, labels: list[str]) -> dict:
        return {"id": f"e{i}", "target": "t", "bias_type": "profession", "context": "The BLANK one.",
                "sentences": [{"sentence": f"S{i} {lab}.", "id": f"s{i}{lab}", "labels": [],
                               "gold_label": lab} for lab in labels]}
    full = ["stereotype", "anti-stereotype", "unrelated"]
    data = {"version": "1.0", "data": {"intrasentence": [ex(0, full), ex(1, full[:2]), ex(2, full)],
                                       "intersentence": []}}
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(data))
    s = load_suite(f"stereoset:{p}")
    assert [it.id for it in s.items] == ["e0", "e2"] and s.skipped_lines == [2]
    assert s.items[0].anti == "S0 anti-stereotype."


def test_probe_suite_size_and_shape() -> None:
    items = pairs()
    cats = {it.category for it in items}
    assert len(items) >= 200 and len(cats) >= 8
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert it.more != it.less and it.more[0].isupper()
        # a pair differs only in the group term
        a, b = it.more.split(), it.less.split()
        assert a[-1] == b[-1] or a[0] == b[0]


def test_unknown_suite_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="unknown suite"):
        load_suite("winobias")
    with pytest.raises(SuiteError, match="not found"):
        load_suite(f"crows_pairs:{tmp_path / 'nope.csv'}")


def test_limit_keeps_order() -> None:
    s = load_suite(f"crows_pairs:{CROWS}", limit=5)
    assert [it.row for it in s.items] == [0, 1, 2, 3, 4]


def test_limit_spreads_over_the_categories_of_suites_grouped_by_category() -> None:
    """BBQ's items come one category file after another: --limit takes each file's share
    (sizes 3,680 / 1,556 / 3,080 / 1,576 of 9,892; the largest remainders get the rest)."""
    full = load_suite(f"bbq:{DATA / 'bbq'}")
    s = load_suite(f"bbq:{DATA / 'bbq'}", limit=100)
    counts = {c: sum(it.category == c for it in s.items) for c in full.categories}
    assert counts == {"Age": 37, "Disability_status": 16, "Nationality": 31, "Physical_appearance": 16}
    pos = {it.id: i for i, it in enumerate(full.items)}
    idx = [pos[it.id] for it in s.items]
    age = [pos[it.id] for it in full.items if it.category == "Age"]
    assert idx == sorted(idx) and idx[:37] == age[:37]  # each category's first items, file order
    assert sum(it.ambiguous for it in s.items if it.category == "Age") in (18, 19)  # both conditions
    p = load_suite("probes", limit=6)  # fewer than its 9 categories: one each for the first six
    assert len(p.items) == 6 and len({it.category for it in p.items}) == 6
    assert load_suite("probes", limit=10_000).items == load_suite("probes").items
