"""Per-op and round-trip benchmarks: what one small op and one sync cost.

- `op_add`: `a + b` on tiny tensors, `n` in a row, then one sync; microseconds per op. On
  gpupool this is the client's cost per op (plan, encode, queue) plus the server's share; the
  baseline is native eager.
- `rtt`: `.item()` of a scalar already computed, on gpupool; a 100-byte request/reply on a plain
  socket for the baseline. Median microseconds of `n` round trips.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.side import Measure, Side
from bench.sockbase import SockClient


def setup_op_add(side: Side, cfg: dict[str, Any]) -> Measure:
    numel, n = int(cfg.get("numel", 16)), int(cfg["n"])
    a = torch.randn(numel).to(side.device)
    b = torch.randn(numel).to(side.device)
    for _ in range(min(n, 200)):
        c = a + b
    side.sync()
    del c

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            c = a + b  # noqa: F841 - rebinding frees the previous result, as real code does
        side.sync()
        return (time.perf_counter() - t0) / n * 1e6

    return Measure(run, {"numel": numel, "ops": n}, cpu_scale=1e6 / n)


def setup_rtt(side: Side, cfg: dict[str, Any]) -> Measure:
    n = int(cfg["n"])
    if side.remote:
        x = torch.ones((), device=side.device) * 2
        side.sync()

        def once() -> None:
            x.item()

        close = _noop
    else:
        assert side.sockbase is not None
        client = SockClient(side.sockbase)
        once = client.ping
        close = client.close
    for _ in range(min(n, 50)):
        once()

    def run() -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    return Measure(run, {"round_trips": n}, close)


def _noop() -> None:
    pass
