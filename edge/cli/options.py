"""Options shared by several commands, validated by click types (exit 2 on bad values)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import click

from edge.runtime import RuntimeConfig
from edge.sampling import Sampling


def model_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("model", required=False, metavar="[MODEL]")(f)


def runtime_options(f: Callable[..., Any]) -> Callable[..., Any]:
    decorators = [
        click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048,
                     show_default=True, help="Context window in tokens (capped at the model's)."),
        click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
                     help="CPU threads [default: physical cores]."),
        click.option("--mlock", is_flag=True, help="Lock the model in RAM (no swapping out)."),
        click.option("--no-mmap", is_flag=True, help="Read the model into RAM instead of mapping it."),
        click.option("--force", "force_memory", is_flag=True,
                     help="Load even if the memory check says the model would swap or run out of memory."),
        click.option("--no-tune", is_flag=True, help="Ignore this device's `edge tune` profile for the model."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
    decorators = [
        click.option("--temp", type=click.FloatRange(0, 10), default=0.8, show_default=True,
                     help="Temperature; 0 is greedy and deterministic."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
                     help="Nucleus sampling: draw from the fewest tokens whose probability sums to P (1 = off)."),
        click.option("--top-k", type=click.IntRange(0), default=40, show_default=True,
                     help="Draw from the K most likely tokens only (0 = off)."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True,
                     help="Drop tokens less likely than P times the most likely one (0 = off)."),
        click.option("--repeat-penalty", type=click.FloatRange(0, 10, min_open=True), default=1.1,
                     show_default=True,
                     help="Penalise tokens among the last 64 generated (1 = off; above 1 repeats less)."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 2), default=None,
                     help="Sampling seed, for repeatable sampled output."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def _parse_rpc(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    from edge.errors import BadOptionError
    from edge.rpc import parse_endpoints

    try:
        return [str(ep) for ep in parse_endpoints(value)]
    except BadOptionError as e:
        raise click.BadParameter(str(e).removeprefix("--rpc ")) from None


def _parse_split(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        shares = [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a list of numbers, e.g. 3,1") from None
    if min(shares) < 0 or sum(shares) <= 0:
        raise click.BadParameter(f"'{value}': shares must be ≥ 0 and not all 0")
    return shares


def rpc_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--rpc HOST:PORT,... and --tensor-split: put the model's layers on `edge worker`s."""
    f = click.option("--tensor-split", metavar="N,N,...", callback=_parse_split, default=None,
                     help="Share of the layers per --rpc worker, e.g. 3,1 [default: by free memory].")(f)
    return click.option("--rpc", metavar="HOST:PORT,...", callback=_parse_rpc, default=None,
                        help="Offload the model's layers to these `edge worker`s.")(f)


def runtime_config(kw: dict[str, Any]) -> RuntimeConfig:
    cfg = RuntimeConfig(n_ctx=kw.pop("n_ctx"), threads=kw.pop("threads"),
                        use_mlock=kw.pop("mlock"), use_mmap=not kw.pop("no_mmap"),
                        rpc=kw.pop("rpc", None), tensor_split=kw.pop("tensor_split", None),
                        check_memory=not kw.pop("force_memory"))
    if cfg.tensor_split and not cfg.rpc:
        raise click.UsageError("--tensor-split splits the layers between --rpc workers; give --rpc too")
    return cfg


def tuned(model: str | None, cfg: RuntimeConfig, kw: dict[str, Any], *,
          sparse_profile: str | None = None) -> tuple[str | None, RuntimeConfig]:
    """This device's `edge tune` profile for MODEL, unless --no-tune (or a setting it cannot
    apply to: RPC workers, the native engine): the file and settings to run, and one line."""
    if kw.pop("no_tune", False) or cfg.rpc or sparse_profile:
        return model, cfg
    from edge.catalog import resolve_model
    from edge.tune.profile import apply_profile

    path, cfg, prof = apply_profile(resolve_model(model), cfg)
    if prof is None:
        return model, cfg
    click.echo(prof.notice(), err=True)
    return str(path), cfg


def sampling(kw: dict[str, Any]) -> Sampling:
    return Sampling(temp=kw.pop("temp"), top_p=kw.pop("top_p"), top_k=kw.pop("top_k"),
                    min_p=kw.pop("min_p"), repeat_penalty=kw.pop("repeat_penalty"),
                    seed=kw.pop("seed"))


CORRECTION_SCALE = click.option("--correction-scale", type=click.FloatRange(-100, 100), default=1.0,
                                show_default=True, help="Multiplier for --correction (1.0 applies it as written).")


def correction_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--correction CVEC.gguf [--correction-scale X]: a bias-correction control vector."""
    f = CORRECTION_SCALE(f)
    return click.option("--correction", type=click.Path(dir_okay=False), default=None,
                        help="Control-vector GGUF added to the residual stream (from `edge bias "
                        "mitigate --method steer`; a corrected model from the other methods is MODEL).")(f)


def parse_since(value: str | None) -> datetime | None:
    """--since DATE → an aware datetime (UTC when no zone is given)."""
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a date; use YYYY-MM-DD or an ISO time") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
