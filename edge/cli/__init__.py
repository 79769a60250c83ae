"""The `edge` command: a Click group whose subcommands live one module each."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from edge import __version__
from edge.errors import EdgeError


class EdgeGroup(click.Group):
    """Turns every known failure into one line on stderr and exit code 2.

    Click's usage errors normally print the usage block too; edge prints one line that
    names the --help to read. Unexpected exceptions still raise (with a traceback), so
    friendly messages never hide bugs; EDGE_DEBUG=1 re-raises EdgeErrors too.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name or "edge", complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "edge"
            _fail(f"{e.format_message()} (see '{where} --help')", 2)
        except EdgeError as e:
            if os.environ.get("EDGE_DEBUG"):
                raise
            _fail(str(e), e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `edge logs | head`
            sys.stderr.close()
            sys.exit(0)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, code: int) -> None:
    first = " ".join(message.split())  # one line, whatever the message held
    click.echo(f"Error: {first}", err=True)
    sys.exit(code)


@click.group(cls=EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge")
def cli() -> None:
    """edge: Llama-family models on small devices, with numbers.

    \b
    Quick start (no download: the bundled SmolLM2-135M-Instruct):
      edge chat
      edge run -p "Why is the sky blue?"
      edge models list
      edge logs
    """


def _register() -> None:
    from edge.cli import (
        bench,
        bias,
        chat,
        convert,
        doctor,
        eval,
        imatrix,
        logs,
        models,
        quantize,
        report,
        run,
        serve,
        sparsify,
        tune,
        worker,
    )

    for mod in (run, chat, models, logs, bench, convert, quantize, imatrix, eval, report, sparsify, serve, bias, worker, doctor, tune):
        mod.register(cli)


_register()


def main() -> None:
    cli.main(prog_name="edge")
