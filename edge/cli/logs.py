"""edge logs: the run log as a table."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edge.cli.options import parse_since
from edge.telemetry import KINDS, headline, read_records


@click.command("logs")
@click.option("--kind", type=click.Choice(KINDS), help="Only records of this kind.")
@click.option("--since", help="Only records at or after this date (YYYY-MM-DD).")
@click.option("-n", "--last", type=click.IntRange(1), default=None, help="Only the last N records.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
def logs_cmd(kind: str | None, since: str | None, last: int | None, as_json: bool) -> None:
    """Show the run log: every latency, benchmark and fairness figure edge measured.

    \b
    Examples:
      edge logs --kind latency --since 2026-11-01
      edge logs --json | jq .metrics.gen_tps
    """
    q = read_records(kind, parse_since(since))
    recs = q.records[-last:] if last else q.records
    if as_json:
        for r in recs:
            click.echo(json.dumps(r))
        return
    console = Console()
    n = f"{len(recs)} record{'' if len(recs) == 1 else 's'}"
    rows = [(r["ts"][:19].replace("T", " "), r["kind"],
             Path(r["model"]["path"]).name if (r.get("model") or {}).get("path") else "-",
             str(r.get("config", {}).get("threads", "-")), headline(r)) for r in recs]
    if console.width < 120:  # a table's figures column would be a few words wide: two lines a record
        console.print(f"edge logs ({n}; times UTC)", highlight=False)
        for when, what, model, threads, figures in rows:
            on = "" if threads == "-" else f"  {threads} thread{'' if threads == '1' else 's'}"
            console.print(f"{when}  {what:<8}  {model}{on}\n    {figures}", highlight=False)
    else:
        table = Table(title=f"edge logs ({n})", title_justify="left")
        for col in ("time (UTC)", "kind", "model", "threads", "figures"):
            table.add_column(col, no_wrap=col != "figures")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if q.skipped_lines:
        click.echo(f"({q.skipped_lines} unreadable lines skipped)", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(logs_cmd)
