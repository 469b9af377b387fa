"""`python -m gpupool.controller`: a controller without the CLI (the CLI's `gpupool controller` is the usual way)."""

from __future__ import annotations

import argparse
import math
import ssl

from gpupool.controller.app import Controller, Settings
from gpupool.controller.errors import SigningKeyError
from gpupool.controller.runner import serve
from gpupool.netaddr import parse_host_port
from gpupool.tls import listen_tls


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
    p.add_argument("--max-body", type=int, default=d.max_body_bytes, metavar="BYTES",
                   help="largest request body accepted (413 beyond)")
    p.add_argument("--rate-limit", type=float, default=d.rate_per_s, metavar="PER_S",
                   help="requests a second per token, admin tokens exempt (429 beyond)")
    p.add_argument("--rate-burst", type=int, default=d.rate_burst, metavar="N", help="burst above --rate-limit")
    p.add_argument("--access-log", action="store_true", help="log a line per HTTP request")
    p.add_argument("--tls-cert", default=None, help="TLS certificate (PEM chain); re-read when it changes")
    p.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on a non-loopback address")
    a = p.parse_args(argv)
    if a.max_body < 1 or not (a.rate_limit > 0 and math.isfinite(a.rate_limit)) or a.rate_burst < 1:
        p.error("--max-body, --rate-limit and --rate-burst must be positive (and finite)")
    try:
        host, port = parse_host_port(a.listen, "listen address")
    except ValueError as e:
        p.error(str(e))
    settings = Settings(db_url=a.db, key_file=a.key_file, admin_token=a.admin_token, heartbeat_interval_s=a.heartbeat_interval,
                        sweep_interval_s=a.sweep_interval, poll_interval_s=a.poll_interval,
                        default_ttl_s=a.default_ttl, max_wait_s=a.max_wait, max_body_bytes=a.max_body,
                        rate_per_s=a.rate_limit, rate_burst=a.rate_burst)
    try:
        tls = listen_tls(host, a.tls_cert, a.tls_key, a.insecure, "gpupool controller")
    except (ValueError, OSError, ssl.SSLError) as e:
        p.exit(2, f"gpupool controller: {e}\n")
    try:
        if a.init:
            c = Controller(settings)
            print(f"admin token: {c.create_admin_token()}", flush=True)
            c.store.close()
        serve(settings, host, port, access_log=a.access_log, tls=tls)
    except SigningKeyError as e:
        p.exit(1, f"gpupool controller: {e}\n")


if __name__ == "__main__":
    main()
