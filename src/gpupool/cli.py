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
    token: str = typer.Option(..., envvar="GPUPOOL_TOKEN", help="Clients must present this token (prefer the GPUPOOL_TOKEN variable: flags show in `ps`)."),
    memory_limit: str = typer.Option(
        None, help="Memory cap per session, e.g. 4GiB (default: the whole device's memory)."
    ),
    cpu_gpus: int = typer.Option(
        None,
        help="Serve N CPU-backed devices instead of this host's GPUs (the default on a host without a GPU is 1).",
    ),
    cpu_gpu_memory: str = typer.Option("8GiB", help="Memory each CPU-backed device offers."),
    controller: str = typer.Option(
        None, envvar="GPUPOOL_CONTROLLER",
        help="Pool mode: register with this controller (then --token is this server's controller token, and clients present signed leases).",
    ),
    name: str = typer.Option(None, help="Name at the controller (default HOST:PORT)."),
    advertise: str = typer.Option(None, help="HOST:PORT clients should connect to (default: the listen address)."),
    handshake_timeout: float = typer.Option(None, help="Seconds a connecting client has to say hello."),
    idle_timeout: float = typer.Option(
        None, help="Seconds a session may send nothing before it is ended (default 1800; 0: never). "
                   "Running its own ops, however long, is not idle."),
    tls_cert: str = typer.Option(None, help="TLS certificate (PEM, chain) for the data plane; "
                                            "re-read when the file changes."),
    tls_key: str = typer.Option(None, help="The certificate's private key (PEM)."),
    insecure: bool = typer.Option(
        False, "--insecure",
        help="Listen off loopback without TLS: tokens and tensors cross the network in clear."),
    no_sandbox: bool = typer.Option(
        False, "--no-sandbox",
        help="Debugging only: run session workers without their sandbox (Landlock, seccomp), so "
             "a kernel exploited by a hostile client could reach this host's files and network.",
    ),
) -> None:
    """Serve this host's GPUs (or CPU-backed devices) to gpupool clients.

    The sessions of one lease on one device run in one worker process, which can open no files,
    sockets or processes (see docs/security.md); when the last of them ends, or every client
    died, the worker exits and all its memory is freed.
    """
    from gpupool.server.__main__ import Tls, serve

    if no_sandbox:
        import os

        os.environ["GPUPOOL_SANDBOX"] = "off"

    try:
        serve(listen, token, memory_limit, cpu_gpus, cpu_gpu_memory, handshake_timeout,
              controller=controller, name=name, advertise=advertise, idle_timeout=idle_timeout,
              tls=Tls(tls_cert, tls_key, insecure))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


RUN_HELP = """Run CMD on pooled GPUs:  gpupool run -n 1 -p 0.5 -- python train.py

Pool mode (the default): requests a lease from the controller (waiting in the queue up to
--wait seconds, showing its place), renews it in the background while CMD runs, and releases it
when CMD exits, on Ctrl-C and on SIGTERM. A lease written by `gpupool request` in this directory
is used instead when no -n/-p/-m is given (and is not released).

Direct mode (--server HOST:PORT --token T): no controller; connect to that server.

Every Python process CMD starts gets the gpupool client installed before user code runs:
"cuda" tensors, torch.cuda.* and torch.accelerator land on the pooled GPUs.
"""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, help=RUN_HELP)
def run(
    ctx: typer.Context,
    n: int = typer.Option(None, "-n", "--gpus", help="Number of GPUs (default 1)."),
    p: float = typer.Option(None, "-p", "--fraction", help="Share of each GPU's memory, e.g. 0.5."),
    m: str = typer.Option(None, "-m", "--memory", help="Memory of each GPU, e.g. 20GiB."),
    filters: list[str] = typer.Option([], "--filter", help="model=H200, kind=cuda|cpu, server=NAME, min-memory=40GiB, or a label KEY=VALUE."),
    wait: float = typer.Option(3600.0, "--wait", help="Seconds to wait in the queue; 0: fail at once if no capacity."),
    ttl: float = typer.Option(None, "--ttl", help="Lease time to live in seconds (renewed while CMD runs)."),
    spread: bool = typer.Option(False, "--spread", help="Prefer idle GPUs instead of packing."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER", help="Controller URL (default: the local `gpupool up`)."),
    server: str = typer.Option(None, "--server", envvar="GPUPOOL_SERVER", help="Direct mode: HOST:PORT of a gpupool server."),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN", help="Your token (controller token, or the server's in direct mode)."),
) -> None:
    cmd = list(ctx.args)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        _fail("no command given (usage: gpupool run [-n N] [-p F] -- CMD ...)", 2)
    from gpupool.launcher import run_command

    if server:
        raise typer.Exit(run_command(cmd, server, token or ""))
    from gpupool import poolcmd

    raise typer.Exit(poolcmd.run_in_pool(cmd, controller, token, n, p, m, filters, wait, ttl, spread))


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"gpupool: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def controller(
    listen: str = typer.Option("127.0.0.1:7700", help="HOST:PORT for the HTTP API (port 0: any free port)."),
    db: str = typer.Option(None, help="SQLAlchemy URL (default: SQLite under $GPUPOOL_HOME)."),
    key_file: str = typer.Option(None, help="The lease signing key's file, mode 0600 (default: beside a SQLite database, else under $GPUPOOL_HOME)."),
    init: bool = typer.Option(False, "--init", help="Create an admin token and print it once."),
    admin_token: str = typer.Option(None, envvar="GPUPOOL_ADMIN_TOKEN", help="Make sure this admin token exists."),
    heartbeat_interval: float = typer.Option(5.0, help="Seconds between server heartbeats (3 missed: server down)."),
    sweep_interval: float = typer.Option(1.0, help="Seconds between checks of liveness, lease expiry and queue deadlines."),
    default_ttl: float = typer.Option(600.0, help="Lease time to live when a request gives none (seconds)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log a line per HTTP request (off: it costs as much as a health check)."),
    max_body: int = typer.Option(64 * 1024, help="Largest request body accepted, in bytes (413 beyond)."),
    rate_limit: float = typer.Option(50.0, help="Requests a second per token; admin tokens are exempt (429 beyond)."),
    rate_burst: int = typer.Option(200, help="Requests a token may send at once above --rate-limit."),
    tls_cert: str = typer.Option(None, help="TLS certificate (PEM chain) for HTTPS; re-read when the file changes."),
    tls_key: str = typer.Option(None, help="The certificate's private key (PEM)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP off loopback: tokens cross the network in clear."),
) -> None:
    """Run the pool controller: inventory, scheduler, queue and leases, over HTTP/JSON (OpenAPI at /docs)."""
    from gpupool.controller.__main__ import main as controller_main

    argv = ["--listen", listen]
    if db:
        argv += ["--db", db]
    if key_file:
        argv += ["--key-file", key_file]
    if init:
        argv.append("--init")
    if admin_token:
        argv += ["--admin-token", admin_token]
    argv += ["--heartbeat-interval", str(heartbeat_interval), "--sweep-interval", str(sweep_interval),
             "--default-ttl", str(default_ttl), "--max-body", str(max_body), "--rate-limit", str(rate_limit),
             "--rate-burst", str(rate_burst)] + (["--access-log"] if access_log else [])
    if tls_cert:
        argv += ["--tls-cert", tls_cert]
    if tls_key:
        argv += ["--tls-key", tls_key]
    if insecure:
        argv.append("--insecure")
    controller_main(argv)


@app.command()
def up(
    cpu_gpus: int = typer.Option(None, help="Offer N CPU-backed GPUs (default: this host's GPUs, or 1 CPU-backed GPU if it has none)."),
    cpu_gpu_memory: str = typer.Option("8GiB", help="Memory of each CPU-backed GPU."),
    listen: str = typer.Option("127.0.0.1:0", help="Controller HOST:PORT (port 0: any free port)."),
    server_listen: str = typer.Option("127.0.0.1:0", help="Data-plane HOST:PORT of the GPU server."),
    db: str = typer.Option(None, help="SQLAlchemy URL (default: SQLite under $GPUPOOL_HOME)."),
) -> None:
    """A whole pool on this machine, in the foreground: a controller and one GPU server.

    Records its URL and admin token under $GPUPOOL_HOME, so `gpupool run/list/status/...` on this
    machine need no flags. Ctrl-C stops it.
    """
    from gpupool import poolcmd

    poolcmd.up(cpu_gpus, cpu_gpu_memory, listen, server_listen, db)


@app.command()
def cert(
    names: list[str] = typer.Argument(..., help="Host names and addresses clients reach the server by."),
    out: str = typer.Option("server", "--out", "-o", help="Files to write: OUT.pem and OUT-key.pem."),
) -> None:
    """Issue a TLS certificate from this machine's pool CA (made by `gpupool up` or by the first
    `gpupool cert`), for a GPU server or controller:  gpupool cert gpu-7.lab 10.0.0.7 -o gpu-7

    Copy both files to that host and start it with --tls-cert gpu-7.pem --tls-key gpu-7-key.pem;
    clients trust the CA ($GPUPOOL_HOME/ca.pem, given to them as GPUPOOL_CA). Running the command
    again issues a new certificate: servers pick up replaced files without a restart.
    """
    from gpupool import poolcmd

    poolcmd.cert(names, out)


@app.command()
def request(
    n: int = typer.Option(1, "-n", "--gpus", help="Number of GPUs."),
    p: float = typer.Option(None, "-p", "--fraction", help="Share of each GPU's memory, e.g. 0.25."),
    m: str = typer.Option(None, "-m", "--memory", help="Memory of each GPU, e.g. 20GiB."),
    filters: list[str] = typer.Option([], "--filter", help="model=..., kind=..., server=..., min-memory=..., or KEY=VALUE label."),
    ttl: str = typer.Option("1h", "--ttl", help="How long to hold it: 90s, 30m, 2h."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait in the queue (0: fail at once)."),
    spread: bool = typer.Option(False, "--spread"),
    as_json: bool = typer.Option(False, "--json", help="Print the lease as JSON."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """Hold GPUs across several commands: later `gpupool run` in this directory uses the lease.

    The lease is written to ./.gpupool-lease.json (or $GPUPOOL_LEASE_FILE); `gpupool release`
    gives it back. It is not renewed in the background: choose --ttl to cover your work.
    """
    from gpupool import poolcmd

    poolcmd.request(controller, token, n, p, m, filters, ttl, wait, spread, as_json)


@app.command()
def release(
    lease_id: str = typer.Argument(None, help="Lease id (default: the lease of `gpupool request` here)."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """Give a lease back to the pool."""
    from gpupool import poolcmd

    poolcmd.release(controller, token, lease_id)


@app.command("list")
def list_gpus(
    as_json: bool = typer.Option(False, "--json", help='{"gpus": [{"memory_bytes", "allocated_bytes", ...}]}'),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """Every GPU in the pool: model, memory, allocated, sessions. Exits non-zero if no pool answers."""
    from gpupool import poolcmd

    poolcmd.list_gpus(controller, token, as_json)


@app.command()
def smi(
    as_json: bool = typer.Option(False, "--json"),
    lease_id: str = typer.Option(None, "--lease", envvar="GPUPOOL_LEASE_ID", help="Lease id (default: the lease of `gpupool request` here)."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """The GPUs your lease holds, as nvidia-smi would show them."""
    from gpupool import poolcmd

    poolcmd.smi(controller, token, lease_id, as_json)


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json"),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """The controller, its servers, the queue, and their health."""
    from gpupool import poolcmd

    poolcmd.status(controller, token, as_json)


token_app = typer.Typer(help="Create, list and revoke tokens (admin).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    user: str = typer.Option(..., "--user", help="Who the token is for."),
    role: str = typer.Option("user", "--role", help="user, admin or server."),
    note: str = typer.Option("", "--note"),
    ttl: str = typer.Option(None, "--ttl", help="Expire after 90s/30m/12h/30d (default: never)."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """Create a token; it is printed once (only its hash is stored)."""
    from gpupool import poolcmd

    poolcmd.token_create(controller, token, user, role, note, ttl)


@token_app.command("list")
def token_list(
    as_json: bool = typer.Option(False, "--json"),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """List tokens (ids, users, roles; never the secrets)."""
    from gpupool import poolcmd

    poolcmd.token_list(controller, token, as_json)


@token_app.command("revoke")
def token_revoke(
    token_id: str = typer.Argument(..., help="The token's id (from `gpupool token list`)."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """Revoke a token: it stops working at once."""
    from gpupool import poolcmd

    poolcmd.token_revoke(controller, token, token_id)


@app.command()
def drain(
    server_name: str = typer.Argument(..., metavar="SERVER", help="Server name, id or address."),
    undo: bool = typer.Option(False, "--undo", help="Resume placing on it."),
    controller: str = typer.Option(None, "--controller", envvar="GPUPOOL_CONTROLLER"),
    token: str = typer.Option(None, "--token", envvar="GPUPOOL_TOKEN"),
) -> None:
    """Stop placing new leases on SERVER (running ones continue until they end)."""
    from gpupool import poolcmd

    poolcmd.drain(controller, token, server_name, undo)


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
