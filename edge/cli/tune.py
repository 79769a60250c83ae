"""edge tune: search this device's fastest configuration of a model within a quality budget."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from edge.cli.options import model_argument


def _table(result: Any) -> str:
    p = result.profile
    rows = [("chosen", p.winner), ("defaults", p.defaults)]
    rows += [(f"runner-up ({o})", e) for o, e in p.runners_up.items()]
    lines = [f"{'':<18} {'tg t/s':>7} {'pp t/s':>7} {'TTFT ms':>8} {'KL':>7} {'KL unseen':>9} {'RAM':>8}  config"]
    for tag, e in rows:
        held = f"{e['kld_heldout']:.4f}" if e.get("kld_heldout") is not None else "-"
        lines.append(f"{tag:<18} {e['tg']:>7.1f} {e['pp']:>7.1f} {e['ttft']:>8.1f} {e['kld']:>7.4f} {held:>9} "
                     f"{e['required_bytes'] / (1 << 20):>6.0f}Mi  {_weights(e)}: "
                     f"t{e['threads']} b{e['n_batch']}/{e['n_ubatch']} KV {e['type_k']} "
                     f"FA {'on' if e['flash_attn'] else 'off'} repack {'on' if e['repack'] else 'off'}"
                     + (" no-mmap" if not e["use_mmap"] else "") + (" mlock" if e["use_mlock"] else ""))
    obj = p.objective
    ratio = p.winner[obj] / p.defaults[obj] if p.defaults[obj] else float("nan")
    if obj == "ttft":
        ratio = 1 / ratio
    lines.append(f"chosen vs defaults on {obj}: {ratio:.2f}x (same run, final round medians)")
    return "\n".join(lines)


def _weights(e: dict[str, Any]) -> str:
    from edge.tune.mix import Mix

    m = Mix.parse(e["quant"])
    return m.describe() if m else e["path"].rsplit("/", 1)[-1]


def _mix_line(m: dict[str, Any]) -> str:
    from edge.tune.mix import Mix

    alone = m["kl"].get(Mix(m["fast"], m["safe"], ()).name)
    head = f"{m['fast']} {alone:.3g}" if alone is not None else m["fast"]
    if not m["chosen"]:
        return f"{head} → none within it ({len(m['kl'])} measured)"
    take = Mix.parse(m["chosen"]).take  # type: ignore[union-attr]
    return f"{head} → {m['kl'][m['chosen']]:.3g} with {', '.join(take)} in {m['safe']}"


@click.command("tune")
@model_argument
@click.option("--objective", type=click.Choice(["tg", "pp", "ttft"]), default="tg", show_default=True,
              help="What to make fast: generation (tg), prompt processing (pp), time to first token.")
@click.option("--max-kld", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True,
              help="Quality budget: mean KL divergence to the source model on held-out text (nats).")
@click.option("--budget-minutes", type=click.FloatRange(0, min_open=True), default=20, show_default=True,
              help="Time for the search; what is not measured by then is not chosen.")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
              help="Context the chosen configuration must fit in RAM (KV cache included).")
@click.option("--quant", "quants", metavar="TYPE,...", default=None,
              help="Quant types to try [default: Q8_0,Q6_K,Q5_K_M,Q5_0,Q4_K_M,Q4_0,Q4_1,IQ4_NL].")
@click.option("-t", "--threads", "threads", metavar="N,...", default=None,
              help="Thread counts to try [default: 1..cores on up to 4 cores].")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text for KL: first half searched, second half held out "
              "[default: Python's documentation].")
@click.option("--kl-chunks", type=click.IntRange(1, 64), default=2, show_default=True,
              help="512-token chunks of the search text per KL measurement (the held-out check uses twice as many).")
@click.option("--cooldown", type=click.FloatRange(20, 100), default=None,
              help="Wait until the SoC is below this °C before each measurement (Pi).")
@click.option("--force", "force_memory", is_flag=True,
              help="Measure candidates even when the memory model says they would not fit.")
@click.option("--no-imatrix", is_flag=True,
              help="Do not also try each quant type made with an importance matrix of the search text.")
@click.option("--no-mix", is_flag=True,
              help="Do not try a fast type that is over --max-kld with its costliest tensors kept in a wider type.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def tune_cmd(model: str | None, objective: str, max_kld: float, budget_minutes: float, n_ctx: int,
             quants: str | None, threads: str | None, text: str | None, kl_chunks: int,
             cooldown: float | None, force_memory: bool, no_imatrix: bool, no_mix: bool,
             as_json: bool) -> None:
    """Find the fastest configuration of MODEL on this device within a quality budget,
    and save it as this device's profile: `edge run/chat/serve` then use it (--no-tune
    ignores it).

    Searches quant type (made from the model's f16/bf16/Q8_0 source, or its f16 copy,
    each with and without an importance matrix of the search text; a type that decodes
    fast but is over --max-kld is also tried with the tensor classes that cost it most
    KL kept in the smallest type within it), threads, batch
    sizes (pp/ttft), KV cache type, flash attention, llama.cpp's weight repack and
    mmap/mlock. Quality is the KL divergence to the source on text the speed
    runs never see; speed is measured as llama-bench does. Candidates the memory model
    says would not fit at --ctx are never loaded. Ctrl-C keeps every finished
    measurement: run the same command again to resume.

    \b
    Examples:
      edge tune                                   # the bundled model, tg, KL ≤ 0.05, 20 min
      edge tune llama2-7b.f16.gguf --budget-minutes 60 --cooldown 60
      edge tune --objective ttft --quant Q8_0,Q4_0 -t 2,4
    """
    from edge.interrupt import InterruptGuard
    from edge.tune import TuneOptions, tune

    opts = TuneOptions(objective=objective, max_kld=max_kld, budget_minutes=budget_minutes, n_ctx=n_ctx,
                       quants=quants.split(",") if quants else None, text=text, cooldown=cooldown,
                       threads=_ints(threads), force_memory=force_memory, kl_chunks=kl_chunks,
                       imatrix=not no_imatrix, mix=not no_mix)
    with InterruptGuard() as guard, _progress(as_json) as on_progress:
        try:
            result = tune(model, opts, progress=on_progress, check=guard.check)
        except KeyboardInterrupt:
            click.echo("\nInterrupted: every finished measurement is in the journal; run the same "
                       "command again to resume.", err=True)
            sys.exit(130)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(_table(result))
    click.echo(f"{result.measured} measurements ({result.reused} reused from the journal), "
               f"{len(result.skipped_memory)} candidates refused by the memory model, quant types over "
               f"--max-kld: {', '.join(result.dropped_quality) or 'none'}"
               + ("; stopped by the budget" if result.stopped_by_budget else "")
               + f"; {result.elapsed_s / 60:.1f} min")
    if result.imatrix_kl:
        def kl(v: float | None) -> str:
            return "-" if v is None else f"{v:.3g}"

        click.echo("KL without → with an importance matrix: "
                   + ", ".join(f"{q} {kl(a)} → {kl(b)}" for q, (a, b) in result.imatrix_kl.items()))
    if result.mixes:
        click.echo(f"mixes (KL target {result.mixes[0]['target']:.3g}): " + "; ".join(_mix_line(m) for m in result.mixes))
    click.echo(f"profile: {result.profile_path}")


def _ints(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a list of integers, e.g. 1,2,4",
                                 param_hint="--threads") from None
    if min(out) < 1:
        raise click.BadParameter("thread counts must be ≥ 1", param_hint="--threads")
    return out


def _progress(quiet: bool) -> Any:
    """A rich progress line on a terminal (stage, what, ETA); nothing otherwise."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar() -> Any:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[eta]}"),
                      TimeElapsedColumn(), console=console, transient=True) as prog:
            task = prog.add_task("tune", total=1, eta="")

            def update(p: Any) -> None:
                eta = f"ETA {p.eta_s / 60:.1f} min" if p.eta_s is not None else ""
                prog.update(task, description=f"{p.stage}: {p.what}"[:70], completed=p.done,
                            total=max(p.total, 1), eta=eta)

            yield update

    return bar()


def register(cli: click.Group) -> None:
    cli.add_command(tune_cmd)
