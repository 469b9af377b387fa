"""`python -m gpupool.server`: a bare server (the CLI's `gpupool server` is the usual way)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import uuid
from typing import Any

from gpupool.netaddr import parse_host_port
from gpupool.server.device import DeviceInfo, discover
from gpupool.server.listener import Server, ServerConfig
from gpupool.units import parse_bytes


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m gpupool.server")
    p.add_argument("--listen", default="127.0.0.1:7777")
    p.add_argument("--token", required=True)
    p.add_argument("--memory-limit", default=None)
    p.add_argument("--cpu-gpus", type=int, default=None)
    p.add_argument("--cpu-gpu-memory", default="8GiB")
    p.add_argument("--handshake-timeout", type=float, default=None, help="seconds a client has to say hello")
    p.add_argument("--controller", default=None, help="URL of the pool controller (pool mode)")
    p.add_argument("--name", default=None)
    p.add_argument("--advertise", default=None)
    a = p.parse_args()
    serve(a.listen, a.token, a.memory_limit, a.cpu_gpus, a.cpu_gpu_memory, a.handshake_timeout,
          controller=a.controller, name=a.name, advertise=a.advertise)


def gpu_records(devices: list[DeviceInfo], name: str) -> list[dict[str, Any]]:
    """The GPUs as the controller registers them. CPU-backed devices get stable made-up UUIDs."""
    out = []
    for d in devices:
        uid = d.uuid or f"{d.kind}-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{name}/{d.index}')}"
        out.append({"index": d.index, "uuid": uid, "model": d.name, "memory_bytes": d.memory_total, "kind": d.kind})
    return out


def serve(
    listen: str,
    token: str,
    memory_limit: str | None,
    cpu_gpus: int | None,
    cpu_gpu_memory: str,
    handshake_timeout: float | None = None,
    controller: str | None = None,
    name: str | None = None,
    advertise: str | None = None,
    labels: dict[str, str] | None = None,
) -> None:
    """Run a server in the foreground until SIGTERM/SIGINT.

    Without `controller`, clients present `token` (a static token). With it (pool mode), `token`
    is this server's token at the controller; clients present leases the controller signed, which
    the server verifies itself, so sessions keep working while the controller restarts.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    host, port = parse_host_port(listen, "listen address")
    devices = discover(cpu_gpus, parse_bytes(cpu_gpu_memory))
    cfg = ServerConfig(
        host,
        port,
        "" if controller else token,
        devices,
        parse_bytes(memory_limit) if memory_limit else None,
    )
    if handshake_timeout is not None:
        cfg.handshake_timeout = handshake_timeout
    srv = Server(cfg)
    address = advertise or f"{srv.address[0]}:{srv.address[1]}"
    agent = None
    if controller:
        from gpupool.controller.client import ControllerClient, ServerAgent

        server_name = name or f"{socket.gethostname()}:{srv.address[1]}"
        agent = ServerAgent(
            ControllerClient(controller, token),
            server_name,
            address,
            gpu_records(devices, server_name),
            labels=labels,
            usage=srv.usage,
            on_leases=srv.sync_leases,
        )
        try:
            agent.start()
        except Exception as e:
            srv.shutdown()
            raise SystemExit(f"gpupool server: cannot register with the controller at {controller}: {e}") from e
        cfg.verify_lease = agent.verify

    def stop(*_: object) -> None:
        if agent is not None:
            agent.stop()
        srv.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for d in devices:
        label = " (CPU-backed: no GPU on this host)" if d.kind == "cpu" else ""
        print(f"device {d.index}: {d.kind} {d.name}, {d.memory_total} bytes{label}", flush=True)
    if agent is not None:
        print(f"registered with the controller at {controller} as {agent.name}", flush=True)
    print(f"gpupool server listening on {address}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
