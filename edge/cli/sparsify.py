"""edge sparsify: an R-Sparse activation-sparsity profile for the native engine."""

from __future__ import annotations

import json
import sys

import click

from edge.cli.convert import tensor_progress
from edge.cli.options import model_argument
from edge.sparse.sparsify import METHODS, sparsify


@click.command("sparsify")
@model_argument
@click.option("--sparsity", type=float, required=True,
              help="Model-level sparsity in [0, 0.95]: share of projection weight reads skipped.")
@click.option("--calib", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text file (plain UTF-8, a few thousand words).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Profile JSON to write.")
@click.option("--search", "method", type=click.Choice(METHODS), default="greedy", show_default=True,
              help="Allocation search across modules.")
@click.option("--budget-minutes", type=click.FloatRange(0, 24 * 60), default=5.0, show_default=True,
              help="Time for the evolutionary search (after its greedy start).")
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="Exact-channel share for --search uniform (1 = TEAL-style, <1 adds low rank).")
@click.option("--no-lowrank", is_flag=True, help="Search α = 1 only (no SVD needed).")
@click.option("--calib-tokens", type=click.IntRange(64, 1 << 20), default=1024, show_default=True,
              help="Calibration tokens used at most.")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="Also write llama.cpp's importance matrix (GGUF) from the same pass.")
@click.option("--weights", type=click.Choice(["q8", "q4"]), default=None,
              help="Also build quantized rows (8.5 or 4.5 bits/weight, cached under EDGE_CACHE) "
                   "and run the profile on them: faster than the f32 engine, no f32 copy in memory.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def sparsify_cmd(model: str | None, sparsity: float, calib: str, out: str, method: str,
                 budget_minutes: float, alpha: float, no_lowrank: bool, calib_tokens: int,
                 imatrix: str | None, weights: str | None, force: bool, as_json: bool) -> None:
    """Make a sparsity profile for MODEL: calibrate activation statistics on --calib,
    search a per-module (s, α) allocation minimising KL to the dense model, and write
    the profile (tied to this model's sha). Run it with `edge run --sparse-profile`.

    \b
    Examples:
      edge sparsify --sparsity 0.5 --calib notes.txt -o smol-50.json
      edge sparsify --sparsity 0.4 --calib notes.txt -o teal-40.json --search uniform
      edge sparsify m.gguf --sparsity 0.5 --calib c.txt -o p.json --search evolutionary --budget-minutes 10
      edge sparsify --sparsity 0.5 --calib notes.txt -o q8-50.json --weights q8
      edge run --sparse-profile smol-50.json -p "Hello" --temp 0
    """
    with tensor_progress(not as_json and sys.stderr.isatty(), "") as bar:
        progress = (lambda stage, d, n: bar(stage, d, n)) if bar else None
        r = sparsify(model, sparsity=sparsity, calib=calib, out=out, method=method,
                     budget_minutes=budget_minutes, alpha=alpha, lowrank=not no_lowrank,
                     max_calib_tokens=calib_tokens, imatrix=imatrix, force=force, weights=weights,
                     progress=progress)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"wrote {r.profile}: {r.sparsity:.1%} model-level sparsity ({r.search} search, "
               f"{r.n_lowrank_modules} modules with a low-rank term)")
    click.echo(f"KL to dense on the calibration text: {r.kl:.4f} nats/token "
               f"(uniform TEAL-style at the same sparsity: {r.uniform_kl:.4f})")
    if r.imatrix:
        click.echo(f"wrote {r.imatrix} (importance matrix)")
    if r.rows:
        q = r.rows
        click.echo(f"{'built' if q['built'] else 'reused'} {q['path']}: {q['weights']} rows, "
                   f"{q['bits_per_weight']:.2f} bits/weight, worst tensor {q['worst_tensor']} "
                   f"(relative RMS error {q['worst_error']:.4f})")
    click.echo(f"{r.calib_tokens} calibration tokens, {r.n_evals} evaluations, {r.seconds:.1f} s")


def register(cli: click.Group) -> None:
    cli.add_command(sparsify_cmd)
