"""edge convert: a Hugging Face Llama checkpoint → GGUF."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from edge.convert import OUTTYPES, convert
from edge.errors import ConversionError


@contextmanager
def tensor_progress(enabled: bool, label: str) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich bar fed by (item, done, total) callbacks; None when quiet (no TTY or --json)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # On stderr: stdout stays clean for the result (and for pipes).
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)

        def update(item: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{label} {item}")

        yield update


@click.command("convert")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The GGUF file to write.")
@click.option("--outtype", type=click.Choice(list(OUTTYPES), case_sensitive=False), default="f16",
              show_default=True, help="Weight type of the 2-D tensors (norms stay f32).")
@click.option("--name", default=None, help="general.name to record [default: from config/folder].")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def convert_cmd(hf_dir: str, out: str, outtype: str, name: str | None, force: bool, as_json: bool) -> None:
    """Convert a Hugging Face Llama checkpoint (LlamaForCausalLM / MistralForCausalLM,
    safetensors, single or sharded) into a GGUF file llama.cpp and edge can run.

    Reads config.json, *.safetensors and the tokenizer (tokenizer.model or tokenizer.json
    with tokenizer_config.json), one tensor at a time, so memory stays near the largest
    tensor. Quantize the result further with `edge quantize`.

    \b
    Examples:
      edge convert ./Llama-2-7b-hf -o llama2-7b.f16.gguf
      edge convert ./SmolLM2-135M -o smollm2.f32.gguf --outtype f32 --force
      edge quantize llama2-7b.f16.gguf -o llama2-7b.Q4_K_M.gguf --type Q4_K_M
    """
    try:
        with tensor_progress(not as_json and sys.stderr.isatty(), "converting") as progress:
            result = convert(hf_dir, out, outtype=outtype.lower(), force=force, name=name,
                             progress=progress)
    except KeyboardInterrupt:
        # The contract: an interrupted conversion is an error like any other (exit 2).
        raise ConversionError(f"interrupted (Ctrl-C); {out} was not written") from None
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(f"wrote {result.path}: {result.n_tensors} tensors, {result.n_params:,} parameters, "
               f"{result.outtype}, {result.file_size / 1e6:.1f} MB")
    click.echo(f"tokenizer: {result.tokenizer}, {result.n_vocab} tokens")
    click.echo(f"took {result.seconds:.1f} s, peak memory {result.peak_rss_bytes / 1e6:.0f} MB")


def register(cli: click.Group) -> None:
    cli.add_command(convert_cmd)
