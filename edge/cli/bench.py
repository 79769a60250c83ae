"""edge bench: pp / tg / TTFT / memory / temperature sweeps; `edge bench compare A B`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge.cli.options import rpc_option
from edge.system import default_threads


class ThreadList(click.ParamType):
    """'1,2,4' → [1, 2, 4], each 1..256."""

    name = "N[,N...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            try:
                n = int(part.strip())
            except ValueError:
                self.fail(f"'{part.strip()}' is not a whole number; use e.g. --threads 1,2,4", param, ctx)
            if not 1 <= n <= 256:
                self.fail(f"{n} is out of range; use 1 to 256 threads", param, ctx)
            out.append(n)
        return out


def _pm(mean: float | None, std: float | None, fmt: str = "{:.1f}") -> str:
    if mean is None:
        return "-"
    return f"{fmt.format(mean)}±{fmt.format(std or 0)}"


def _temp(m: dict[str, Any]) -> str:
    b = (m.get("state_before") or {}).get("temp_c")
    a = (m.get("state_after") or {}).get("temp_c")
    if a is None and b is None:
        return "-"
    return f"{b if b is not None else '?'}→{a if a is not None else '?'}"


def _throttle(v: bool | None) -> str:
    return {True: "[bold red]YES[/]", False: "no", None: "n/a"}[v]


def _console() -> Console:
    # Off a terminal rich assumes 80 columns and wraps every cell; a log file has room.
    c = Console()
    return c if c.is_terminal else Console(width=180)


def _model_label(model: dict[str, Any]) -> str:
    name = model.get("name") or ""
    return name if name and len(name) <= 28 else Path(str(model.get("path"))).stem


def _table(records: list[dict[str, Any]], title: str, width: int = 180) -> Table:
    # Numbers never wrap; on a narrow terminal the model name gives way first.
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("model", overflow="ellipsis", no_wrap=True, max_width=max(10, width - 70))
    t.add_column("quant", no_wrap=True, min_width=4)
    # short headers so a sweep fits 80 columns; units in the caption
    for col in ("thr", "pp t/s", "tg t/s", "TTFT", "load", "RSS", "°C", "thrtl"):
        t.add_column(col, justify="right", no_wrap=True)
    t.caption = "mean±std over reps; TTFT and load in ms, peak RSS in MiB, °C before→after"
    t.caption_justify = "left"
    for r in records:
        m, model = r["metrics"], r.get("model") or {}
        t.add_row(_model_label(model), str(model.get("quant")), str(r["config"].get("threads")),
                  _pm(m["pp_tps"], m["pp_tps_std"]), _pm(m["tg_tps"], m["tg_tps_std"]),
                  _pm(m["ttft_ms"], m["ttft_ms_std"], "{:.0f}"), f"{m['load_ms']:.0f}",
                  f"{m['peak_rss_bytes'] / 2**20:.0f}", _temp(m), _throttle(m.get("throttled")))
    return t


class _BenchCommand(click.Command):
    """`edge bench compare …` goes to the compare command; anything else is a sweep."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if args and args[0] == "compare":
            return compare_cmd.make_context(f"{info_name} compare", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("bench", cls=_BenchCommand)
@click.argument("models", nargs=-1, metavar="[MODEL ...]")
@click.option("-t", "--threads", type=ThreadList(), default=None,
              help="Thread counts to test, comma-separated [default: physical cores].")
@click.option("--pp", "n_prompt", type=click.IntRange(1, 1 << 16), default=128, show_default=True,
              help="Prompt tokens per pp test.")
@click.option("--tg", "n_gen", type=click.IntRange(1, 1 << 16), default=64, show_default=True,
              help="Generated tokens per tg test.")
@click.option("--reps", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Timed repetitions (mean ± std).")
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True,
              help="Untimed warm-up runs per test.")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=512, show_default=True,
              help="Context size of the benchmark context.")
@click.option("--cooldown", "cooldown_c", type=click.FloatRange(0, 150, min_open=True), default=None,
              help="Wait until the SoC is below this many °C before each test.")
@click.option("--cooldown-timeout", type=click.FloatRange(0), default=600, show_default=True,
              help="Seconds to wait for --cooldown before running anyway (flagged).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the records to FILE (.jsonl, or .csv).")
@rpc_option
@click.option("--engine", type=click.Choice(["llama", "native"]), default="llama", show_default=True,
              help="llama.cpp, or edge's own numpy engine (dense, or sparse with --sparse-profile).")
@click.option("--sparse-profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="R-Sparse profile from `edge sparsify` for native decode (prefill stays dense).")
@click.option("--no-tune", is_flag=True, help="Ignore this device's `edge tune` profile for the models.")
@click.option("--force", "force_memory", is_flag=True,
              help="Run even if the memory check says a model would swap or run out of memory at --ctx.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as one JSON object.")
def bench_cmd(models: tuple[str, ...], threads: list[int] | None, as_json: bool,
              cooldown_timeout: float, no_tune: bool, force_memory: bool, **kw: Any) -> None:
    """Benchmark MODELs (GGUF paths or catalog names; the bundled model when omitted):
    prompt processing (pp) and generation (tg) tokens/s, time to first token, load time
    and peak memory, mean ± std over --reps, measured the way llama-bench measures them.

    TTFT is the pp decode plus picking the first token; peak RSS is the edge
    process's high-water mark so far. The device is probed before and after each test (temperature, frequency, governor,
    Raspberry Pi throttle flags); a test that throttled is flagged. Each test is logged
    as a `bench` record in the run log; Ctrl-C keeps the tests already finished.

    \b
    Examples:
      edge bench --threads 1,2,4
      edge bench model-q4_0.gguf model-q8_0.gguf --pp 128 --tg 64 --reps 5 --out pi5.jsonl
      edge bench --cooldown 50 --json
      edge bench compare last-week.jsonl today.jsonl
      edge bench --rpc 192.168.1.21:50052,192.168.1.22:50052   # + which layers went where
      edge bench --engine native --pp 64 --tg 32 -t 2
      edge bench --engine native --sparse-profile p50.json   # R-Sparse decode, dense prefill
    """
    from edge.bench.runner import BenchConfig, run_bench

    cfg = BenchConfig(models=list(models) or [None], threads=threads or [default_threads()],
                      threads_default=threads is None, tune=not no_tune, check_memory=not force_memory,
                      cooldown_timeout_s=cooldown_timeout, **kw)
    finished: list[dict[str, Any]] = []
    show_progress = not as_json and sys.stdout.isatty()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=True, disable=not show_progress)
    task = progress.add_task("bench", total=None)

    def on_progress(what: str, done: int, total: int) -> None:
        progress.update(task, description=what, completed=done, total=total)

    try:
        with progress:
            result = run_bench(cfg, on_progress=on_progress, on_test=lambda t: finished.append(t.record),
                               on_notice=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        if finished and not as_json:
            con = _console()
            con.print(_table(finished, f"edge bench {cfg.test_name}{_engine_label(finished)} (interrupted)", con.width))
        where = f" and {cfg.out}" if cfg.out and finished else ""
        click.echo(f"\n{len(finished)} finished test(s) kept in the run log{where}.", err=True)
        raise
    if as_json:
        click.echo(json.dumps({"run_id": result.run_id, "tests": result.records}))
        return
    con = _console()
    title = f"edge bench {cfg.test_name} ×{cfg.reps}{_engine_label(result.records)} (run {result.run_id})"
    con.print(_table(result.records, title, con.width))
    if cfg.rpc:
        _print_split(con, result.records)
    if cfg.out:
        click.echo(f"Wrote {len(result.records)} record(s) to {cfg.out}")


def _engine_label(records: list[dict[str, Any]]) -> str:
    """' · native engine, sparse 50% (p50.json)' for native runs; '' for llama.cpp (as before)."""
    cfg = records[0]["config"] if records else {}
    if cfg.get("engine", "llama") == "llama":
        return ""
    prof = cfg.get("sparse_profile")
    how = f"sparse {prof['sparsity']:.0%} ({Path(prof['path']).name})" if prof else "dense"
    return escape(f" · {cfg['engine']} engine, {how}")  # a file name is not rich markup


def _print_split(con: Console, records: list[dict[str, Any]]) -> None:
    """The RPC split of each model benchmarked: layers and bytes per worker."""
    seen = set()
    for rec in records:
        split, name = rec["metrics"].get("rpc_split"), (rec.get("model") or {}).get("path")
        if not split or name in seen:
            continue
        seen.add(name)
        t = Table(title=f"RPC split of {Path(name or '?').name}", title_justify="left",
                  box=box.SIMPLE)
        for col in ("worker", "device", "layers", "weights MiB"):
            t.add_column(col)
        for w in split["workers"]:
            ls = w["layers"]
            t.add_row(w["endpoint"], w["device"], f"{ls[0]}-{ls[-1]} ({len(ls)})" if ls else "-",
                      f"{w['model_bytes'] / 2**20:.1f}")
        local = sum(v.get("model", 0) for v in split["local_buffers"].values())
        t.add_row("this device", "CPU", "-", f"{local / 2**20:.1f}")
        con.print(t)


def _ratio(r: float | None) -> str:
    if r is None:
        return "-"
    colour = "green" if r >= 1.02 else "red" if r <= 0.98 else "white"
    return f"[{colour}]{r:.3f}×[/]"


@click.command("compare")
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare_cmd(a: Path, b: Path, as_json: bool) -> None:
    """Compare two `edge bench --out` files: the tests both ran (same model, quant,
    threads, pp, tg) side by side, with B/A ratios (> 1: B is faster; for TTFT, slower).

    \b
    Examples:
      edge bench compare pi4.jsonl pi5.jsonl
      edge bench compare before.jsonl after.jsonl --json
    """
    from edge.bench.compare import compare

    c = compare(a, b)
    if as_json:
        click.echo(json.dumps(c.to_dict()))
        return
    t = Table(title=f"A = {a}   B = {b}", title_justify="left")
    for col in ("model", "quant", "threads", "test", "pp A", "pp B", "pp B/A", "tg A", "tg B",
                "tg B/A", "TTFT B/A", "throttled A/B"):
        t.add_column(col)
    for r in c.rows:
        t.add_row(r.model, r.quant, str(r.threads), f"pp{r.n_prompt}+tg{r.n_gen}",
                  f"{r.a_pp_tps:.2f}", f"{r.b_pp_tps:.2f}", _ratio(r.pp_ratio), f"{r.a_tg_tps:.2f}",
                  f"{r.b_tg_tps:.2f}", _ratio(r.tg_ratio), _ratio(r.ttft_ratio),
                  f"{_throttle(r.a_throttled)}/{_throttle(r.b_throttled)}")
    _console().print(t)
    for label, keys in (("only in A", c.only_a), ("only in B", c.only_b)):
        for k in keys:
            click.echo(f"{label}: {k[0]} {k[1]} threads={k[2]} pp{k[3]}+tg{k[4]}")


def register(cli: click.Group) -> None:
    cli.add_command(bench_cmd)
