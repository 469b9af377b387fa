"""Per-lease memory accounting, and the worker's hard backstop.

Note [One budget per lease]: a worker serves every session of one lease on one device (a program
and its child processes), so the lease's bytes are one `Budget` in one process. On CUDA the
caching allocator's own counters are that process's, capped by its per-process memory fraction;
on the CPU nothing counts for us, so the executors track the bytes of every distinct storage
their handle tables keep alive, in one ledger.

Note [Storage keys]: storages are keyed by the address of their `StorageImpl`
(`UntypedStorage._cdata`), not by their data pointer: an in-place resize (`resize_`, an `out=`
op growing its output) moves the data but keeps the `StorageImpl`, and empty storages all share
data pointer 0. A key is unique among live storages, and every counted storage is alive because
a handle in the table holds a tensor on it.
"""

from __future__ import annotations

import logging
import resource
import sys

import torch

log = logging.getLogger("gpupool.worker")


class Budget:
    """The bytes one lease may hold on one device, shared by all its sessions in this worker."""

    def __init__(self, device: torch.device, limit: int) -> None:
        self.device = device
        self.limit = limit
        self.is_cuda = device.type == "cuda"
        self.ledger = StorageLedger()  # CPU-backed devices only (Note [One budget per lease])
        self._sessions = 0

    def new_session(self) -> int:
        """A number for a new session: its handles' ledger keys are `number << 64 | handle`."""
        self._sessions += 1
        return self._sessions

    def used(self) -> int:
        if self.is_cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self.ledger.used

    def peak(self) -> int:
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.ledger.peak


class StorageLedger:
    """Bytes held by the handle table, counting each storage once however many handles view it."""

    def __init__(self) -> None:
        self._storages: dict[int, list[int]] = {}  # key -> [handle count, nbytes]
        self._handle_key: dict[int, int] = {}
        self.used = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self._storages)

    def nbytes(self, handle: int) -> int | None:
        """The counted size of the storage handle `handle` holds, if it is counted."""
        key = self._handle_key.get(handle)
        return None if key is None else self._storages[key][1]

    def add(self, handle: int, t: torch.Tensor) -> None:
        """Count handle `handle`, which must not be counted yet, holding tensor `t`."""
        s = t.untyped_storage()
        key = s._cdata
        n = s.nbytes()
        self._handle_key[handle] = key
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [1, n]
            self.used += n
        else:
            entry[0] += 1
            self.used += n - entry[1]
            entry[1] = n
        if self.used > self.peak:
            self.peak = self.used

    def remove(self, handle: int) -> None:
        key = self._handle_key.pop(handle, None)
        if key is None:
            return
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] <= 0:
            self.used -= entry[1]
            del self._storages[key]

    def refresh(self, handle: int, t: torch.Tensor) -> None:
        """Re-measure after an op that may have resized `t`'s storage or swapped it (`set_`)."""
        s = t.untyped_storage()
        key = s._cdata
        if self._handle_key.get(handle) != key:
            self.remove(handle)
            self.add(handle, t)
            return
        entry = self._storages[key]
        n = s.nbytes()
        if n != entry[1]:
            self.used += n - entry[1]
            entry[1] = n
            if self.used > self.peak:
                self.peak = self.used


#: Room above the share for what the ledger does not see: decoded messages (up to 64 MiB),
#: temporaries inside ops, copies made to fetch non-contiguous tensors.
BACKSTOP_SLACK = 768 * 1024**2


def vm_data() -> int | None:
    """This process's data segment (VmData: what RLIMIT_DATA limits), in bytes."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return None


def warm_threads() -> None:
    """Start torch's intra-op thread pool now.

    Note: each pool thread's stack (8 MiB by default) counts towards RLIMIT_DATA. Started after
    the cap, on a many-core host they would not fit in the slack and every parallel op would fail
    with "can't allocate memory"; started before, they are part of the baseline the cap adds to.
    """
    x = torch.ones(1 << 20)
    x.add_(1)
    float(x.sum())


def cap_process_data(limit_bytes: int, slack: int = BACKSTOP_SLACK) -> int | None:
    """Backstop for a CPU-backed session: cap the worker's data segment; returns the cap.

    The executor checks sizes it can compute before allocating and the ledger catches overuse
    after each op; this stops any single allocation, whatever op makes it, from taking more than
    the share plus `slack` of the host's memory (malloc fails and the op raises).
    """
    warm_threads()
    base = vm_data()
    if base is None:
        log.warning("cannot read VmData: no memory backstop for this session")
        return None
    cap = base + limit_bytes + slack
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return cap


def keep_freed_memory(limit_bytes: int) -> bool:
    """A CPU-backed session keeps the memory it frees for its next tensors, as CUDA's caching
    allocator does, instead of giving it back to the OS and faulting it in again.

    Note: fresh pages cost a page fault each (~0.25 s per GiB here), so a 1 GiB upload into new
    memory ran at a third of the socket's speed. glibc serves big blocks with mmap and unmaps them
    on free; with mmap off and the trim threshold at the share, freed blocks stay in the heap for
    reuse. The session's memory stays bounded by its share (the ledger) and the data-segment cap.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1
        ok = libc.mallopt(m_trim_threshold, ctypes.c_int(min(limit_bytes, 2**31 - 1))) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False
