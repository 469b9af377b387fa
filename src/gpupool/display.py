"""Human output for the CLI: tables of GPUs, leases and pool status (rich), or JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from gpupool.units import format_bytes

console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def gpus_table(gpus: list[dict[str, Any]]) -> Table:
    t = Table(title="GPUs in the pool")
    for col in ("server", "#", "model", "kind", "memory", "allocated", "free", "leases", "sessions", "state"):
        t.add_column(col, justify="right" if col in ("#", "memory", "allocated", "free", "leases", "sessions") else "left")
    for g in gpus:
        state = g.get("server_state", "?") + (" draining" if g.get("draining") else "")
        kind = g["kind"] + (" (CPU-backed)" if g["kind"] == "cpu" else "")
        t.add_row(
            g["server"], str(g["index"]), g["model"], kind, format_bytes(g["memory_bytes"]),
            format_bytes(g["allocated_bytes"]) + (" (whole)" if g.get("exclusive") else ""),
            format_bytes(g["free_bytes"]), str(g.get("leases", 0)),
            "-" if g.get("sessions") is None else str(g["sessions"]), state,
        )
    return t


def lease_summary(lease: dict[str, Any]) -> str:
    gpus = ", ".join(
        f"GPU {g['index']} {g['model']} ({format_bytes(b)}{' whole' if lease.get('exclusive') else ''})"
        for g, b in zip(lease["gpus"], lease["bytes_per_gpu"])
    )
    left = max(0, int(lease["expires_at"] - time.time()))
    return f"lease {lease['id']} on {lease['server']} ({lease['address']}): {gpus}; expires in {left} s"


def smi_table(lease: dict[str, Any], usage: dict[int, dict[str, Any]]) -> Table:
    t = Table(title=f"gpupool smi — lease {lease['id']} on {lease['server']}")
    for col in ("GPU", "Name", "Kind", "Memory share", "GPU memory", "In use", "Sessions"):
        t.add_column(col)
    for i, (g, b) in enumerate(zip(lease["gpus"], lease["bytes_per_gpu"])):
        u = usage.get(g["index"], {})
        used = u.get("used_bytes")
        t.add_row(
            f"{i} (server GPU {g['index']})", g["model"], g["kind"], format_bytes(b),
            format_bytes(g["memory_bytes"]), "-" if used is None else format_bytes(used),
            "-" if u.get("sessions") is None else str(u["sessions"]),
        )
    return t


def status_text(st: dict[str, Any]) -> str:
    lines = [
        f"controller: {'healthy' if st['healthy'] else 'UNHEALTHY'}, version {st['version']}, up {int(st['uptime_s'])} s, database {st['database']}",
        f"servers: {st['servers_up']} up, {st['servers_down']} down, {st['servers_draining']} draining",
        f"GPUs: {st['gpus']}, memory {format_bytes(st['memory_bytes'])}, allocated {format_bytes(st['allocated_bytes'])}",
        f"leases active: {st['leases_active']}, requests waiting: {st['queue_waiting']}",
    ]
    for s in st.get("servers", []):
        sandbox = (s.get("labels") or {}).get("sandbox", "unknown")
        lines.append(f"  {s['name']:<30} {s['address']:<22} {s['state']}{' draining' if s['draining'] else ''}, {s['gpus']} GPU(s), last heartbeat {max(0, int(time.time() - s['last_heartbeat']))} s ago, workers sandboxed: {sandbox}")
    return "\n".join(lines)
