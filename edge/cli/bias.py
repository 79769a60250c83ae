"""edge bias: audit a model on bias suites; build and judge a correction vector."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from edge.cli.options import model_argument


@click.group("bias")
def bias_group() -> None:
    """Audit a model for social bias, and correct it with a control vector.

    \b
    Examples:
      edge bias audit --suite probes
      edge bias audit --suite crows_pairs:../shared/data/crows_pairs/crows_pairs_anonymized.csv
      edge bias mitigate --suite crows_pairs:PATH -o fair.gguf
    """


@bias_group.command("audit")
@model_argument
@click.option("--suite", "suite_spec", required=True, metavar="NAME[:PATH]",
              help="crows_pairs, bbq, stereoset or probes; PATH is a local file or folder.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N items.")
@click.option("--correction", type=click.Path(dir_okay=False), default=None,
              help="A control-vector GGUF to apply while scoring.")
@click.option("--correction-scale", type=float, default=1.0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for report.html, report.md, results.json [default: ./bias-<suite>].")
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def audit_cmd(model: str | None, suite_spec: str, limit: int | None, correction: str | None,
              correction_scale: float, out_dir: str | None, threads: int | None, as_json: bool) -> None:
    """Score MODEL on a bias suite with llama.cpp log-likelihoods, per category with
    bootstrap 95% CIs; write report.html (plots), report.md and results.json, and log
    one `fairness` record.

    \b
    Examples:
      edge bias audit --suite probes
      edge bias audit --suite bbq:../shared/data/bbq --limit 600 --json
      edge bias audit --suite crows_pairs:crows.csv --correction fair.gguf --out after/
    """
    from bias.run import run_audit

    bar = _bar(as_json)
    with bar or _Null():
        summary = run_audit(model, suite_spec, limit=limit, correction=correction,
                            correction_scale=correction_scale, out_dir=out_dir, threads=threads,
                            on_start=bar.start if bar else None, on_progress=bar.advance if bar else None)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{summary['suite']}: {summary['n_items']} items, {summary['skipped_rows']} malformed "
               f"rows skipped, {summary['score_s']:.1f} s")
    for k, e in summary["overall"].items():
        click.echo(f"  {k:<16} {e['value']:9.4g}  [{e['lo']:.4g}, {e['hi']:.4g}]")
    click.echo(f"report: {summary['report']}")


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


class _Bar:
    """A rich progress bar on a terminal; advance() takes items done."""

    def __init__(self) -> None:
        from rich.progress import Progress

        self.p = Progress(transient=True)
        self.task: Any = None

    def __enter__(self) -> _Bar:
        self.p.__enter__()
        return self

    def __exit__(self, *a: object) -> None:
        self.p.__exit__(*a)

    def start(self, total: int) -> None:
        self.task = self.p.add_task("scoring", total=total)

    def advance(self, k: float) -> None:
        if self.task is not None:
            self.p.advance(self.task, k)


def _bar(as_json: bool) -> _Bar | None:
    return None if as_json or not sys.stderr.isatty() else _Bar()


def register(cli: click.Group) -> None:
    cli.add_command(bias_group)
