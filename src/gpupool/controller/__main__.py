"""`python -m gpupool.controller`: a controller without the CLI (the CLI's `gpupool controller` is the usual way)."""

from __future__ import annotations

import argparse

from gpupool.controller.app import Controller, Settings
from gpupool.controller.errors import SigningKeyError
from gpupool.controller.runner import serve
from gpupool.netaddr import parse_host_port


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpupool.controller")
    p.add_argument("--listen", default="127.0.0.1:7700", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite under $GPUPOOL_HOME)")
    p.add_argument("--key-file", default=None, metavar="PATH",
                   help="the lease signing key's file, mode 0600 (default: beside a SQLite database, "
                        "controller.db -> controller.key.pem; else $GPUPOOL_HOME/controller.key.pem)")
    p.add_argument("--init", action="store_true", help="create an admin token, print it, and serve")
    p.add_argument("--admin-token", default=None, help="make sure this admin token exists")
    d = Settings()
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval_s, metavar="S")
    p.add_argument("--sweep-interval", type=float, default=d.sweep_interval_s, metavar="S")
    p.add_argument("--poll-interval", type=float, default=d.poll_interval_s, metavar="S")
    p.add_argument("--default-ttl", type=float, default=d.default_ttl_s, metavar="S")
    p.add_argument("--max-wait", type=float, default=d.max_wait_s, metavar="S")
    p.add_argument("--access-log", action="store_true", help="log a line per HTTP request")
    a = p.parse_args(argv)
    try:
        host, port = parse_host_port(a.listen, "listen address")
    except ValueError as e:
        p.error(str(e))
    settings = Settings(db_url=a.db, key_file=a.key_file, admin_token=a.admin_token, heartbeat_interval_s=a.heartbeat_interval,
                        sweep_interval_s=a.sweep_interval, poll_interval_s=a.poll_interval,
                        default_ttl_s=a.default_ttl, max_wait_s=a.max_wait)
    try:
        if a.init:
            c = Controller(settings)
            print(f"admin token: {c.create_admin_token()}", flush=True)
            c.store.close()
        serve(settings, host, port, access_log=a.access_log)
    except SigningKeyError as e:
        p.exit(1, f"gpupool controller: {e}\n")


if __name__ == "__main__":
    main()
