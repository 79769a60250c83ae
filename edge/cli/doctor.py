"""edge doctor: check this host, the llama.cpp build and a real inference."""

from __future__ import annotations

import json
import sys

import click

from edge.doctor import FAIL, OK, diagnose


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for bug reports).")
def doctor_cmd(as_json: bool) -> None:
    """Check that edge can run here, and say what to do when it cannot.

    Versions and build features of edge, llama-cpp-python and llama.cpp; the CPU, RAM and
    free disk under EDGE_HOME and EDGE_CACHE; on a Raspberry Pi its model, temperature and
    throttling; and a real test: a 72-token batched prompt and a few generated tokens of the
    bundled model, in a child process, so a crash (SIGILL, SIGSEGV) is reported with the
    command that fixes it. Exit code 0 when nothing FAILs, 1 otherwise.

    \b
    Examples:
      edge doctor
      edge doctor --json > doctor.json     # attach to a bug report
    """
    report = diagnose()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        width = max(len(c.name) for c in report.checks)
        for c in report.checks:
            colour = {OK: "green", FAIL: "red"}.get(c.status, "yellow")
            tag = click.style(f"{c.status:<4}", fg=colour, bold=c.status == FAIL)
            click.echo(f"{tag}  {c.name:<{width}}  {c.summary}")
            if c.fix and c.status != OK:
                click.echo(f"      {'':<{width}}  fix: {c.fix}")
    sys.exit(0 if report.ok else 1)


def register(cli: click.Group) -> None:
    cli.add_command(doctor_cmd)
