"""`lease_grant`: how fast the controller grants and takes back a share, under concurrency.

Each side starts its own controller (a real `gpupool controller` process on loopback, SQLite in a
temporary folder) with 1,000 GPUs registered (125 servers of 8), then `clients` threads at once
each do `per_client` operations over keep-alive HTTP: on the gpupool side a request of a
`-p 0.25` lease and its release; on the baseline side a `GET /healthz`. The value is the median
latency of one operation, in milliseconds.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import LineProc
from bench.side import Measure, Side

if TYPE_CHECKING:
    import httpx

TOKEN = "gpt_bench-admin-token-0123456789abcdef"


def _start_controller(folder: str) -> tuple[LineProc, str]:
    proc = LineProc(
        [sys.executable, "-m", "gpupool.controller", "--listen", "127.0.0.1:0",
         "--db", f"sqlite:///{folder}/controller.db", "--admin-token", TOKEN,
         # registered servers never heartbeat here: keep them "up" for the whole run
         "--heartbeat-interval", "3600"],
        dict(os.environ, PYTHONUNBUFFERED="1"),
        Path(folder) / "controller.log",
        stdin=False,
    )
    try:
        while True:
            line = proc.readline(60)
            if "listening on" in line:
                return proc, line.rsplit(" ", 1)[1].strip()
    except (EOFError, TimeoutError) as e:
        proc.stop()
        raise RuntimeError(f"the controller did not start: {e}") from None


def _controller_deps() -> None:
    """Skip (not fail) where the controller cannot run: a GPU host may carry only what the data
    plane needs (torch, msgspec, numpy)."""
    from bench.training import Skip

    missing = []
    for mod in ("httpx", "fastapi", "uvicorn", "sqlalchemy", "cryptography"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise Skip(f"the controller's dependencies are not importable here ({', '.join(missing)})")


def setup(side: Side, cfg: dict[str, Any]) -> Measure:
    _controller_deps()
    import httpx

    gpus, clients, per_client = int(cfg.get("gpus", 1000)), int(cfg.get("clients", 20)), int(cfg.get("per_client", 10))
    folder = tempfile.mkdtemp(prefix="gpupool-bench-lease-")
    proc, url = _start_controller(folder)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        per_server = 8
        for s in range((gpus + per_server - 1) // per_server):
            n = min(per_server, gpus - s * per_server)
            c.post("/v1/servers", json={
                "name": f"bench-{s}", "address": f"10.0.{s // 250}.{s % 250 + 1}:7777",
                "gpus": [{"index": i, "uuid": f"gpu-{s}-{i}", "model": "H200", "memory_bytes": 141 * 2**30, "kind": "cuda"}
                         for i in range(n)],
            }).raise_for_status()

    def op_lease(c: httpx.Client) -> None:
        r = c.post("/v1/leases", json={"n": 1, "fraction": 0.25, "wait_s": 0})
        r.raise_for_status()
        c.delete(f"/v1/leases/{r.json()['id']}").raise_for_status()

    def op_health(c: httpx.Client) -> None:
        c.get("/healthz").raise_for_status()

    op = op_lease if side.remote else op_health

    def run() -> float:
        latencies: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client() -> None:
            mine = []
            try:
                with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
                    op(c)  # connect first: measure the operation, not the handshake
                    start.wait()
                    for _ in range(per_client):
                        t0 = time.perf_counter()
                        op(c)
                        mine.append(time.perf_counter() - t0)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} clients failed: {errors[0]}")
        return statistics.median(latencies) * 1e3

    def close() -> None:
        proc.stop()

    return Measure(run, {"gpus": gpus, "clients": clients, "ops_per_client": per_client}, close)
