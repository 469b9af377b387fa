"""Bulk copies between host and device, against the same bytes over a plain socket.

- `h2d`: `x.to(device)` of a contiguous host tensor, then a sync (so the bytes have arrived).
  Baseline: `sendall` of the same bytes to the plain-socket server, which `recv_into`s them in
  256 KiB slices and acknowledges.
- `d2h`: `.cpu()` of a device tensor. Baseline: the plain-socket server `sendall`s the bytes,
  the client `recv_into`s them in 256 KiB slices.

Each repetition times `inner` copies and keeps the median; the value is GB/s (1e9 bytes/s).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.side import Measure, Side
from bench.sockbase import SockClient


def _bandwidth(nbytes: int, inner: int, once: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        times = []
        for _ in range(inner):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        return nbytes / statistics.median(times) / 1e9

    return run


def setup(side: Side, cfg: dict[str, Any]) -> Measure:
    direction, nbytes, inner = cfg["direction"], int(cfg["bytes"]), int(cfg.get("inner", 3))
    info = {"bytes": nbytes, "copies_per_rep": inner}
    if not side.remote:
        assert side.sockbase is not None
        client = SockClient(side.sockbase)
        buf = memoryview(bytearray(nbytes))
        once = (lambda: client.send(buf)) if direction == "h2d" else (lambda: client.receive(buf))
        once()
        return Measure(_bandwidth(nbytes, inner, once), info, client.close)
    if direction == "h2d":
        host = torch.ones(nbytes, dtype=torch.uint8)
        holder: list[torch.Tensor] = []

        def once() -> None:
            holder.clear()  # free the previous copy first, as a loop reassigning `x` would
            holder.append(host.to(side.device))
            side.sync()

        once()
        return Measure(_bandwidth(nbytes, inner, once), info, holder.clear)
    dev = torch.ones(nbytes, dtype=torch.uint8, device=side.device)
    side.sync()

    def fetch() -> None:
        dev.cpu()

    fetch()
    return Measure(_bandwidth(nbytes, inner, fetch), info)
