"""`edge bench compare A B`: the tests both files ran, side by side, with B/A ratios."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.bench.output import read_records
from edge.errors import BadOptionError

Key = tuple[str, str, int, int, int]  # model, quant, threads, pp, tg


def test_key(rec: dict[str, Any]) -> Key:
    m, model, cfg = rec["metrics"], rec.get("model") or {}, rec.get("config") or {}
    name = model.get("name") or Path(str(model.get("path", "?"))).name
    return (str(name), str(model.get("quant") or "-"), int(cfg.get("threads") or 0),
            int(m.get("n_prompt") or 0), int(m.get("n_gen") or 0))


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None else None


@dataclass
class CompareRow:
    model: str
    quant: str
    threads: int
    n_prompt: int
    n_gen: int
    a_pp_tps: float
    b_pp_tps: float
    pp_ratio: float | None
    a_tg_tps: float
    b_tg_tps: float
    tg_ratio: float | None
    a_ttft_ms: float | None
    b_ttft_ms: float | None
    ttft_ratio: float | None
    a_throttled: bool | None
    b_throttled: bool | None


@dataclass
class Comparison:
    a: str
    b: str
    rows: list[CompareRow] = field(default_factory=list)
    only_a: list[Key] = field(default_factory=list)
    only_b: list[Key] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "rows": [asdict(r) for r in self.rows],
                "only_a": [list(k) for k in self.only_a], "only_b": [list(k) for k in self.only_b]}


def _index(path: Path) -> dict[Key, dict[str, Any]]:
    recs = read_records(path)
    if not recs:
        raise BadOptionError(f"{path} holds no bench records; give a file from `edge bench --out X.jsonl`")
    # A key seen twice (two runs in one file): the later run wins.
    return {test_key(r): r for r in recs}


def compare(a: Path, b: Path) -> Comparison:
    ia, ib = _index(a), _index(b)
    out = Comparison(str(a), str(b))
    for key in ia:
        if key not in ib:
            out.only_a.append(key)
            continue
        ma, mb = ia[key]["metrics"], ib[key]["metrics"]
        out.rows.append(CompareRow(
            *key,
            a_pp_tps=ma["pp_tps"], b_pp_tps=mb["pp_tps"], pp_ratio=_ratio(mb["pp_tps"], ma["pp_tps"]),
            a_tg_tps=ma["tg_tps"], b_tg_tps=mb["tg_tps"], tg_ratio=_ratio(mb["tg_tps"], ma["tg_tps"]),
            a_ttft_ms=ma.get("ttft_ms"), b_ttft_ms=mb.get("ttft_ms"),
            ttft_ratio=_ratio(mb.get("ttft_ms"), ma.get("ttft_ms")),
            a_throttled=ma.get("throttled"), b_throttled=mb.get("throttled"),
        ))
    out.only_b = [k for k in ib if k not in ia]
    return out
