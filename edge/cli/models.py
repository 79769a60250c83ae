"""edge models list | info | pull."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from edge.catalog import load_catalog, resolve_model
from edge.gguf_file import inspect


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@click.group("models")
def models() -> None:
    """List, inspect and download models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_cmd(as_json: bool) -> None:
    """Show the catalog: the bundled model and the GGUFs `edge models pull` fetches.

    Add your own entries in $EDGE_HOME/catalog.toml (same format as models/catalog.toml).
    """
    from edge.memory.checks import catalog_fits

    entries = load_catalog()
    fits = catalog_fits()
    rows = [{"name": e.name, "params": e.params, "quant": e.quant, "size": e.size,
             "available": e.available, "default": e.default, "path": str(e.local_path),
             "fits": fits[e.name].status, "needs_bytes": fits[e.name].needed,
             "max_ctx": fits[e.name].max_ctx,
             "license": e.license, "description": e.description} for e in entries.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    # the figures need ~80 columns: on a narrower terminal the descriptions go below the
    # table, whole, instead of being squeezed into a column a few letters wide
    inline = console.width >= 120
    table = Table(title="edge models (fits: RAM needed at --ctx 2048 against what is available here)",
                  title_justify="left")
    for col in ("name", "params", "quant", "size", "here", "fits", *(("description",) if inline else ())):
        table.add_column(col, no_wrap=col != "description")
    for r in rows:
        here = "bundled" if r["default"] else ("yes" if r["available"] else "pull")
        table.add_row(r["name"], r["params"], r["quant"], _size(r["size"]), here, _fits_cell(r),
                      *((r["description"],) if inline else ()))
    console.print(table)
    if not inline:
        for r in rows:
            console.print(f"[bold]{r['name']}[/bold]: {r['description']}", highlight=False)


def _fits_cell(r: dict) -> str:
    need = f"{r['needs_bytes'] / (1 << 30):.1f}G"
    if r["fits"] == "fits":
        return f"yes {need}"
    if r["fits"] == "unknown":
        return "?"
    ctx = f" ctx≤{r['max_ctx']}" if r["max_ctx"] else ""
    return f"no ({r['fits']}) {need}{ctx}"


@models.command("info")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def info_cmd(model: str | None, as_json: bool) -> None:
    """Show what a GGUF holds: architecture, size, quant type, context, layers, template.

    \b
    Examples:
      edge models info                      # the bundled model
      edge models info ./my-model.Q4_K_M.gguf
    """
    info = inspect(resolve_model(model))
    s = info.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    labels = [("path", s["path"]), ("name", s["name"]), ("architecture", s["arch"]),
              ("parameters", f"{s['params']:,} ({s['params'] / 1e6:.0f}M)"), ("quant type", s["quant"]),
              ("context length", s["context_length"]), ("layers", s["n_layers"]),
              ("embedding size", s["n_embd"]), ("heads / kv heads", f"{s['n_head']} / {s['n_head_kv']}"),
              ("feed-forward", s["n_ff"]), ("vocabulary", s["n_vocab"]),
              ("chat template", "yes" if s["chat_template"] else "no (Llama-2 [INST] fallback)"),
              ("file size", f"{s['file_size']:,} bytes ({_size(s['file_size'])})"),
              ("sha256 (16 MiB+size)", s["fingerprint"])]
    if s.get("imatrix"):
        im = s["imatrix"]
        labels.insert(5, ("importance matrix", f"{im.get('file', '?')} ({im.get('entries_count', '?')} tensors, "
                                               f"{im.get('chunks_count', '?')} chunks of {im.get('dataset', '?')})"))
    width = max(len(k) for k, _ in labels)
    for k, v in labels:
        click.echo(f"{k:<{width}}  {v}")


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download even if the memory check says it will not fit here.")
def pull_cmd(name: str, force: bool) -> None:
    """Download catalog model NAME into $EDGE_HOME/models/, checking size and sha256.

    First checks, from the catalog's shape and quant type, that the model fits this
    device's available RAM at --ctx 2048; one that cannot is refused before any byte is
    fetched (exit 2), with the largest context that would fit. An interrupted pull
    resumes where it stopped when run again.

    \b
    Example:
      edge models pull llama2-7b-chat-q4km
      edge models pull llama2-7b-chat-q8_0 --force   # try it even though it will swap
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from edge.memory.checks import pull_checked

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), disable=not Console(stderr=True).is_terminal,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(f"pull {name}", total=None)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        r = pull_checked(name, force=force, progress=progress)
    if not r.verdict.fits:
        click.echo(f"warning (--force): {r.verdict.message(name)}", err=True)
    click.echo(f"{r.path}\nsha256 {r.digest}")


def register(cli: click.Group) -> None:
    cli.add_command(models)
