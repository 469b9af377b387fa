"""`python -m gpupool.server`: a bare server (the CLI's `gpupool server` is the usual way)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import ssl
import sys
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gpupool.netaddr import parse_host_port
from gpupool.protocol import ops as ops_allowlist
from gpupool.server.device import DeviceInfo, discover
from gpupool.server.listener import Server, ServerConfig
from gpupool.tls import is_loopback, listen_tls
from gpupool.units import parse_bytes

if TYPE_CHECKING:
    from gpupool.controller.client import ServerAgent


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
    p.add_argument("--idle-timeout", type=float, default=None, help="seconds a session may send nothing (0: never)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--insecure", action="store_true", help="plain TCP on a non-loopback address")
    a = p.parse_args()
    serve(a.listen, a.token, a.memory_limit, a.cpu_gpus, a.cpu_gpu_memory, a.handshake_timeout,
          controller=a.controller, name=a.name, advertise=a.advertise, idle_timeout=a.idle_timeout,
          tls=Tls(a.tls_cert, a.tls_key, a.insecure))


def with_uuids(devices: list[DeviceInfo], name: str) -> list[DeviceInfo]:
    """The devices, each with the uuid it is registered under: its own, or for a CPU-backed
    device a stable made-up one. Leases name GPUs by uuid (Note [Lease binding] in
    server/admission.py), so the listener must know the same uuids the controller does."""
    return [d if d.uuid else replace(d, uuid=f"{d.kind}-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{name}/{d.index}')}")
            for d in devices]


def sandbox_layers() -> str:
    """The workers' sandbox on this kernel in a few words (the server's `sandbox` label, which
    `gpupool status` shows): e.g. "landlock-7 seccomp", "seccomp", "off", "none"."""
    from gpupool.server import sandbox, worker_sandbox

    if worker_sandbox.disabled():
        return "off"
    r = sandbox.probe()
    layers = ([f"landlock-{r.landlock_abi}"] if r.landlock_abi else []) + (["seccomp"] if r.seccomp else [])
    return " ".join(layers) or "none"


def sandbox_line() -> str:
    """The start-up message's line about the workers' sandbox, with what this kernel lacks."""
    from gpupool.server import sandbox, worker_sandbox

    if worker_sandbox.disabled():
        return "NOT sandboxed (--no-sandbox / GPUPOOL_SANDBOX=off): for debugging only"
    missing = sandbox.probe().missing
    layers = sandbox_layers()
    line = f"sandboxed ({layers})" if layers != "none" else "NOT sandboxed"
    return line + ("; " + "; ".join(missing) if missing else "")


def gpu_records(devices: list[DeviceInfo], name: str) -> list[dict[str, Any]]:
    """The GPUs as the controller registers them (uuids as `with_uuids` gives them)."""
    return [{"index": d.index, "uuid": d.uuid, "model": d.name, "memory_bytes": d.memory_total, "kind": d.kind}
            for d in with_uuids(devices, name)]


@dataclass(frozen=True)
class Tls:
    """The data plane's TLS settings (Note [When TLS is required] in tls.py)."""

    cert: str | None = None
    key: str | None = None
    insecure: bool = False


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
    idle_timeout: float | None = None,
    tls: Tls = Tls(),
) -> None:
    """Run a server in the foreground until SIGTERM/SIGINT.

    Without `controller`, clients present `token` (a static token). With it (pool mode), `token`
    is this server's token at the controller; clients present leases the controller signed, which
    the server verifies itself, so sessions keep working while the controller restarts.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    host, port = parse_host_port(listen, "listen address")
    try:  # every worker loads it; a list that cannot load would fail each session instead
        allowed = ops_allowlist.load()
    except ops_allowlist.AllowlistError as e:
        raise SystemExit(f"gpupool server: {e}") from None
    try:
        server_tls = listen_tls(host, tls.cert, tls.key, tls.insecure, "gpupool server")
    except (ValueError, OSError, ssl.SSLError) as e:
        raise SystemExit(f"gpupool server: {e}") from None
    devices = discover(cpu_gpus, parse_bytes(cpu_gpu_memory))
    cfg = ServerConfig(
        host,
        port,
        "" if controller else token,
        devices,
        parse_bytes(memory_limit) if memory_limit else None,
    )
    if handshake_timeout is not None:
        cfg.limits = replace(cfg.limits, handshake_timeout=handshake_timeout)
    if idle_timeout is not None:
        cfg.idle_timeout = idle_timeout
    if server_tls is not None:
        cfg.tls = server_tls.context
    srv = Server(cfg)
    address = advertise or f"{srv.address[0]}:{srv.address[1]}"
    agent = None
    if controller:
        agent = _join_pool(srv, controller, token, name or f"{socket.gethostname()}:{srv.address[1]}",
                           address, labels)

    def stop(*_: object) -> None:
        if agent is not None:
            agent.stop()
        srv.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for d in cfg.devices:
        label = " (CPU-backed: no GPU on this host)" if d.kind == "cpu" else ""
        print(f"device {d.index}: {d.kind} {d.name}, {d.memory_total} bytes{label}", flush=True)
    print(f"session workers: {sandbox_line()}; {len(allowed.ops)} ops allowed ({allowed.source})", flush=True)
    if agent is not None:
        print(f"registered with the controller at {controller} as {agent.name}", flush=True)
    if server_tls is not None:
        plane = f"TLS (certificate {tls.cert})"
    elif is_loopback(host):
        plane = "plain TCP (loopback only)"
    else:
        plane = "plain TCP (--insecure: tokens and tensors cross the network in clear)"
    print(f"data plane: {plane}", flush=True)
    print(f"gpupool server listening on {address}", flush=True)
    srv.serve_forever()


def _join_pool(srv: Server, controller: str, token: str, server_name: str, address: str,
               labels: dict[str, str] | None) -> ServerAgent:
    """Register with the controller and heartbeat once, then wire the agent into the listener.

    Note: this runs before `serve_forever` accepts the first connection, so a restarted server
    already knows which leases are active (and refuses released ones) when clients come back.
    """
    from gpupool.controller.client import ControllerClient, ServerAgent

    cfg = srv.config
    # The listener matches a lease's GPU to a device by uuid (Note [Lease binding]); the name
    # (known only once the port is bound) is part of a CPU-backed device's made-up uuid.
    cfg.devices = with_uuids(cfg.devices, server_name)
    labels = {**(labels or {}), "sandbox": sandbox_layers()}
    agent = ServerAgent(ControllerClient(controller, token), server_name, address, gpu_records(cfg.devices, server_name),
                        labels=labels, usage=srv.usage, on_leases=srv.sync_leases)
    try:
        agent.start()
    except Exception as e:
        srv.shutdown()
        raise SystemExit(f"gpupool server: cannot register with the controller at {controller}: {e}") from e
    cfg.verify_lease = agent.verify
    cfg.on_lease_abandoned = agent.abandon
    return agent


if __name__ == "__main__":
    main()
