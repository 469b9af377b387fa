"""`gpupool` command line: a thin layer over the server, client and launcher modules."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="gpupool",
    help="Pool the GPUs of many machines; run unmodified PyTorch programs on them.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def server(
    listen: str = typer.Option("127.0.0.1:7777", help="HOST:PORT to accept sessions on (port 0: any free port)."),
    token: str = typer.Option(..., envvar="GPUPOOL_TOKEN", help="Clients must present this token."),
    memory_limit: str = typer.Option(
        None, help="Memory cap per session, e.g. 4GiB (default: the whole device's memory)."
    ),
    cpu_gpus: int = typer.Option(
        None,
        help="Serve N CPU-backed devices instead of this host's GPUs (the default on a host without a GPU is 1).",
    ),
    cpu_gpu_memory: str = typer.Option("8GiB", help="Memory each CPU-backed device offers."),
) -> None:
    """Serve this host's GPUs (or CPU-backed devices) to gpupool clients.

    Each session runs in its own worker process pinned to one device; when the client ends or
    dies, the worker exits and all its memory is freed.
    """
    from gpupool.server.__main__ import serve

    try:
        serve(listen, token, memory_limit, cpu_gpus, cpu_gpu_memory)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    server: str = typer.Option(None, envvar="GPUPOOL_SERVER", help="HOST:PORT of a gpupool server."),
    token: str = typer.Option("", envvar="GPUPOOL_TOKEN", help="The server's token."),
) -> None:
    """Run CMD with its "cuda" device on a pooled GPU:  gpupool run --server H:P --token T -- python train.py

    Every Python process CMD starts gets the gpupool client installed before user code runs:
    "cuda" tensors, torch.cuda.* and torch.accelerator land on the remote GPU.
    """
    cmd = list(ctx.args)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        typer.echo("gpupool run: no command given (usage: gpupool run --server H:P -- CMD ...)", err=True)
        raise typer.Exit(2)
    if not server:
        typer.echo("gpupool run: no server given: pass --server HOST:PORT or set GPUPOOL_SERVER", err=True)
        raise typer.Exit(2)
    from gpupool.launcher import run_command

    raise typer.Exit(run_command(cmd, server, token))


@app.command()
def version() -> None:
    """Print gpupool's version and protocol version."""
    from gpupool import __version__
    from gpupool.protocol.version import PROTOCOL_VERSION

    typer.echo(f"gpupool {__version__} (protocol {PROTOCOL_VERSION})")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
