"""edge quantize: a GGUF → a smaller GGUF (llama.cpp's llama_model_quantize)."""

from __future__ import annotations

import json
import sys

import click

from edge.quantize import TENSOR_TYPES, list_types, quantize


def _print_types(as_json: bool) -> None:
    rows = list_types()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'type':<10} {'bpw':>6}  {'base':<8} note")
    for r in rows:
        bpw = f"{r['bpw']:.3g}" if r["bpw"] else "?"
        note = r["note"] + ("  [needs an importance matrix]" if r["needs_imatrix"] else "")
        click.echo(f"{r['type']:<10} {bpw:>6}  {r['base']:<8} {note}")
    click.echo("\nbpw: bits per weight of the base type; mixes (_S/_M/_L) keep a few tensors wider, "
               "so whole files land slightly above it.")


@click.command("quantize")
@click.argument("inp", metavar="IN.gguf", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="The quantized GGUF to write.")
@click.option("--type", "qtype", required=True, metavar="TYPE",
              help="llama.cpp file type, e.g. Q4_K_M, Q5_K_M, Q8_0; 'list' shows them all.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight unquantized (better quality).")
@click.option("--pure", is_flag=True, help="Use TYPE for every tensor (no k-quant mixture).")
@click.option("--output-type", type=click.Choice(TENSOR_TYPES, case_sensitive=False), default=None,
              help="Type for output.weight.")
@click.option("--embedding-type", type=click.Choice(TENSOR_TYPES, case_sensitive=False), default=None,
              help="Type for token_embd.weight.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Importance matrix (from `edge imatrix`, or llama-imatrix's .gguf/.dat): better "
                   "low-bit quants; the IQ1/IQ2 types need one.")
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads [default: physical cores].")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's per-tensor log.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def quantize_cmd(inp: str | None, out: str | None, qtype: str, leave_output_tensor: bool, pure: bool,
                 output_type: str | None, embedding_type: str | None, imatrix: str | None,
                 threads: int | None, force: bool, verbose: bool, as_json: bool) -> None:
    """Quantize IN.gguf (f32/f16/bf16 from `edge convert`, or already quantized) to TYPE.

    Measure what it cost with `edge eval ppl OUT --base IN --text FILE`.

    \b
    Examples:
      edge quantize --type list
      edge quantize llama2-7b.f16.gguf -o llama2-7b.Q4_K_M.gguf --type Q4_K_M
      edge quantize model.f16.gguf -o model.Q4_0.gguf --type Q4_0 --pure --output-type Q8_0
      edge imatrix model.f16.gguf -f calib.txt -o imatrix.gguf
      edge quantize model.f16.gguf -o model.IQ2_XS.gguf --type IQ2_XS --imatrix imatrix.gguf
    """
    if qtype.lower() == "list":
        _print_types(as_json)
        return
    if inp is None or out is None:
        raise click.UsageError("give IN.gguf and -o OUT.gguf (or --type list)")
    if not as_json and sys.stderr.isatty():
        click.echo(f"quantizing {inp} to {qtype.upper()} ...", err=True)
    r = quantize(inp, out, qtype=qtype, leave_output_tensor=leave_output_tensor, pure=pure,
                 output_type=output_type, embedding_type=embedding_type, threads=threads,
                 imatrix=imatrix, force=force, verbose=verbose)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"wrote {r.path}: {r.type}, {r.output_size / 1e6:.1f} MB "
               f"({r.output_size / r.input_size:.0%} of {r.input_size / 1e6:.1f} MB), "
               f"{r.bpw:.2f} bits/weight, {r.seconds:.1f} s on {r.threads} threads"
               + (f", importance matrix for {r.imatrix_entries} tensors" if r.imatrix else ""))
    if r.fallback:
        kinds = " and ".join(f"{t} ({n})" for t, n in sorted(r.fallback.items(), key=lambda kv: -kv[1]))
        click.echo(f"note: {sum(r.fallback.values())} tensors have rows that are not a multiple of "
                   f"{r.type}'s block size; llama.cpp stored them as {kinds}", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(quantize_cmd)
