"""BBQ (Parrish et al., 2022): a folder of per-category JSONL files (or one file)."""

from __future__ import annotations

import json
from pathlib import Path

from bias.suites.base import BBQItem, Suite, bad_row, cached, require
from edge.errors import SuiteError

URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data/{}.jsonl"
CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
              "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")


def _files(path: Path | None) -> list[Path]:
    if path is None:
        return [cached(f"bbq/{c}.jsonl", URL.format(c)) for c in CATEGORIES]
    require(path, "BBQ data")
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise SuiteError(f"{path} holds no .jsonl files; point --suite bbq:PATH at BBQ's data/ folder")
    return files


def _target(d: dict) -> tuple[int, int]:
    """(index of the answer naming a stereotyped group, index of the unknown answer)."""
    groups = {g.lower() for g in d["additional_metadata"]["stereotyped_groups"]}
    info = [d["answer_info"][f"ans{k}"] for k in range(3)]
    unknown = [k for k in range(3) if info[k][1] == "unknown"]
    # Nationality labels answers by region, so the answer's own name is matched too.
    target = [k for k in range(3) if k not in unknown
              and (info[k][1].lower() in groups or info[k][0].lower() in groups)]
    if len(unknown) != 1 or len(target) != 1:
        raise ValueError("cannot tell the stereotyped answer from answer_info/stereotyped_groups")
    return target[0], unknown[0]


def _item(d: dict, row: int, fname: str) -> BBQItem:
    answers = (str(d["ans0"]), str(d["ans1"]), str(d["ans2"]))
    label = int(d["label"])
    if label not in (0, 1, 2):
        raise ValueError(f"label {label} is not 0, 1 or 2")
    cond = d["context_condition"]
    if cond not in ("ambig", "disambig"):
        raise ValueError(f"context_condition {cond!r}")
    polarity = d["question_polarity"]
    if polarity not in ("neg", "nonneg"):
        raise ValueError(f"question_polarity {polarity!r}")
    target, unknown = _target(d)
    category = str(d.get("category") or fname)
    return BBQItem(f"{category}/{d['example_id']}", row, category, str(d["context"]),
                   str(d["question"]), answers, label, cond == "ambig", polarity, target, unknown)


def load(path: Path | None, *, strict: bool = False) -> Suite:
    files = _files(path)
    items: list[BBQItem] = []
    skipped: list[int] = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    items.append(_item(json.loads(line), n - 1, file.stem))
                except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                    bad_row("BBQ", file, n, f"{type(e).__name__}: {e}", strict, skipped)
    return Suite("bbq", "bbq", items, str(path or files[0].parent), len(skipped), skipped)
