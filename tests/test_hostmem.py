"""The host cache for large `.cpu()` results (see Note [Host cache] in gpupool/client/hostmem.py).

The allocator is tested directly (real torch, no server) where it can be; the last tests go
through a real server.
"""

from __future__ import annotations

import gc
import io
import multiprocessing
import pickle
import threading
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # registers torch's reducers with ForkingPickler

import gpupool
from gpupool.client import hostmem
from gpupool.client.hostmem import CACHE_ENV, HUGE_MIN_BYTES, empty_for_download, host_cache_bytes

MiB = 1 << 20
BLOCK = 16 * MiB  # a result size that is a whole number of 2 MiB pages
SHAPE = torch.Size([BLOCK // 4 // 64, 64])  # float32: BLOCK bytes


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(CACHE_ENV, str(1 << 30))
    hostmem.empty_host_cache()
    yield
    gc.collect()
    hostmem.empty_host_cache()


def new(shape: torch.Size = SHAPE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return empty_for_download(shape, dtype)


def pattern(shape: torch.Size = SHAPE) -> torch.Tensor:
    return torch.arange(shape.numel(), dtype=torch.float32).reshape(shape)


def test_block_is_reused_after_result_dies() -> None:
    a = new()
    p = a.data_ptr()
    assert host_cache_bytes() == 0
    del a
    assert host_cache_bytes() == BLOCK
    b = new()
    assert b.data_ptr() == p
    assert host_cache_bytes() == 0


def test_sizes_rounding_to_one_block_share_it() -> None:
    a = new(torch.Size([HUGE_MIN_BYTES + 12]), torch.uint8)
    p = a.data_ptr()
    del a
    b = new(torch.Size([(HUGE_MIN_BYTES + 100) // 4]), torch.int32)
    assert b.data_ptr() == p and b.numel() == (HUGE_MIN_BYTES + 100) // 4
    del b
    c = new(torch.Size([HUGE_MIN_BYTES + (2 << 20) + 1]), torch.uint8)  # the next 2 MiB: another block
    assert c.data_ptr() != p


def test_small_results_are_not_cached() -> None:
    a = new(torch.Size([HUGE_MIN_BYTES // 4 - 1]))
    del a
    assert host_cache_bytes() == 0


ALIASES: dict[str, Callable[[torch.Tensor], object]] = {
    "view": lambda a: a.view(-1),
    "slice": lambda a: a[5:9, 3:],
    "transpose": lambda a: a.t(),
    "numpy": lambda a: a.numpy(),
    "numpy_slice": lambda a: a.numpy()[7:],
    "memoryview": lambda a: memoryview(a.numpy()),
    "storage": lambda a: a.untyped_storage(),
    "detach": lambda a: a.detach(),
    "set_": lambda a: torch.empty(0).set_(a.untyped_storage(), 0, (10,)),
}


def _values(alias: object) -> torch.Tensor:
    if isinstance(alias, torch.UntypedStorage):
        return torch.empty(0, dtype=torch.float32).set_(alias, 0, SHAPE).clone()
    if isinstance(alias, memoryview):
        return torch.from_numpy(np.asarray(alias)).clone()
    if isinstance(alias, np.ndarray):
        return torch.from_numpy(alias.copy())
    assert isinstance(alias, torch.Tensor)
    return alias.clone()


@pytest.mark.parametrize("kind", sorted(ALIASES))
def test_block_is_not_reused_while_an_alias_lives(kind: str) -> None:
    a = new()
    p = a.data_ptr()
    a.copy_(pattern())
    alias = ALIASES[kind](a)
    expected = _values(alias)
    del a
    gc.collect()
    assert host_cache_bytes() == 0
    b = new()  # must be another block: the old one still backs `alias`
    assert b.data_ptr() != p
    b.fill_(-1.0)
    del b  # `b`'s block goes to the cache; `alias`'s block must not be touched
    c = new()
    c.fill_(-2.0)
    assert torch.equal(_values(alias), expected)
    del c, alias
    gc.collect()
    assert host_cache_bytes() == 2 * BLOCK  # both blocks are free now, the alias's among them
    x, y = new(), new()
    assert p in {x.data_ptr(), y.data_ptr()}


@pytest.mark.parametrize(
    "shape,dtype",
    [
        (SHAPE, torch.float32),
        (torch.Size([3, 1 << 20, 3]), torch.float64),
        (torch.Size([5 << 20]), torch.int16),
        (torch.Size([9 << 20]), torch.bool),
        (torch.Size([2, 1 << 20]), torch.complex64),
        (torch.Size([1 << 22, 2]), torch.bfloat16),
    ],
)
def test_result_is_an_ordinary_cpu_tensor(shape: torch.Size, dtype: torch.dtype) -> None:
    for _ in range(2):  # a fresh block, then a reused one
        a = new(shape, dtype)
        ref = torch.empty(shape, dtype=dtype)
        assert (a.shape, a.dtype, a.stride(), a.device) == (ref.shape, ref.dtype, ref.stride(), ref.device)
        assert a.is_contiguous() and a._base is None and not a.requires_grad
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()
        src = torch.randn(shape).to(dtype) if dtype != torch.bool else torch.rand(shape) > 0.5
        a.copy_(src)  # writable
        assert torch.equal(a, src)
        if dtype != torch.bfloat16:
            assert np.array_equal(a.numpy(), src.numpy())
        buf = io.BytesIO()
        torch.save(a, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf), src)
        assert torch.equal(pickle.loads(pickle.dumps(a)), src)
        if dtype.is_floating_point:
            torch.testing.assert_close(a * 2 + 1, src * 2 + 1)
            a.mul_(0.5)
            torch.testing.assert_close(a, src * 0.5)
        del a


def test_share_memory_moves_the_result_and_frees_the_block() -> None:
    a = new()
    p = a.data_ptr()
    a.copy_(pattern())
    a.share_memory_()
    assert a.is_shared() and a.data_ptr() != p
    assert host_cache_bytes() == BLOCK  # the old storage memory went back
    b = new()
    assert b.data_ptr() == p
    b.fill_(-1.0)
    assert torch.equal(a, pattern())


def test_torch_multiprocessing_pickle_moves_the_result() -> None:
    a = new()
    p = a.data_ptr()
    a.copy_(pattern())
    data = ForkingPickler.dumps(a)
    assert a.is_shared() and a.data_ptr() != p
    b = new()
    assert b.data_ptr() == p
    b.fill_(-1.0)
    other = pickle.loads(data)  # the same shared memory
    assert torch.equal(other, pattern()) and torch.equal(a, pattern())


def _child_fill(q: multiprocessing.Queue, done: multiprocessing.Queue) -> None:
    t = q.get()
    t.fill_(7.0)
    done.put(float(t.sum()))


def test_result_sent_to_a_child_process_is_shared() -> None:
    ctx = torch.multiprocessing.get_context("spawn")  # torch's thread pool does not survive fork
    q, done = ctx.Queue(), ctx.Queue()
    a = new()
    a.copy_(pattern())
    proc = ctx.Process(target=_child_fill, args=(q, done))
    proc.start()
    try:
        q.put(a)
        assert done.get(timeout=120) == 7.0 * a.numel()
    finally:
        proc.join(30)
    assert proc.exitcode == 0
    assert torch.equal(a, torch.full(SHAPE, 7.0))
    b = new()
    b.fill_(-1.0)  # the original block, reused: `a` is unaffected
    assert torch.equal(a, torch.full(SHAPE, 7.0))


def test_bound_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(3 * BLOCK))
    live: list[torch.Tensor | None] = [new() for _ in range(5)]
    ptrs = [t.data_ptr() for t in live if t is not None]
    for i in range(len(live)):  # freed in order
        live[i] = None
    assert host_cache_bytes() == 3 * BLOCK
    assert len(hostmem._cache._free) == 3
    # The most recently freed blocks stay, the oldest were unmapped.
    assert {b.addr for b in hostmem._cache._free} == set(ptrs[2:])
    # A bigger block evicts old ones to fit.
    big = new(torch.Size([2 * BLOCK]), torch.uint8)
    del big
    assert host_cache_bytes() == 3 * BLOCK
    assert sorted(b.size for b in hostmem._cache._free) == [BLOCK, 2 * BLOCK]


def test_result_bigger_than_the_bound_is_a_plain_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(BLOCK - 1))
    a = new()
    assert a.untyped_storage().resizable()
    del a
    assert host_cache_bytes() == 0


def test_zero_turns_the_cache_off(monkeypatch: pytest.MonkeyPatch) -> None:
    a = new()
    monkeypatch.setenv(CACHE_ENV, "0")
    del a  # handed out before, freed now: unmapped, not cached
    assert host_cache_bytes() == 0
    b = new()
    assert b.untyped_storage().resizable()  # a torch.empty, as without the cache
    b.resize_(2 * b.numel())
    del b
    assert host_cache_bytes() == 0


def test_empty_host_cache_releases_free_blocks() -> None:
    a, b = new(), new()
    del a
    assert host_cache_bytes() == BLOCK
    gpupool.empty_host_cache()
    assert host_cache_bytes() == 0 and hostmem._cache._free == []
    b.fill_(1.0)  # a live result is untouched
    del b
    assert host_cache_bytes() == BLOCK


def test_finalizer_never_waits_for_the_lock() -> None:
    """A result dying while the cache lock is held (another thread, or GC inside the cache's own
    critical section) unmaps its block instead of blocking."""
    a = new()
    with hostmem._cache._lock:
        del a
        assert hostmem._cache.take(BLOCK) is None  # a download then maps a fresh block
    assert host_cache_bytes() == 0


def test_threads_share_the_cache() -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(20):
                a = new()
                a.fill_(float(seed * 100 + i))
                assert bool((a == seed * 100 + i).all())
                del a
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    free = hostmem._cache._free
    assert host_cache_bytes() == sum(b.size for b in free) <= 4 * BLOCK
    assert len({b.addr for b in free}) == len(free)


def test_download_reuses_the_block_and_is_exact(session) -> None:
    n = BLOCK // 4 + 77
    x = torch.arange(n, dtype=torch.int32)
    d = x.to(session.device)
    a = d.cpu()
    p = a.data_ptr()
    assert torch.equal(a, x)
    b = d[1:].cpu()  # same block size; `a` is alive, so another block
    assert b.data_ptr() != p and torch.equal(b, x[1:])
    del a
    c = (d + 1).cpu()
    assert c.data_ptr() == p and torch.equal(c, x + 1)
    assert torch.equal(b, x[1:])
