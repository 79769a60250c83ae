"""Bad input: one line on stderr that says what to do, exit code 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edge.cli import cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "/nonexistent/model.gguf", "-p", "hi"], "no such file"),
        (["run", "no-such-model", "-p", "hi"], "not in the catalog"),
        (["run", "-p", "hi", "-n", "0"], "-n"),
        (["run", "-p", "hi", "--temp", "-1"], "--temp"),
        (["run", "-p", "hi", "--threads", "0"], "--threads"),
        (["run", "-p", "hi", "--threads", "999"], "--threads"),
        (["run", "-p", "hi", "--ctx", "8"], "--ctx"),
        (["run", "-p", "hi", "--top-p", "0"], "--top-p"),
        (["run", "-p", "hi", "-n", "many"], "is not a valid integer"),
        (["chat", "--ctx", "abc"], "--ctx"),
        (["models", "info", "nope"], "not in the catalog"),
        (["models", "pull", "nope"], "not in the catalog"),
        (["logs", "--kind", "weird"], "--kind"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str) -> None:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, (args, res.output)
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    assert needle in res.output
    assert "Traceback" not in res.output


def test_directory_as_model(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["models", "info", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.output


def test_help_teaches_with_examples() -> None:
    for cmd in (["run"], ["chat"], ["models", "pull"], ["logs"]):
        out = CliRunner().invoke(cli, [*cmd, "--help"]).output
        assert "Examples:" in out or "Example:" in out, cmd


def test_every_option_says_what_it_does() -> None:
    # `--help` is the manual: an option without help text leaves the user guessing.
    def walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    bare = [(" ".join(path), p.opts[0]) for path, cmd in walk(cli, [])
            for p in cmd.params if isinstance(p, click.Option) and not p.help and "--help" not in p.opts]
    assert not bare, bare
