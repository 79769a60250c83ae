"""The library side of `edge bias audit`: audit, report, telemetry, in one call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bias.audit import AuditResult, audit
from bias.repeat import RepeatConfig, RepeatResult, sample_suite
from bias.report import write_report
from bias.suites import load_suite, parse_spec
from edge import telemetry
from edge.errors import BadOptionError


@dataclass
class AuditRun:
    """One `edge bias audit`: the suite's result, the repeated sampling if asked, the files."""

    result: AuditResult
    repeat: RepeatResult | None
    report: str  # report.html
    results: str  # results.json

    def to_dict(self) -> dict[str, Any]:
        """The summary `--json` prints (no per-item rows: those are in results.json)."""
        d = self.result.to_dict(with_items=False) | {"report": self.report, "results": self.results}
        if self.repeat is not None:
            d["repeat"] = self.repeat.to_dict(with_items=False)
        return d


def run_audit(model: str | None, suite_spec: str, *, limit: int | None = None,
              correction: str | None = None, correction_scale: float = 1.0,
              out_dir: str | None = None, threads: int | None = None, precision: str = "auto",
              on_start: Callable[[int], None] | None = None,
              on_progress: Callable[[float], None] | None = None,
              repeat: RepeatConfig | None = None) -> AuditRun:
    """Audit MODEL on a suite; write the report folder; log one `fairness` record.

    With `repeat`, also sample the probe pairs' cloze prompts K times at temperature T
    (bias.repeat) and add the figures to the report, results.json and the record.
    """
    if repeat is not None:
        repeat.validate()
        if parse_spec(suite_spec)[0] != "probes":
            raise BadOptionError(f"--repeat works with --suite probes only, not {suite_spec!r}; "
                                 "drop --repeat or use --suite probes")
    res, rt = audit(model, suite_spec, limit=limit, correction=correction,
                    correction_scale=correction_scale, threads=threads, precision=precision,
                    on_start=on_start, on_progress=on_progress)
    try:
        rep = None
        if repeat is not None:
            rep = sample_suite(rt, load_suite(suite_spec, limit=limit), repeat,
                               on_start=on_start, on_progress=on_progress)
        out = Path(out_dir or f"bias-{res.suite}")
        meta = {"model": str(rt.path), "model_name": rt.info.name, "limit": limit}
        paths = write_report(res, out, meta, repeat=rep)
        run = AuditRun(res, rep, str(paths["html"]), str(paths["json"]))
        summary = run.to_dict()
        extra = {"repeat": summary["repeat"]} if rep is not None else {}
        telemetry.log(
            "fairness",
            {"command": "bias audit", "suite": res.suite, "n_items": res.n_items,
             "skipped_rows": res.skipped_rows, "score_s": res.score_s,
             "tokens_decoded": res.tokens_decoded, "overall": summary["overall"],
             "per_category": summary["per_category"], **extra},
            model=rt.info,
            config=rt.config_record(correction=res.correction,
                                    correction_scale=res.correction_scale, compute=res.compute),
        )
        return run
    finally:
        rt.close()
