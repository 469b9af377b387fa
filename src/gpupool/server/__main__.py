"""`python -m gpupool.server`: a bare server (the CLI's `gpupool server` is the usual way)."""

import argparse
import logging
import signal
import sys

from gpupool.server.device import discover
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
    a = p.parse_args()
    serve(a.listen, a.token, a.memory_limit, a.cpu_gpus, a.cpu_gpu_memory, a.handshake_timeout)


def serve(
    listen: str,
    token: str,
    memory_limit: str | None,
    cpu_gpus: int | None,
    cpu_gpu_memory: str,
    handshake_timeout: float | None = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, _, port = listen.rpartition(":")
    devices = discover(cpu_gpus, parse_bytes(cpu_gpu_memory))
    cfg = ServerConfig(host or "127.0.0.1", int(port), token, devices, parse_bytes(memory_limit) if memory_limit else None)
    if handshake_timeout is not None:
        cfg.handshake_timeout = handshake_timeout
    srv = Server(cfg)

    def stop(*_: object) -> None:
        srv.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for d in devices:
        label = " (CPU-backed: no GPU on this host)" if d.kind == "cpu" else ""
        print(f"device {d.index}: {d.kind} {d.name}, {d.memory_total} bytes{label}", flush=True)
    print(f"gpupool server listening on {srv.address[0]}:{srv.address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
