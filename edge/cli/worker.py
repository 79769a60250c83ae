"""edge worker: lend this device's CPU to another edge over llama.cpp's RPC protocol."""

from __future__ import annotations

import click

from edge.rpc import DEFAULT_PORT


@click.command("worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --i-understand-no-auth.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port to listen on (clients name it in --rpc HOST:PORT).")
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads for the work [default: physical cores].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Keep received tensors here, so a restarted client loads faster.")
@click.option("--i-understand-no-auth", "accept_no_auth", is_flag=True,
              help="Allow a non-loopback --host: the RPC protocol has NO authentication.")
def worker_cmd(host: str, port: int, threads: int | None, cache_dir: str | None,
               accept_no_auth: bool) -> None:
    """Run a llama.cpp RPC worker: another device's `edge run/chat/serve --rpc
    HOST:PORT` then puts model layers on this one. Runs until Ctrl-C.

    The RPC protocol has no authentication and lets clients run computations here: bind
    to a non-loopback address only on a network you trust.

    \b
    Examples:
      edge worker                                   # 127.0.0.1:50052 (this machine only)
      edge worker --port 50053 --threads 4
      edge worker --host 192.168.1.21 --i-understand-no-auth   # a Pi in a home cluster
      edge run --rpc 192.168.1.21:50052,192.168.1.22:50052 -p "Hello"   # on the client
    """
    from edge.rpc import check_worker_bind, start_worker

    if check_worker_bind(host, accept_no_auth):
        click.echo(f"WARNING: listening on {host}:{port} with NO authentication: anyone who "
                   "can reach it can use this device. Use it only on a trusted network.", err=True)
    click.echo(f"edge worker: RPC on {host}:{port}; Ctrl-C stops", err=True)
    start_worker(host, port, threads, cache_dir)


def register(cli: click.Group) -> None:
    cli.add_command(worker_cmd)
