"""edge imatrix: llama.cpp's importance matrix of a model on a text, for `edge quantize --imatrix`."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from edge.cli.convert import tensor_progress
from edge.cli.options import model_argument


@click.command("imatrix")
@model_argument
@click.option("-f", "--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text (plain UTF-8): prose like what the model will read, tens of thousands of tokens.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The imatrix GGUF to write.")
@click.option("--ctx", "n_ctx", type=click.IntRange(32, 1 << 16), default=512, show_default=True,
              help="Tokens per chunk (each chunk starts afresh with BOS, as llama-imatrix does).")
@click.option("--chunks", type=click.IntRange(1), default=None,
              help="Use at most this many chunks [default: the whole text].")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix leaves it out).")
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads [default: physical cores].")
@click.option("--force", is_flag=True,
              help="Overwrite OUT if it exists, and load the model even when the memory check says it would not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def imatrix_cmd(model: str | None, text_file: str, out: str, n_ctx: int, chunks: int | None,
                process_output: bool, threads: int | None, force: bool, as_json: bool) -> None:
    """Compute MODEL's importance matrix on a text: the mean square of every weight
    matrix's inputs, per input channel, as llama.cpp's llama-imatrix does. Quantizing
    with it (`edge quantize --imatrix`) puts the rounding error where inputs are small;
    the IQ1/IQ2 types and Q2_K_S need one. Calibrate on other text than the text you
    will measure quality on, or the measurement flatters it.

    \b
    Examples:
      edge imatrix model.f16.gguf -f calib.txt -o model.imatrix.gguf
      edge quantize model.f16.gguf -o model.IQ4_XS.gguf --type IQ4_XS --imatrix model.imatrix.gguf
      edge eval ppl model.IQ4_XS.gguf --text held-out.txt --base model.f16.gguf
    """
    from edge.catalog import resolve_model
    from edge.imatrix import collect_imatrix
    from edge.interrupt import InterruptGuard

    text = Path(text_file).read_text(encoding="utf-8", errors="replace")  # click checked it exists
    with InterruptGuard() as guard, tensor_progress(not as_json and sys.stderr.isatty(), "chunk") as bar:
        progress = (lambda d, n: bar("", d, n)) if bar else None
        try:
            r = collect_imatrix(resolve_model(model), text, out, n_ctx=n_ctx, max_chunks=chunks, threads=threads,
                                include_output=process_output, dataset=Path(text_file).name, force=force,
                                force_memory=force, progress=progress, check=guard.check)
        except KeyboardInterrupt:
            click.echo("\nInterrupted before the first chunk finished: nothing written.", err=True)
            sys.exit(130)
    if as_json:
        click.echo(json.dumps(asdict(r)))
        return
    click.echo(f"wrote {r.path}: {r.entries} tensors, {r.chunks} chunks of {r.chunk_size} tokens "
               f"({r.tokens:,} tokens) in {r.seconds:.1f} s")
    if r.interrupted:
        click.echo(f"interrupted: the matrix holds the {r.chunks} chunks finished; rerun for the whole text",
                   err=True)
        sys.exit(130)


def register(cli: click.Group) -> None:
    cli.add_command(imatrix_cmd)
