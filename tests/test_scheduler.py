"""The scheduler's rules and invariants, on plain data (no database, no HTTP).

Property tests (hypothesis) check the invariants over random pools, requests and grant/release
sequences: bytes leased on a GPU never exceed its memory; a whole-GPU lease is exclusive; a request
is granted whole or not at all; the queue is served in order and within quotas.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from gpupool.controller.scheduler import (
    GpuView,
    Grant,
    Placement,
    QueueItem,
    Reject,
    Request,
    ServerView,
    Share,
    Snapshot,
    apply,
    emptied,
    explain,
    gpu_fits,
    gpu_matches,
    least_worth,
    need_bytes,
    place,
    placement_worth,
    queue_order,
    queue_position,
    schedule_queue,
    server_matches,
    unapply,
)

GiB = 1024**3


def server(sid: str, *mems: int, state: str = "up", draining: bool = False, model: str = "H200",
           labels: dict[str, str] | None = None) -> ServerView:
    gpus = tuple(GpuView(f"{sid}-{i}", i, m, model=model, uuid=f"uuid-{sid}-{i}") for i, m in enumerate(mems))
    return ServerView(sid, sid, f"{sid}:7777", gpus, state=state, draining=draining,  # type: ignore[arg-type]
                      labels=labels or {})


# -- examples -----------------------------------------------------------------------------------


def test_two_halves_share_a_gpu_and_a_third_is_refused() -> None:
    snap = Snapshot((server("a", 8 * GiB),))
    half = Request(1, Share.of(0.5))
    p1 = place(half, snap)
    assert p1 is not None and p1.gpus[0].bytes == 4 * GiB and not p1.exclusive
    snap = apply(snap, p1)
    p2 = place(half, snap)
    assert p2 is not None and p2.gpus[0].gpu_id == "a-0"
    snap = apply(snap, p2)
    assert snap.gpu("a-0").allocated_bytes == 8 * GiB
    assert place(half, snap) is None
    assert "busy" in explain(half, snap)
    snap = unapply(snap, p1)
    assert place(half, snap) is not None


def test_fraction_becomes_bytes_by_floor_on_the_chosen_gpu() -> None:
    snap = Snapshot((server("a", 7),))
    p = place(Request(1, Share.of(0.5)), snap)
    assert p is not None and p.gpus[0].bytes == 3
    snap = apply(snap, p)
    p2 = place(Request(1, Share.of(0.5)), snap)
    assert p2 is not None, "two halves of an odd-sized GPU must both fit"


def test_whole_gpu_is_exclusive_and_needs_an_idle_gpu() -> None:
    snap = Snapshot((server("a", 100, 100),))
    p = place(Request(1, Share.of_bytes(1)), snap)
    assert p is not None
    snap = apply(snap, p)
    whole = place(Request(1), snap)
    assert whole is not None and whole.gpus[0].gpu_id != p.gpus[0].gpu_id and whole.exclusive
    snap = apply(snap, whole)
    g = snap.gpu(whole.gpus[0].gpu_id)
    assert g.exclusive and g.allocated_bytes == 100
    assert place(Request(1, Share.of_bytes(1)), snap) is not None  # the other GPU has room
    assert place(Request(1), snap) is None
    snap = apply(snap, place(Request(1, Share.of_bytes(99)), snap))  # type: ignore[arg-type]
    assert place(Request(1, Share.of_bytes(1)), snap) is None, "nothing may join an exclusive GPU"


def test_all_gpus_of_a_request_on_one_server() -> None:
    snap = Snapshot((server("a", 100), server("b", 100)))
    assert place(Request(2), snap) is None
    assert "no matching server has more than 1" in explain(Request(2), snap)
    snap = Snapshot((server("a", 100), server("b", 100, 100)))
    p = place(Request(2), snap)
    assert p is not None and p.server_id == "b" and [g.index for g in p.gpus] == [0, 1]


def test_packing_prefers_partly_used_gpus_and_spread_the_idle_ones() -> None:
    snap = Snapshot((server("a", 100, 100, 100),))
    first = place(Request(1, Share.of(0.25)), snap)
    assert first is not None
    snap = apply(snap, first)
    packed = place(Request(1, Share.of(0.25)), snap)
    spread = place(Request(1, Share.of(0.25), spread=True), snap)
    assert packed is not None and packed.gpus[0].gpu_id == first.gpus[0].gpu_id
    assert spread is not None and spread.gpus[0].gpu_id != first.gpus[0].gpu_id


def test_packing_prefers_busy_servers_and_spread_idle_ones() -> None:
    snap = Snapshot((server("a", 100, 100), server("b", 100, 100)))
    p = place(Request(1), snap)
    assert p is not None
    snap = apply(snap, p)
    packed = place(Request(1), snap)
    spread = place(Request(1, spread=True), snap)
    assert packed is not None and packed.server_id == p.server_id
    assert spread is not None and spread.server_id != p.server_id


def test_down_and_draining_servers_are_skipped() -> None:
    snap = Snapshot((server("a", 100, state="down"), server("b", 100, draining=True)))
    assert place(Request(1), snap) is None
    assert "no server is up" in explain(Request(1), snap)
    snap = Snapshot((*snap.servers, server("c", 100)))
    p = place(Request(1), snap)
    assert p is not None and p.server_id == "c"


def test_filters() -> None:
    snap = Snapshot((server("a", 80 * GiB, model="NVIDIA H200"), server("b", 24 * GiB, model="NVIDIA L4",
                                                                          labels={"zone": "eu"})))
    assert place(Request(1, model="h200"), snap).server_id == "a"  # type: ignore[union-attr]
    assert place(Request(1, min_memory_bytes=30 * GiB), snap).server_id == "a"  # type: ignore[union-attr]
    assert place(Request(1, labels={"zone": "eu"}), snap).server_id == "b"  # type: ignore[union-attr]
    assert place(Request(1, server="b:7777"), snap).server_id == "b"  # type: ignore[union-attr]
    assert place(Request(1, kind="cpu"), snap) is None
    assert "no GPU matches the filters" in explain(Request(1, model="A100"), snap)
    assert "NVIDIA H200" in explain(Request(1, model="A100"), snap)
    assert "no server is named" in explain(Request(1, server="zzz"), snap)
    assert "largest matching GPU" in explain(Request(1, Share.of_bytes(100 * GiB)), snap)


def test_share_validation() -> None:
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            Share.of(bad)
    with pytest.raises(ValueError, match="byte"):
        Share.of_bytes(0)
    with pytest.raises(ValueError, match="at least 1 GPU"):
        Request(0)


def test_queue_is_fifo_within_priority_and_head_blocks() -> None:
    snap = Snapshot((server("a", 100),))
    big = QueueItem("big", "u", Request(1), priority=0, seq=1)
    small = QueueItem("small", "u", Request(1, Share.of_bytes(10)), priority=0, seq=2)
    urgent = QueueItem("urgent", "v", Request(1, Share.of_bytes(10)), priority=5, seq=3)
    assert [i.id for i in queue_order([small, urgent, big])] == ["urgent", "big", "small"]
    assert queue_position([small, urgent, big], "small") == 3
    held = place(Request(1, Share.of_bytes(50)), snap)
    assert held is not None
    busy = apply(snap, held)
    decisions, _ = schedule_queue(busy, [big, small, urgent], {}, {})
    # urgent fits and goes first; big does not fit, so small (behind big) must wait.
    assert [d.item_id for d in decisions] == ["urgent"]
    decisions, _ = schedule_queue(unapply(busy, held), [big, small], {}, {})
    assert [d.item_id for d in decisions] == ["big"]


def test_queue_quota_blocks_only_its_own_user() -> None:
    snap = Snapshot((server("a", 100, 100, 100),))
    quotas = {"u": Fraction(1), "v": None}
    items = [QueueItem("u1", "u", Request(1), seq=1), QueueItem("v1", "v", Request(1), seq=2)]
    decisions, _ = schedule_queue(snap, items, {"u": Fraction(1, 2)}, quotas)
    assert [d.item_id for d in decisions] == ["v1"]
    decisions, _ = schedule_queue(snap, [QueueItem("u2", "u", Request(2), seq=1)], {}, quotas)
    assert len(decisions) == 1 and isinstance(decisions[0], Reject) and decisions[0].code == "quota_exceeded"


def test_queue_rejects_what_can_never_fit() -> None:
    snap = Snapshot((server("a", 100),))
    decisions, _ = schedule_queue(snap, [QueueItem("x", "u", Request(2), seq=1),
                                         QueueItem("y", "u", Request(1), seq=2)], {}, {})
    assert isinstance(decisions[0], Reject) and decisions[0].code == "unsatisfiable"
    assert isinstance(decisions[1], Grant) and decisions[1].item_id == "y"


# -- properties ---------------------------------------------------------------------------------

MODELS = ["H200", "L4", "CPU-backed"]


@st.composite
def pools(draw: st.DrawFn) -> Snapshot:
    servers = []
    for si in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 4))
        gpus = tuple(
            GpuView(f"s{si}-{i}", i, draw(st.integers(1, 64)) * 16, model=draw(st.sampled_from(MODELS)),
                    labels={"rack": draw(st.sampled_from(["r1", "r2"]))})
            for i in range(n))
        state = draw(st.sampled_from(["up", "up", "up", "down"]))
        servers.append(ServerView(f"s{si}", f"s{si}", f"10.0.0.{si}:7777", gpus, state=state,  # type: ignore[arg-type]
                                  draining=draw(st.booleans()) and draw(st.booleans())))
    return Snapshot(tuple(servers))


shares = st.one_of(
    st.just(Share.whole()),
    st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0]).map(Share.of),
    st.integers(1, 1100).map(Share.of_bytes),
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    return Request(
        n=draw(st.integers(1, 4)),
        share=draw(shares),
        model=draw(st.none() | st.sampled_from(["h200", "L4", "cpu"])),
        min_memory_bytes=draw(st.none() | st.integers(1, 1024)),
        server=draw(st.none() | st.sampled_from(["s0", "s1", "10.0.0.2:7777"])),
        labels=draw(st.sampled_from([{}, {}, {"rack": "r1"}])),
        spread=draw(st.booleans()),
    )


def check_consistent(snap: Snapshot) -> None:
    for _, g in snap.gpus():
        assert 0 <= g.allocated_bytes <= g.memory_bytes, g
        if g.exclusive:
            assert g.leases == 1 and g.allocated_bytes == g.memory_bytes, g


@settings(max_examples=150, deadline=None)
@given(pools(), st.lists(requests(), min_size=1, max_size=12))
def test_grants_never_overcommit_and_are_whole_or_nothing(snap: Snapshot, reqs: list[Request]) -> None:
    for req in reqs:
        before = snap
        p = place(req, snap)
        if p is None:
            # Whole or nothing, and complete: no usable server had n GPUs able to take the share.
            for s in before.servers:
                if s.usable and server_matches(req, s):
                    assert sum(1 for g in s.gpus if gpu_matches(req, s, g) and gpu_fits(req.share, g)) < req.n
            continue
        assert len(p.gpus) == req.n and len({g.gpu_id for g in p.gpus}) == req.n
        srv = next(s for s in before.servers if s.id == p.server_id)
        assert srv.usable and p.address == srv.address
        for grant in p.gpus:
            g = before.gpu(grant.gpu_id)
            assert grant.gpu_id in {x.id for x in srv.gpus}
            assert gpu_matches(req, srv, g) and gpu_fits(req.share, g)
            assert grant.bytes == need_bytes(req.share, g)
            if req.share.kind == "whole":
                assert g.leases == 0 and g.allocated_bytes == 0
        snap = apply(snap, p)
        check_consistent(snap)


class GrantRelease(RuleBasedStateMachine):
    """Random interleavings of grants and releases: the snapshot always equals the sum of what is
    held, and no GPU is ever over-committed or shared while held whole."""

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.snap = Snapshot((server("a", 100, 100), server("b", 64, 256, 37)))
        self.leases: list[Placement] = []

    @rule(target=held, req=requests())
    def grant(self, req: Request) -> Placement | None:
        p = place(req, self.snap)
        # Placement remembers per-server answers on the (shared, frozen) server views: the answer
        # must be the one computed afresh on copies that remember nothing.
        fresh = Snapshot(tuple(replace(s, gpus=tuple(replace(g) for g in s.gpus)) for s in self.snap.servers))
        assert p == place(req, fresh)
        if p is not None:
            self.snap = apply(self.snap, p)
            self.leases.append(p)
        return p

    @rule(p=consumes(held))
    def release(self, p: Placement | None) -> None:
        if p is not None:
            self.snap = unapply(self.snap, p)
            self.leases.remove(p)

    @invariant()
    def accounted(self) -> None:
        check_consistent(self.snap)
        for _, g in self.snap.gpus():
            holders = [x for p in self.leases for x in p.gpus if x.gpu_id == g.id]
            assert g.allocated_bytes == sum(x.bytes for x in holders)
            assert g.leases == len(holders)
            whole = [p for p in self.leases if p.exclusive and any(x.gpu_id == g.id for x in p.gpus)]
            assert g.exclusive == bool(whole)
            if whole:
                assert len(holders) == 1, "a whole-GPU lease is exclusive"


TestGrantRelease = GrantRelease.TestCase
TestGrantRelease.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@st.composite
def queues(draw: st.DrawFn) -> list[QueueItem]:
    reqs = draw(st.lists(requests(), min_size=1, max_size=10))
    return [QueueItem(f"q{i}", draw(st.sampled_from(["u", "v", "w"])), r,
                      priority=draw(st.sampled_from([0, 0, 1])), seq=i) for i, r in enumerate(reqs)]


@settings(max_examples=150, deadline=None)
@given(pools(), queues(), st.sampled_from([None, Fraction(1, 2), Fraction(1), Fraction(3)]))
def test_queue_grants_in_order_within_quota_without_overcommit(snap: Snapshot, items: list[QueueItem],
                                                                 quota: Fraction | None) -> None:
    quotas: dict[str, Fraction | None] = {"u": quota, "v": Fraction(2), "w": None}
    decisions, after = schedule_queue(snap, items, {}, quotas)
    check_consistent(after)
    decided = {d.item_id: d for d in decisions}
    usage: dict[str, Fraction] = {}
    replay = snap
    for d in decisions:
        if isinstance(d, Grant):
            item = next(i for i in items if i.id == d.item_id)
            assert d.worth == placement_worth(d.placement, replay)
            replay = apply(replay, d.placement)
            usage[item.user] = usage.get(item.user, Fraction(0)) + d.worth
            q = quotas[item.user]
            assert q is None or usage[item.user] <= q, "quota exceeded"
    assert replay == after
    # Strict FIFO: nothing is granted behind a request that waits for capacity (one neither
    # granted, nor rejected, nor held back only by its own user's quota at its turn).
    order = queue_order(items)
    granted_pos = [i for i, it in enumerate(order) if isinstance(decided.get(it.id), Grant)]
    empty = emptied(snap)
    at_turn = snap
    for i, it in enumerate(order):
        decision = decided.get(it.id)
        if isinstance(decision, Grant):
            at_turn = apply(at_turn, decision.placement)
        if decision is not None or not any(j > i for j in granted_pos):
            continue
        q = quotas[it.user]
        used_before = sum((g.worth for o in order[:i] if o.user == it.user
                           for g in [decided.get(o.id)] if isinstance(g, Grant)), Fraction(0))
        floor = least_worth(it.request, empty)
        p = place(it.request, at_turn)
        assert q is not None and floor is not None, f"{it.id} waits for capacity but a request behind it was granted"
        assert used_before + floor > q or (p is not None and used_before + placement_worth(p, at_turn) > q), (
            f"{it.id} waits for capacity but a request behind it was granted")
