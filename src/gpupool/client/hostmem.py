"""Host memory for `.cpu()` results that is cheap to fill.

Note [Huge pages]: a download must return memory the caller owns, and a large `torch.empty`
is a fresh anonymous mapping whose pages the kernel faults in one at a time while `recv_into`
fills it: with 4 KiB pages that is 16,384 faults per 64 MiB, about as much time as the
transfer itself on loopback. Asking for transparent huge pages on the buffer
(`madvise(MADV_HUGEPAGE)`, which hosts whose THP mode is "madvise" require) makes it 32
faults. Only the 2 MiB-aligned interior of a `torch.empty` buffer is advised, so nothing
outside the tensor's own memory changes; the advice is a hint, and where it fails or does not
exist the buffer is used as it is.

Note [Host cache]: even with huge pages, the kernel still zeroes every fresh page, and a loop
of `.cpu()` calls gets a fresh mapping each time. So, like PyTorch's CachingHostAllocator for
pinned memory, results of at least HUGE_MIN_BYTES live in blocks we map ourselves
(private anonymous `mmap`, advised huge pages as a whole; not `mmap(-1, n)`'s default
MAP_SHARED, which is shmem, where THP follows `shmem_enabled`, and which a forked child would
share), and when a result dies its block
goes back to a small cache; the next download whose size rounds to the same block size
(a multiple of 2 MiB) reuses it, already faulted in.

Lifetime and aliasing invariant: a block is in exactly one of two states. *Handed out*: the
only strong reference to it is held by one `_Handout` object made for that handout, a ctypes
array over the block's address; `torch.frombuffer` makes the result's storage own that object
(the storage's deleter drops it), so it lives exactly as long as the storage, i.e. as long as
the result or any view, slice, `.numpy()` array or other alias of that storage. Its
`__del__` (which runs once, when the storage dies; every handout is a new object, so PEP 442's
run-once rule is not in the way) moves the block to *free*: held by the cache, owned by no
tensor, and the only state in which a block is handed out again or unmapped. A result moved to
shared memory (`share_memory_()`, or pickling by torch.multiprocessing) gets a new storage
allocation; torch drops the old one then, which frees the block while the tensor, now in
shared memory, lives on. A reused block holds the bytes of an older result of this process
until the download overwrites all of it; a download that fails drops its result unseen.

Memory held: up to GPUPOOL_HOST_CACHE_BYTES (bytes, default 1 GiB; 0 turns the cache off and
every result is a `torch.empty` as in Note [Huge pages]) of free, resident blocks, on top of
the results alive; a block that would not fit is unmapped at once, the least recently freed
blocks first making room. `empty_host_cache()` unmaps every free block (like
`torch.cuda.empty_cache`). A block is the result's size rounded up to 2 MiB.

Threads: `__del__` may run on any thread, at any point where Python frees objects, including
inside the cache's own critical section on the same thread. The cache lock is therefore never
waited for there: a finalizer that cannot take it at once unmaps its block instead, and a
download that cannot take it maps a fresh block. Critical sections allocate nothing that the
garbage collector tracks.

Difference from `torch.empty`: the result's storage is not resizable (torch storages over a
Python buffer never are), so growing it in place (`resize_` to more bytes) raises.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import sys
import threading
import warnings
from typing import Any

import torch

#: Buffers smaller than this are not advised (a few faults; the call would cost more), nor cached.
HUGE_MIN_BYTES = 8 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

#: Environment variable: the most bytes of free blocks the host cache keeps (see Note [Host cache]).
CACHE_ENV = "GPUPOOL_HOST_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 1 << 30


def _load_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()
_CAN_MAP = sys.platform.startswith("linux") and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")


@functools.lru_cache(maxsize=8)
def _parse_limit(raw: str) -> int:
    try:
        return max(0, int(raw))
    except ValueError:
        warnings.warn(f"{CACHE_ENV}={raw!r} is not a number of bytes; using {DEFAULT_CACHE_BYTES}", stacklevel=3)
        return DEFAULT_CACHE_BYTES


def cache_limit() -> int:
    """The most bytes of free blocks the host cache keeps now (read from the environment)."""
    raw = os.environ.get(CACHE_ENV)
    return DEFAULT_CACHE_BYTES if raw is None else _parse_limit(raw)


class _Block:
    """One anonymous private mapping of `size` bytes at `addr` (`mm` unmaps it when closed)."""

    __slots__ = ("addr", "mm", "size")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size = size
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE)  # the whole mapping is ours; a hint
            except OSError:
                pass
        # The temporary ctypes view exports the buffer only until it dies at the end of this line.
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def close(self) -> None:
        self.mm.close()


class _HostCache:
    """Free blocks, least recently freed first (see Note [Host cache])."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Block] = []
        self._bytes = 0

    def take(self, size: int) -> _Block | None:
        """A free block of `size` bytes, now handed out; None if there is none (or the lock is busy)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            free = self._free
            for i in range(len(free) - 1, -1, -1):  # most recently freed: likeliest still hot
                if free[i].size == size:
                    block = free.pop(i)
                    self._bytes -= size
                    return block
            return None
        finally:
            self._lock.release()

    def give(self, block: _Block) -> None:
        """Take back a block no tensor uses any more; unmap what does not fit the bound."""
        evicted = [block]
        limit = cache_limit()
        if block.size <= limit and self._lock.acquire(blocking=False):
            try:
                evicted.pop()
                free = self._free
                while free and self._bytes + block.size > limit:
                    old = free.pop(0)
                    self._bytes -= old.size
                    evicted.append(old)
                free.append(block)
                self._bytes += block.size
            finally:
                self._lock.release()
        for b in evicted:
            b.close()

    def clear(self) -> None:
        fresh: list[_Block] = []
        with self._lock:  # never called from a finalizer
            evicted, self._free, self._bytes = self._free, fresh, 0
        for b in evicted:
            b.close()

    def cached_bytes(self) -> int:
        return self._bytes

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread that held it does not exist in the child


_cache = _HostCache()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_cache._after_fork)


def _handout_del(self: Any) -> None:
    # Runs once per handout, when the result's storage (the last alias of the block) dies.
    try:
        block, cache = self._gpupool_block, self._gpupool_cache
    except AttributeError:  # construction failed before they were set
        return
    cache.give(block)


@functools.lru_cache(maxsize=64)
def _handout_type(nbytes: int) -> Any:
    """A ctypes array type of `nbytes` bytes whose instances give their block back when they die."""
    return type("_Handout", (ctypes.c_char * nbytes,), {"__del__": _handout_del})


def _from_block(block: _Block, shape: torch.Size, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    handout = _handout_type(nbytes).from_address(block.addr)
    handout._gpupool_block = block
    handout._gpupool_cache = _cache
    storage = torch.frombuffer(handout, dtype=torch.uint8).untyped_storage()  # owns `handout`
    del handout
    # A plain (non-view) contiguous tensor on that storage, as `torch.empty` would return.
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def empty_host_cache() -> None:
    """Unmap every free block of the host download cache (blocks of live results stay)."""
    _cache.clear()


def host_cache_bytes() -> int:
    """Bytes of free blocks the host download cache holds now."""
    return _cache.cached_bytes()


def empty_for_download(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor to download into: from the host cache when large (see
    Note [Host cache]), else a `torch.empty`, advised huge pages when large (Note [Huge pages]).
    Its contents are arbitrary."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= HUGE_MIN_BYTES and _CAN_MAP:
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        if size <= cache_limit():
            block = _cache.take(size)
            if block is None:
                block = _Block(size)
            return _from_block(block, torch.Size(shape), dtype, nbytes)
    out = torch.empty(shape, dtype=dtype)
    if _madvise is not None and nbytes >= HUGE_MIN_BYTES:
        p = out.data_ptr()
        start = (p + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (p + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return out
