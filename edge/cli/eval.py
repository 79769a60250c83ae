"""edge eval ppl: perplexity, and KL divergence against a base model."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from edge.cli.convert import tensor_progress
from edge.cli.options import model_argument
from edge.evaluate import PerplexityResult, perplexity


@click.group("eval")
def eval_group() -> None:
    """Measure model quality: perplexity, KL divergence against a base model."""


def _render(r: PerplexityResult) -> None:
    click.echo(f"model   {r.model}")
    click.echo(f"text    {r.n_tokens} tokens, {r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored")
    click.echo(f"PPL     {r.ppl:.4f} ± {r.ppl_err:.4f}")
    if r.base is not None:
        click.echo(f"base    {r.base}")
        click.echo(f"PPL(base)          {r.base_ppl:.4f}")
        click.echo(f"ΔPPL               {r.delta_ppl:+.4f}")
        click.echo(f"mean ln(PPL ratio) {r.ln_ppl_ratio:+.5f} ± {r.ln_ppl_ratio_err:.5f}")
        click.echo(f"mean KLD           {r.kld_mean:.6f} ± {r.kld_err:.6f}  "
                   f"(median {r.kld_median:.6f}, 99% {r.kld_p99:.6f}, max {r.kld_max:.6f})")
        click.echo(f"same top-1         {r.top1_agreement:.2%} ± {r.top1_agreement_err:.2%}")
    click.echo(f"took {r.seconds:.1f} s")


@eval_group.command("ppl")
@model_argument
@click.option("--text", "text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text file to score (at least 2 × --ctx tokens).")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=512, show_default=True,
              help="Chunk size in tokens; the second half of each chunk is scored.")
@click.option("--base", default=None, help="Reference model (e.g. the f16 the quant came from): adds "
              "mean KL divergence, top-1 agreement and ΔPPL.")
@click.option("--chunks", "max_chunks", type=click.IntRange(1), default=None,
              help="Score at most this many chunks [default: all].")
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads [default: physical cores].")
@click.option("--sparse-profile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score with R-Sparse (native engine) as it decodes: context half dense, scored "
              "half sparse; the dense PPL and KL of the same run come with it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def ppl_cmd(model: str | None, text: str, n_ctx: int, base: str | None, max_chunks: int | None,
            threads: int | None, sparse_profile: str | None, as_json: bool) -> None:
    """Perplexity of MODEL (a .gguf, a catalog name, or the bundled model) on a text file,
    computed as llama-perplexity does: non-overlapping --ctx chunks, second half scored.

    With --base, also what llama-perplexity's --kl-divergence mode reports: mean KL
    divergence of MODEL from BASE, how often both pick the same top-1 token, and ΔPPL.

    \b
    Examples:
      edge eval ppl --text wiki.test.raw
      edge eval ppl model.Q4_K_M.gguf --text wiki.test.raw --ctx 512 --base model.f16.gguf
      edge eval ppl model.Q4_0.gguf --text notes.txt --json
      edge eval ppl --text docs.txt --sparse-profile smollm2-50.json
    """
    if sparse_profile:
        if base:
            raise click.UsageError("--sparse-profile compares with the dense model itself; drop --base")
        from edge.sparse.evaluate import profile_perplexity

        with open(text, encoding="utf-8", errors="replace") as f:
            sp = profile_perplexity(model, f.read(), sparse_profile, chunk=n_ctx, max_chunks=max_chunks)
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(sp)))
        else:
            click.echo(f"PPL (sparse)       {sp.ppl:.4f}\nPPL (dense, same run) {sp.dense_ppl:.4f}  "
                       f"(× {sp.ppl / sp.dense_ppl:.3f})\nmean KL to dense   {sp.kl:.5f}  "
                       f"over {sp.n_scored} tokens in {sp.n_chunks} chunks")
        return
    with tensor_progress(not as_json and sys.stderr.isatty(), "scoring") as progress:
        r = perplexity(model, text, n_ctx=n_ctx, base=base, threads=threads, max_chunks=max_chunks,
                       progress=progress)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
    else:
        _render(r)


def register(cli: click.Group) -> None:
    cli.add_command(eval_group)
