"""edge report: a static HTML page of bench results and latency logs, with PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge.cli.options import parse_since


@click.command("report")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for index.html and the plots.")
@click.option("--from", "sources", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Bench JSONL file(s) (from `edge bench --out`) instead of the run log.")
@click.option("--since", help="Only run-log records at or after this date (YYYY-MM-DD).")
@click.option("--title", default="edge report", show_default=True, help="Page title.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def report_cmd(out_dir: Path, sources: tuple[Path, ...], since: str | None, title: str, as_json: bool) -> None:
    """Write a static HTML report (DIR/index.html + PNG plots) of benchmark results,
    latency logs and fairness figures over time: t/s by model, quant and threads, TTFT,
    memory, temperature; bias audits and corrections.

    \b
    Examples:
      edge report -o report/ && xdg-open report/index.html
      edge report -o pi5-report --from bench-results/20261126-0900-pi5/all.jsonl
      edge report -o last-week --since 2026-11-19
    """
    from edge.bench.output import read_records
    from edge.report import build_report

    bench = [r for s in sources for r in read_records(s)] if sources else None
    res = build_report(out_dir, bench=bench, latency=[] if sources else None, fairness=[] if sources else None,
                       since=parse_since(since), title=title)
    if as_json:
        click.echo(json.dumps({"index": str(res.index), "images": res.images, "bench_records": res.n_bench,
                               "latency_records": res.n_latency, "fairness_records": res.n_fairness}))
    else:
        click.echo(f"Wrote {res.index} ({len(res.images)} plots, {res.n_bench} bench, "
                   f"{res.n_latency} latency and {res.n_fairness} fairness records)")


def register(cli: click.Group) -> None:
    cli.add_command(report_cmd)
