"""What the pool commands of the CLI do (`gpupool up/run/request/release/list/smi/status/token/drain`).

Kept apart from `cli.py` (argument parsing only) so each command is a plain function.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from gpupool import display, home
from gpupool.errors import ControllerError, GpupoolError, LeaseExpired, NoCapacity
from gpupool.netaddr import parse_host_port
from gpupool.units import parse_bytes

#: Exit status when the pool has no capacity (or quota) for a request.
EXIT_NO_CAPACITY = 3
#: The least share of a GPU a lease may take (Note [Least share] in controller/app.py).
MIN_SHARE_BYTES = 2**20


def _die(message: str, code: int = 1) -> None:
    from rich.markup import escape

    display.err_console.print(f"[bold red]gpupool:[/] {escape(message)}", highlight=False,
                              soft_wrap=True)  # one line, and a message may hold [...]
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn gpupool errors into one clear line and a non-zero exit status."""
    try:
        yield
    except NoCapacity as e:
        _die(str(e), EXIT_NO_CAPACITY)
    except ControllerError as e:
        _die(str(e), EXIT_NO_CAPACITY if e.code == "quota_exceeded" else 1)
    except GpupoolError as e:
        _die(str(e))
    except ValueError as e:
        _die(str(e), 2)


def _client(controller: str | None, token: str | None) -> Any:
    from gpupool.controller.client import ControllerClient

    url, tok = home.resolve_controller(controller, token)
    return ControllerClient(url, tok)


def parse_duration(text: str) -> float:
    mt = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not mt:
        raise ValueError(f"not a duration: {text!r} (try 90s, 30m, 2h, 1d)")
    return float(mt.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[mt.group(2)]


def check_wait(wait: float) -> float:
    if not (math.isfinite(wait) and wait >= 0):
        raise ValueError(f"--wait must be a finite number of seconds, 0 or more (got {wait:g})")
    return wait


def request_body(n: int, p: float | None, m: str | None, filters: list[str], ttl_s: float | None, spread: bool) -> dict[str, Any]:
    """The body of a lease request. What is cheap to check is checked here, in the flags' words;
    the controller checks everything again (its 422s read as sentences too: controller/client.py)."""
    if p is not None and m is not None:
        raise ValueError("give -p (a fraction) or -m (bytes), not both")
    if n < 1:
        raise ValueError(f"-n must be at least 1 GPU (got {n})")
    body: dict[str, Any] = {"n": n, "spread": spread}
    if p is not None:
        if not (math.isfinite(p) and 0 < p <= 1):
            raise ValueError(f"fraction must be a finite number between 0 and 1 (got {p:g})")
        body["fraction"] = p
    if m is not None:
        body["memory_bytes"] = parse_bytes(m)
        if body["memory_bytes"] < MIN_SHARE_BYTES:
            raise ValueError(f"-m must be at least 1MiB (got {m})")
    if ttl_s is not None:
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"--ttl must be a finite number of seconds above 0 (got {ttl_s:g})")
        body["ttl_s"] = ttl_s
    labels: dict[str, str] = {}
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or not key:
            raise ValueError(f"bad --filter {f!r}: expected KEY=VALUE, e.g. model=H200")
        k = key.strip().lower().replace("_", "-")
        if k in ("model", "kind", "server"):
            body[k] = value
        elif k == "min-memory":
            body["min_memory_bytes"] = parse_bytes(value)
        else:
            labels[key.strip()] = value
    if labels:
        body["labels"] = labels
    return body


def _request(client: Any, wait: float, body: dict[str, Any]) -> dict[str, Any]:
    """Request a lease, showing the place in the queue while it waits."""
    if wait <= 0:
        return client.request(wait_s=0, **body)  # type: ignore[no-any-return]
    if not display.err_console.is_terminal:
        # No live display on a pipe or a log: one line each time the place changes.
        def on_line(place: int) -> None:
            print(f"gpupool: waiting in the queue: place {place} (up to {wait:g} s)", file=sys.stderr, flush=True)

        return client.request(wait_s=wait, on_position=on_line, **body)  # type: ignore[no-any-return]
    with display.err_console.status("asking the pool for GPUs ...") as st:

        def on_position(place: int) -> None:
            st.update(f"waiting in the queue: place {place} (up to {wait:g} s)")

        return client.request(wait_s=wait, on_position=on_position, **body)  # type: ignore[no-any-return]


# ---- gpupool run --------------------------------------------------------------------------------


class _LeaseKeeper:
    """Keeps a lease while a command runs: renews it, keeps the current signed text in a file,
    and (for a lease this run owns) holds the lease's hold connection to its server.

    Note: a client process that opens a session late (a second GPU, a subprocess) must present a
    lease that has not expired, so children read the latest renewal from this file
    (GPUPOOL_LEASE_PATH) rather than the text they were started with.
    """

    def __init__(self, client: Any, lease: dict[str, Any], release: bool) -> None:
        from gpupool.controller.client import LeaseRenewer

        self.release = release
        self.lease_id = lease["id"]
        fd, self.path = tempfile.mkstemp(prefix="gpupool-lease-", suffix=".txt")
        os.close(fd)
        self._write(lease["signed"])
        self.renewer = LeaseRenewer(client, lease, on_lost=lambda e: self._lost(str(e)))
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._follow, daemon=True)
        self._told = threading.Lock()
        self._hold: Any = None

    def _write(self, text: str) -> None:
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def _lost(self, why: str) -> None:
        if self._stop.is_set():
            return  # stopping: the lease ends because this run released it
        if self._told.acquire(blocking=False):  # once, whether the renewer or the hold learns it first
            display.err_console.print(f"[bold red]gpupool:[/] the lease ended while the command ran: {why}",
                                      highlight=False)

    def _follow(self) -> None:
        last = self.renewer.lease["signed"]
        while not self._stop.wait(0.5):
            cur = self.renewer.lease["signed"]
            if cur != last:
                self._write(cur)
                last = cur

    def start(self) -> _LeaseKeeper:
        """Start renewing; for a lease this run owns, open its hold connection (Note [Hold
        connection] in launcher/hold.py). If that fails, the lease is released and the error raised."""
        from gpupool.launcher.hold import LeaseHold

        self.renewer.start()
        self._watch.start()
        if self.release:
            lease = self.renewer.lease
            try:
                self._hold = LeaseHold(lease["address"], lease["signed"], self._lost).open()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Stop renewing, release (if this run owns the lease), then close the hold: in that
        order, so the server sees a released lease, not an abandoned one."""
        self._stop.set()
        try:
            self.renewer.stop(release=self.release)
        finally:
            if self._hold is not None:
                self._hold.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


def run_in_pool(
    cmd: list[str],
    controller: str | None,
    token: str | None,
    n: int | None,
    p: float | None,
    m: str | None,
    filters: list[str],
    wait: float,
    ttl: float | None,
    spread: bool,
) -> int:
    from gpupool.launcher import run_command

    with _errors():
        client = _client(controller, token)
        lease, release = _lease_for_run(client, n, p, m, filters, wait, ttl, spread)
    display.err_console.print(f"gpupool: {display.lease_summary(lease)}", highlight=False)
    with _errors():
        keeper = _LeaseKeeper(client, lease, release).start()
    env = {
        "GPUPOOL_LEASE_PATH": keeper.path,
        "GPUPOOL_LEASE_ID": lease["id"],
        "GPUPOOL_LEASE_GPUS": str(len(lease["gpus"])),
    }
    # Note: run_command forwards SIGINT/SIGTERM to the command and returns when it exits, so
    # the lease is released here on Ctrl-C and SIGTERM too; on SIGKILL, the hold connection and
    # Note [Die with gpupool run] (launcher/__init__.py) end the lease and the command.
    try:
        return run_command(cmd, lease["address"], "", extra_env=env, die_with_us=True)
    finally:
        keeper.stop()
        if release:
            display.err_console.print(f"gpupool: released lease {lease['id']}", highlight=False)


def _lease_for_run(client: Any, n: int | None, p: float | None, m: str | None, filters: list[str], wait: float,
                   ttl: float | None, spread: bool) -> tuple[dict[str, Any], bool]:
    """The lease `gpupool run` runs on, and whether it is its own (to release): the one
    `gpupool request` wrote here when no request is given, else a new one."""
    held = home.read_lease() if n is None and p is None and m is None and not filters else None
    if held is None:
        return _request(client, check_wait(wait), request_body(1 if n is None else n, p, m, filters, ttl, spread)), True
    lease = client.lease(held["lease"]["id"])
    if lease["state"] != "active":
        raise LeaseExpired(
            f"the lease in {home.lease_file()} is {lease['state']}: run `gpupool release` and request again"
        )
    return lease, False


# ---- the other commands ---------------------------------------------------------------------


def request(controller: str | None, token: str | None, n: int, p: float | None, m: str | None,
            filters: list[str], ttl: str, wait: float, spread: bool, as_json: bool) -> None:
    with _errors():
        client = _client(controller, token)
        lease = _request(client, check_wait(wait), request_body(n, p, m, filters, parse_duration(ttl), spread))
        old = home.read_lease()
        path = home.write_lease(lease, client.url)
    if old is not None:
        display.err_console.print(
            f"gpupool: {path} held lease {old['lease']['id']}; it is replaced here but still held "
            f"until it expires or `gpupool release {old['lease']['id']}`",
            highlight=False,
        )
    if as_json:
        display.emit_json(lease)
    else:
        display.console.print(display.lease_summary(lease), highlight=False)
        display.console.print(f"written to {path}: `gpupool run -- CMD` here uses it; `gpupool release` gives it back")


def release(controller: str | None, token: str | None, lease_id: str | None) -> None:
    held = home.read_lease()
    if lease_id is None:
        if held is None:
            _die(f"no lease given and none held here ({home.lease_file()})")
        assert held is not None
        lease_id = held["lease"]["id"]
    with _errors():
        client = _client(controller, token)
        try:
            client.release(lease_id)
        except LeaseExpired:
            pass  # ended already: nothing to give back
    if held is not None and held["lease"]["id"] == lease_id:
        home.remove_lease()
    display.console.print(f"released lease {lease_id}")


def list_gpus(controller: str | None, token: str | None, as_json: bool) -> None:
    with _errors():
        gpus = _client(controller, token).gpus()
    if as_json:
        display.emit_json({"gpus": gpus})
    else:
        display.console.print(display.gpus_table(gpus))


def smi(controller: str | None, token: str | None, lease_id: str | None, as_json: bool) -> None:
    held = home.read_lease()
    lease_id = lease_id or (held["lease"]["id"] if held else None)
    if not lease_id:
        _die("no lease here: run it under `gpupool run`, pass --lease ID, or `gpupool request` first")
    with _errors():
        client = _client(controller, token)
        lease = client.lease(lease_id)
        usage = {g["index"]: g for g in client.gpus() if g["server_id"] == lease["server_id"]}
    if as_json:
        display.emit_json({"lease": lease, "gpus": [usage.get(g["index"], {}) for g in lease["gpus"]]})
    else:
        display.console.print(display.smi_table(lease, usage))


def status(controller: str | None, token: str | None, as_json: bool) -> None:
    with _errors():
        st = _client(controller, token).status()
    if as_json:
        display.emit_json(st)
    else:
        display.console.print(display.status_text(st), highlight=False)
    if not st["healthy"]:
        raise typer.Exit(1)


def token_create(controller: str | None, token: str | None, user: str, role: str, note: str, ttl: str | None) -> None:
    with _errors():
        out = _client(controller, token).create_token(user, role, note, parse_duration(ttl) if ttl else None)
    display.console.print(f"token for {out['user']} ({out['role']}), id {out['id']} — shown once, keep it safe:")
    print(out["token"])


def token_list(controller: str | None, token: str | None, as_json: bool) -> None:
    with _errors():
        toks = _client(controller, token).tokens()
    if as_json:
        display.emit_json({"tokens": toks})
        return
    for t in toks:
        state = "revoked" if t.get("revoked_at") else "active"
        display.console.print(f"{t['id']}  {t['user']:<16} {t['role']:<7} {state}  {t.get('note', '')}", highlight=False)


def token_revoke(controller: str | None, token: str | None, token_id: str) -> None:
    with _errors():
        _client(controller, token).revoke_token(token_id)
    display.console.print(f"revoked token {token_id}")


def drain(controller: str | None, token: str | None, server: str, undo: bool) -> None:
    with _errors():
        c = _client(controller, token)
        out = c.resume(server) if undo else c.drain(server)
    display.console.print(f"server {out['name']}: {'draining' if out['draining'] else 'accepting new leases'}")


# ---- gpupool up -----------------------------------------------------------------------------


def _names(host: str) -> list[str]:
    """The names a certificate for a listener on `host` carries: the host itself (unless a
    wildcard) and this machine's names, so clients can reach it by any of them."""
    wildcard = host in ("0.0.0.0", "::", "")
    return [n for n in ([] if wildcard else [host]) + [socket.getfqdn(), socket.gethostname(), "localhost",
                                                       "127.0.0.1", "::1"] if n]


def _up_certificates(ctl_host: str, server_host: str) -> tuple[Any, Any]:
    """The pool CA (made once in $GPUPOOL_HOME) and fresh certificates for the controller and the
    server, used where they listen off loopback (Note [When TLS is required] in gpupool/tls.py)."""
    from gpupool import pki
    from gpupool.server.__main__ import Tls
    from gpupool.tls import is_loopback, listen_tls

    d = home.home()
    ca = pki.load_or_make_ca(d)
    ctl_tls = None
    if not is_loopback(ctl_host):
        pki.write_leaf(ca, _names(ctl_host), d / "controller.pem", d / "controller-key.pem")
        ctl_tls = listen_tls(ctl_host, str(d / "controller.pem"), str(d / "controller-key.pem"), False, "controller")
    server_tls = Tls()
    if not is_loopback(server_host):
        pki.write_leaf(ca, _names(server_host), d / "server.pem", d / "server-key.pem")
        server_tls = Tls(str(d / "server.pem"), str(d / "server-key.pem"))
    return ctl_tls, server_tls


def cert(names: list[str], out: str) -> None:
    """`gpupool cert`: a certificate from this machine's pool CA, for a server on another host."""
    from gpupool import pki

    if not names:
        _die("name at least one host name or address the server is reached by")
    d = home.home()
    if not (d / "ca-key.pem").exists():
        print(f"made a new pool CA in {d} (ca.pem; its key ca-key.pem stays on this machine)")
    base = Path(out)
    pki.write_leaf(pki.load_or_make_ca(d), names, base.with_suffix(".pem"), base.with_name(base.name + "-key.pem"))
    print(f"wrote {base.with_suffix('.pem')} and {base.with_name(base.name + '-key.pem')} (keep the key 0600); "
          f"start the server with --tls-cert/--tls-key; clients trust {d / 'ca.pem'} (GPUPOOL_CA)")


def up(cpu_gpus: int | None, cpu_gpu_memory: str, listen: str, server_listen: str, db: str | None) -> None:
    from gpupool.controller.app import Settings
    from gpupool.controller.runner import ControllerThread
    from gpupool.server.__main__ import serve

    token = "gpt_" + secrets.token_urlsafe(24)
    try:
        host, port = parse_host_port(listen, "controller listen address")
        server_host, _ = parse_host_port(server_listen, "server listen address")
        ctl_tls, server_tls = _up_certificates(host, server_host)
        ctl = ControllerThread(Settings(db_url=db, admin_token=token), host, port, tls=ctl_tls).start()
    except (OSError, RuntimeError, ValueError, GpupoolError) as e:
        _die(f"cannot start the controller: {e}")
    home.write_pool(ctl.url, token)
    print(f"gpupool controller on {ctl.url} (state in {home.home()})", flush=True)
    if ctl_tls is not None or server_tls.cert:
        print(f"TLS: certificates from the pool CA {home.home() / 'ca.pem'}; clients on other "
              "machines need it as GPUPOOL_CA", flush=True)
    print("use it from this machine with no flags:  gpupool run -n 1 -p 0.5 -- python train.py", flush=True)
    print("  gpupool list | gpupool status | gpupool request -n 1 -p 0.25 --ttl 2h | gpupool release", flush=True)
    print(f"admin token (also in {home.pool_file()}): {token}", flush=True)
    if cpu_gpus is None:
        from gpupool.server.device import discover

        if all(d.kind == "cpu" for d in discover(None)):
            print("no GPU on this host: offering 1 CPU-backed GPU (labelled kind=cpu)", flush=True)
    try:
        serve(server_listen, token, None, cpu_gpus, cpu_gpu_memory, controller=ctl.url, name="local",
              tls=server_tls)
    except KeyboardInterrupt:
        pass
    finally:
        home.remove_pool()
        ctl.stop()
        print("gpupool pool stopped", flush=True)
        sys.stdout.flush()
