"""Placement and queueing as pure functions over a snapshot of the pool (no I/O, no clock).

The pipeline follows the Kubernetes scheduler framework: `server_candidates` keeps a server's
GPUs that can take one GPU's share of a request, `score_gpu`/`score_server` order them, and
`place` binds a request to the best server. The store builds a `Snapshot` inside a transaction, runs
`schedule_queue`, and writes the grants back in the same transaction.

Rules (docs/controller.md has the long form):
- A request is `n` GPUs, each whole, a fraction of its memory, or a number of bytes.
- All GPUs of a request are on one server.
- A whole-GPU lease is exclusive: it takes only an idle GPU, and nothing shares it afterwards.
- Fractions become bytes on the chosen GPU: floor(p * memory), at least 1 byte; a GPU on which
  that is under the share's `min_bytes` (1 MiB through the API, Note [Least share] in app.py)
  does not match the request.
- Packing (default) uses partly used GPUs and busy servers first, so whole GPUs stay free;
  `spread` does the opposite.
- Servers that are down or draining are not placed on.

Note [No over-commit]: `place` only returns GPUs where `gpu_fits` holds, and `apply` adds exactly
the bytes it placed, so as long as every grant goes through `apply` on the snapshot that later
grants see (the store does this under one write lock), the bytes leased on a GPU never exceed its
memory. The property tests in tests/test_scheduler.py check this over random grant/release runs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Literal

from gpupool.units import format_bytes as _fmt

ShareKind = Literal["whole", "fraction", "bytes"]


@dataclass(frozen=True)
class Share:
    """How much of each GPU a request wants: the whole GPU, a fraction of its memory, or bytes."""

    kind: ShareKind = "whole"
    fraction: float = 1.0
    bytes: int = 0
    min_bytes: int = 0  # a fraction: only GPUs on which it comes to at least this many bytes

    def __post_init__(self) -> None:
        if self.kind == "fraction" and not (0 < self.fraction <= 1):
            raise ValueError(f"a fraction of a GPU must be in (0, 1], not {self.fraction}")
        if self.kind == "bytes" and self.bytes <= 0:
            raise ValueError(f"a memory share must be at least 1 byte, not {self.bytes}")
        if self.kind not in ("whole", "fraction", "bytes"):
            raise ValueError(f"unknown share kind {self.kind!r}")

    @staticmethod
    def whole() -> Share:
        return Share("whole")

    @staticmethod
    def of(fraction: float, min_bytes: int = 0) -> Share:
        return Share("fraction", fraction=fraction, min_bytes=min_bytes)

    @staticmethod
    def of_bytes(n: int) -> Share:
        return Share("bytes", bytes=n)

    def describe(self) -> str:
        if self.kind == "whole":
            return "a whole GPU"
        if self.kind == "fraction":
            return f"{self.fraction:g} of a GPU's memory"
        return f"{_fmt(self.bytes)}"


@dataclass(frozen=True)
class Request:
    """A request for `n` GPUs on one server, each with `share`, among GPUs that pass the filters.

    Filters: `model` (case-insensitive substring of the GPU's model), `kind` ("cuda" or "cpu"),
    `min_memory_bytes` (the GPU's total memory), `server` (id, name or address), `labels` (each
    key=value present on the GPU or its server).
    """

    n: int = 1
    share: Share = field(default_factory=Share.whole)
    model: str | None = None
    kind: str | None = None
    min_memory_bytes: int | None = None
    server: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    spread: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"a request needs at least 1 GPU, not {self.n}")

    def describe(self) -> str:
        parts = [f"{self.n} × {self.share.describe()}"]
        for name in ("model", "kind", "server"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        if self.min_memory_bytes:
            parts.append(f"min_memory={_fmt(self.min_memory_bytes)}")
        parts += [f"{k}={v}" for k, v in sorted(self.labels.items())]
        return ", ".join(parts)


@dataclass(frozen=True)
class GpuView:
    """A GPU as the scheduler sees it: identity, capacity, and what active leases hold on it."""

    id: str
    index: int
    memory_bytes: int
    model: str = "GPU"
    kind: str = "cuda"
    uuid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    allocated_bytes: int = 0
    exclusive: bool = False
    leases: int = 0

    @property
    def free_bytes(self) -> int:
        return 0 if self.exclusive else self.memory_bytes - self.allocated_bytes


@dataclass(frozen=True)
class ServerView:
    id: str
    name: str
    address: str
    gpus: tuple[GpuView, ...]
    state: Literal["up", "down"] = "up"
    draining: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.state == "up" and not self.draining


@dataclass(frozen=True)
class Snapshot:
    servers: tuple[ServerView, ...] = ()

    def gpus(self) -> Iterable[tuple[ServerView, GpuView]]:
        for s in self.servers:
            for g in s.gpus:
                yield s, g

    def gpu(self, gpu_id: str, server_id: str | None = None) -> GpuView:
        """The GPU `gpu_id` (of server `server_id`, when given: a shorter search)."""
        for s in self.servers:
            if server_id is None or s.id == server_id:
                for g in s.gpus:
                    if g.id == gpu_id:
                        return g
        raise KeyError(gpu_id)


@dataclass(frozen=True)
class GpuGrant:
    gpu_id: str
    index: int
    uuid: str
    bytes: int


@dataclass(frozen=True)
class Placement:
    """Where a request goes: one server, and the bytes on each of its chosen GPUs."""

    server_id: str
    address: str
    gpus: tuple[GpuGrant, ...]
    exclusive: bool


# -- filter -------------------------------------------------------------------------------------


def need_bytes(share: Share, gpu: GpuView) -> int:
    """The bytes `share` takes on `gpu`. Note: floor, so two halves always fit on an odd-sized GPU."""
    if share.kind == "whole":
        return gpu.memory_bytes
    if share.kind == "fraction":
        return _fraction_bytes(share.fraction, gpu.memory_bytes)
    return share.bytes


@functools.lru_cache(maxsize=4096)
def _fraction_bytes(fraction: float, memory_bytes: int) -> int:
    # Cached: placement asks this for every GPU of the pool, and exact Fraction arithmetic is
    # ~2 µs a call; a pool has few distinct (share, GPU size) pairs.
    return max(1, int(Fraction(fraction) * memory_bytes))


def gpu_fits(share: Share, gpu: GpuView) -> bool:
    """Whether `share` fits on `gpu` now. A whole-GPU share needs an idle GPU; nothing joins an
    exclusive one."""
    if gpu.exclusive:
        return False
    if share.kind == "whole":
        return gpu.leases == 0 and gpu.allocated_bytes == 0
    return gpu.allocated_bytes + need_bytes(share, gpu) <= gpu.memory_bytes


def server_matches(req: Request, server: ServerView) -> bool:
    return req.server is None or req.server in (server.id, server.name, server.address)


def share_too_small(share: Share, gpu: GpuView) -> bool:
    """A fraction that comes to less than its `min_bytes` on `gpu`."""
    return share.kind == "fraction" and need_bytes(share, gpu) < share.min_bytes


def gpu_matches(req: Request, server: ServerView, gpu: GpuView) -> bool:
    """The request's filters, apart from the server and capacity (and a fraction too small for the GPU)."""
    if share_too_small(req.share, gpu):
        return False
    if req.model is not None and req.model.lower() not in gpu.model.lower():
        return False
    if req.kind is not None and req.kind != gpu.kind:
        return False
    if req.min_memory_bytes is not None and gpu.memory_bytes < req.min_memory_bytes:
        return False
    labels = {**server.labels, **gpu.labels}
    return all(labels.get(k) == v for k, v in req.labels.items())


def server_candidates(req: Request, server: ServerView) -> list[GpuView]:
    """The GPUs of `server` that match the request's filters and can take one share now."""
    return [g for g in server.gpus if gpu_matches(req, server, g) and gpu_fits(req.share, g)]


# -- score --------------------------------------------------------------------------------------


def score_gpu(req: Request, gpu: GpuView) -> tuple:
    """Lower is better. Packing: partly used GPUs first, then the tightest fit. Spread: the least
    used first, then the most room left."""
    free_after = gpu.memory_bytes - gpu.allocated_bytes - need_bytes(req.share, gpu)
    if req.spread:
        return (Fraction(gpu.allocated_bytes, gpu.memory_bytes), gpu.leases, -free_after, gpu.id)
    return (0 if gpu.allocated_bytes > 0 else 1, free_after, gpu.id)


def score_server(req: Request, server: ServerView, chosen: Sequence[GpuView]) -> tuple:
    """Lower is better. Packing prefers servers already in use and GPUs already in use, so idle
    servers and idle GPUs stay whole; spread prefers the least used server."""
    total = sum(g.memory_bytes for g in server.gpus)
    used = sum(g.memory_bytes if g.exclusive else g.allocated_bytes for g in server.gpus)
    free_after = sum(g.memory_bytes - g.allocated_bytes - need_bytes(req.share, g) for g in chosen)
    if req.spread:
        return (Fraction(used, total) if total else Fraction(0), -free_after, server.id)
    idle_used = sum(1 for g in chosen if g.allocated_bytes == 0)
    return (idle_used, 0 if used > 0 else 1, free_after, server.id)


# -- place --------------------------------------------------------------------------------------


def server_choice(req: Request, server: ServerView) -> tuple[tuple, list[GpuView]] | None:
    """The best `req.n` GPUs of `server` for `req` and the server's score, or None if fewer fit."""
    gpus = server_candidates(req, server)
    if len(gpus) < req.n:
        return None
    chosen = sorted(gpus, key=lambda g: score_gpu(req, g))[: req.n]
    return score_server(req, server, chosen), chosen


_MEMO_PER_SERVER = 32


_MEMO_KEYS: dict[tuple, int] = {}
_NEXT_KEY = itertools.count()


def _memo_key(req: Request) -> int:
    """A number per request shape, looked up once per placement instead of hashing the shape once
    per server. Numbers are never reused (not even after the table is cleared), so a memo never
    answers for another shape."""
    shape = (req.n, req.share.kind, req.share.fraction, req.share.bytes, req.share.min_bytes, req.model, req.kind,
             req.min_memory_bytes, tuple(sorted(req.labels.items())), req.spread)
    key = _MEMO_KEYS.get(shape)
    if key is None:
        if len(_MEMO_KEYS) >= 10_000:
            _MEMO_KEYS.clear()
        key = _MEMO_KEYS[shape] = next(_NEXT_KEY)
    return key


def _server_choice_memo(req: Request, key: int, server: ServerView) -> tuple[tuple, list[GpuView]] | None:
    """`server_choice`, remembered on the server view.

    Note: a `ServerView` is frozen, and a grant or release makes a new one for the server it
    touches (`apply`, `unapply`) while the others are shared with the old snapshot, so the
    answer for a request shape stays right for as long as the view lives. The store keeps its
    snapshot between requests (Note [Pool cache] in store.py), so placing on a pool of 1,000 GPUs
    computes only the servers that changed since the last placement.
    """
    memo: dict[int, tuple[tuple, list[GpuView]] | None] = server.__dict__.setdefault("_choices", {})
    if key in memo:
        return memo[key]
    if len(memo) >= _MEMO_PER_SERVER:
        memo.clear()
    choice = memo[key] = server_choice(req, server)
    return choice


def place(req: Request, snap: Snapshot) -> Placement | None:
    """The best placement of the whole request on one server, or None: never a part of it."""
    best: tuple[tuple, ServerView, list[GpuView]] | None = None
    key = _memo_key(req)
    for server in snap.servers:
        if not server.usable or not server_matches(req, server):
            continue
        choice = _server_choice_memo(req, key, server)
        if choice is not None and (best is None or choice[0] < best[0]):
            best = (choice[0], server, choice[1])
    if best is None:
        return None
    _, server, chosen = best
    chosen = sorted(chosen, key=lambda g: g.index)
    grants = tuple(GpuGrant(g.id, g.index, g.uuid, need_bytes(req.share, g)) for g in chosen)
    return Placement(server.id, server.address, grants, req.share.kind == "whole")


def _update_gpus(snap: Snapshot, placement: Placement, sign: int) -> Snapshot:
    by_id = {g.gpu_id: g for g in placement.gpus}
    servers = []
    for s in snap.servers:
        if s.id != placement.server_id:
            servers.append(s)
            continue
        gpus = []
        for g in s.gpus:
            grant = by_id.get(g.id)
            if grant is not None:
                g = replace(g, allocated_bytes=g.allocated_bytes + sign * grant.bytes,
                            leases=g.leases + sign,
                            exclusive=(g.exclusive or placement.exclusive) if sign > 0
                            else (g.exclusive and not placement.exclusive))
            gpus.append(g)
        servers.append(replace(s, gpus=tuple(gpus)))
    return Snapshot(tuple(servers))


def apply(snap: Snapshot, placement: Placement) -> Snapshot:
    """The snapshot after granting `placement`."""
    return _update_gpus(snap, placement, +1)


def unapply(snap: Snapshot, placement: Placement) -> Snapshot:
    """The snapshot after releasing a placement that `apply` granted earlier."""
    return _update_gpus(snap, placement, -1)


def emptied(snap: Snapshot) -> Snapshot:
    """The same pool with nothing leased: to tell "busy now" from "can never fit"."""
    return Snapshot(tuple(
        replace(s, gpus=tuple(replace(g, allocated_bytes=0, exclusive=False, leases=0) for g in s.gpus))
        for s in snap.servers))


def feasible(req: Request, snap: Snapshot) -> bool:
    """Whether the request could be placed if every lease in the pool were released."""
    return place(req, emptied(snap)) is not None


def explain(req: Request, snap: Snapshot) -> str:
    """Why `req` cannot be placed on `snap` now, in words a user can act on."""
    if not snap.servers:
        return "no GPU servers are registered with the controller"
    named = [s for s in snap.servers if server_matches(req, s)]
    if not named:
        return f"no server is named {req.server!r}"
    usable = [s for s in named if s.usable]
    if not usable:
        down = sum(1 for s in named if s.state == "down")
        return f"no server is up and accepting leases ({down} down, {len(named) - down} draining)"
    matching = [(s, [g for g in s.gpus if gpu_matches(req, s, g)]) for s in usable]
    matching = [(s, gs) for s, gs in matching if gs]
    if not matching:
        small = [g for s in usable for g in s.gpus if share_too_small(req.share, g)]
        if small:
            largest = max(g.memory_bytes for g in small)
            return (f"{req.share.describe()} is under {_fmt(req.share.min_bytes)} on every GPU it could go on "
                    f"(the largest has {_fmt(largest)}): ask for a larger fraction")
        models = sorted({g.model for s in usable for g in s.gpus})
        return f"no GPU matches the filters ({req.describe()}); the pool has: {', '.join(models)}"
    most = max(len(gs) for _, gs in matching)
    if most < req.n:
        return f"the request needs {req.n} GPUs on one server, but no matching server has more than {most}"
    if req.share.kind == "bytes":
        largest = max(g.memory_bytes for _, gs in matching for g in gs)
        if req.share.bytes > largest:
            return f"the request needs {_fmt(req.share.bytes)} per GPU, but the largest matching GPU has {_fmt(largest)}"
    fitting = [(s, [g for g in gs if gpu_fits(req.share, g)]) for s, gs in matching]
    best = max(len(gs) for _, gs in fitting)
    n_gpus = sum(len(gs) for _, gs in matching)
    free = max((g.free_bytes for _, gs in matching for g in gs), default=0)
    return (f"the {n_gpus} matching GPU(s) are busy: the request needs {req.n} × {req.share.describe()} on one "
            f"server, and at most {best} GPU(s) on one server have that much free "
            f"(the most free memory on one GPU is {_fmt(free)})")


def placement_worth(placement: Placement, snap: Snapshot) -> Fraction:
    """How many GPUs' worth of memory a placement takes: the quota unit."""
    return sum((Fraction(g.bytes, snap.gpu(g.gpu_id, placement.server_id).memory_bytes) for g in placement.gpus),
               Fraction(0))


def least_worth(req: Request, snap: Snapshot) -> Fraction | None:
    """A lower bound of the GPUs' worth any placement of `req` takes, or None if it fits nowhere."""
    worths = []
    for s, g in snap.gpus():
        if s.usable and server_matches(req, s) and gpu_matches(req, s, g):
            need = need_bytes(req.share, g)
            if need <= g.memory_bytes:
                worths.append(Fraction(need, g.memory_bytes))
    return req.n * min(worths) if worths else None


# -- queue --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueItem:
    """A waiting request: higher `priority` first, then lower `seq` (arrival order)."""

    id: str
    user: str
    request: Request
    priority: int = 0
    seq: int = 0


@dataclass(frozen=True)
class Grant:
    item_id: str
    placement: Placement
    worth: Fraction


@dataclass(frozen=True)
class Reject:
    item_id: str
    reason: str
    code: Literal["unsatisfiable", "quota_exceeded"]


def queue_order(items: Iterable[QueueItem]) -> list[QueueItem]:
    """FIFO within a priority, higher priorities first."""
    return sorted(items, key=lambda it: (-it.priority, it.seq))


def queue_position(items: Iterable[QueueItem], item_id: str) -> int:
    """1-based place of `item_id` in the queue (1: next to be served)."""
    for i, it in enumerate(queue_order(items), 1):
        if it.id == item_id:
            return i
    raise KeyError(item_id)


def quota_left(user: str, usage: Mapping[str, Fraction], quotas: Mapping[str, Fraction | None]) -> Fraction | None:
    q = quotas.get(user)
    return None if q is None else q - usage.get(user, Fraction(0))


def schedule_queue(snap: Snapshot, items: Iterable[QueueItem], usage: Mapping[str, Fraction],
                   quotas: Mapping[str, Fraction | None]) -> tuple[list[Grant | Reject], Snapshot]:
    """Serve the queue in order on `snap`; return the decisions and the snapshot after the grants.

    Note [Queue order]: strict FIFO within a priority: when the first waiting request does not fit,
    nothing behind it is granted, so a large request is not starved by a stream of small ones.
    Two kinds of request do not block the queue: one held back only by its user's own quota (it
    waits for that user to release, not for capacity), and one that can never fit the pool as it
    is now (rejected with the reason, so it does not block forever).
    """
    usage = dict(usage)
    decisions: list[Grant | Reject] = []
    # Note: the emptied pool (for "can this ever fit?") is the same after any grant, and costs a
    # copy of every GPU: it is built only when a request needs it.
    empty_pool: list[Snapshot] = []

    def empty() -> Snapshot:
        if not empty_pool:
            empty_pool.append(emptied(snap))
        return empty_pool[0]

    for it in queue_order(items):
        req = it.request
        quota = quotas.get(it.user)
        if quota is None:
            # Fast path: a request that fits the pool as it is now also fits it emptied.
            placement = place(req, snap)
            if placement is None:
                if place(req, empty()) is None:
                    decisions.append(Reject(it.id, explain(req, empty()), "unsatisfiable"))
                    continue
                break
            worth = placement_worth(placement, snap)
            decisions.append(Grant(it.id, placement, worth))
            snap = apply(snap, placement)
            usage[it.user] = usage.get(it.user, Fraction(0)) + worth
            continue
        if place(req, empty()) is None:
            decisions.append(Reject(it.id, explain(req, empty()), "unsatisfiable"))
            continue
        if quota is not None:
            floor = least_worth(req, empty()) or Fraction(0)
            if floor > quota:
                decisions.append(Reject(
                    it.id, f"the request needs at least {float(floor):g} GPUs' worth of memory, "
                    f"but {it.user}'s quota is {float(quota):g}", "quota_exceeded"))
                continue
            if usage.get(it.user, Fraction(0)) + floor > quota:
                continue  # held back by its own user's quota: waits without blocking others
        placement = place(req, snap)
        if placement is None:
            break
        worth = placement_worth(placement, snap)
        if quota is not None and usage.get(it.user, Fraction(0)) + worth > quota:
            continue
        decisions.append(Grant(it.id, placement, worth))
        snap = apply(snap, placement)
        usage[it.user] = usage.get(it.user, Fraction(0)) + worth
    return decisions, snap
