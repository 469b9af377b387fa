"""Per-session memory accounting on a CPU-backed device.

Note: a CUDA session relies on the caching allocator's own counters and its per-process memory
fraction; on the CPU nothing counts for us, so the executor tracks the bytes of every distinct
storage its handle table keeps alive. Storages are keyed by data pointer; a view and its base
count once.
"""

from __future__ import annotations

import resource

import torch


class StorageLedger:
    def __init__(self) -> None:
        self._refs: dict[int, list[int]] = {}  # data_ptr -> [handle count, nbytes]
        self.used = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> int:
        """Count `t`'s storage; returns the bytes newly accounted."""
        s = t.untyped_storage()
        key = s.data_ptr()
        n = s.nbytes()
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [1, n]
            self.used += n
            self.peak = max(self.peak, self.used)
            return n
        entry[0] += 1
        if n != entry[1]:  # resized in place
            self.used += n - entry[1]
            entry[1] = n
            self.peak = max(self.peak, self.used)
        return 0

    def remove(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            self.used -= entry[1]
            del self._refs[key]


def cap_process_data(limit_bytes: int, slack: int = 768 * 1024**2) -> None:
    """Backstop for a CPU-backed session: cap the worker's data segment.

    The ledger catches overuse after an op; this stops a single huge allocation from taking the
    host's memory before the ledger can look (malloc then fails and the op raises).
    """
    try:
        with open("/proc/self/status") as f:
            vmdata = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return
    cap = vmdata + limit_bytes + slack
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
