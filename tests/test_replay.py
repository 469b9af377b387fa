"""Step replay (client/replay.py, server/traces.py): repeated steps go as one command, with
exactly eager's results, and a step that differs falls back without a wrong result."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import torch
import torch.nn.functional as F

import gpupool
from gpupool.client.session import Session
from gpupool.protocol import messages as m
from tests import test_bad_input as bad
from tests.conftest import run_python
from tests.models import CNN, MLP
from tests.test_bad_input import RawClient, assert_healthy, upload_cmd

# The hostile tests share test_bad_input's server and its healthy bystander session.
srv = bad.srv
healthy = bad.healthy


@pytest.fixture
def fresh(server) -> Iterator[Session]:
    """A session of its own: no traces registered by earlier tests."""
    s = gpupool.connect(server.address, token=server.token)
    yield s
    s.close()


def _stats(session) -> dict[str, int]:
    return dict(session.replay_stats())


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def _batches(n: int, batch: int = 16, seed: int = 7, shapes: dict[int, int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = (shapes or {}).get(i, batch)
        out.append((torch.randn(b, 32, generator=g), torch.randint(0, 10, (b,), generator=g)))
    return out


def _run(device, steps: int, *, every_third_branch: bool = False, item_every_other: bool = False,
         shapes: dict[int, int] | None = None, keep: bool = False, opt: str = "adam"):
    torch.manual_seed(0)
    model = MLP()
    optim = (torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True) if opt == "adam"
             else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True))
    model.to(device)
    kept, seen = [], []
    for i, (x, y) in enumerate(_batches(steps, shapes=shapes)):
        x, y = x.to(device), y.to(device)
        optim.zero_grad(set_to_none=True)
        out = model(x)
        if every_third_branch and i % 3 == 2:
            out = out * 0.5 + 0.1  # an extra branch in the step, every third one
        loss = F.cross_entropy(out, y)
        if item_every_other and i % 2:
            seen.append(loss.item())  # an extra sync point in the middle of the step
        loss.backward()
        optim.step()
        kept.append(loss.detach() if keep else float(loss.detach().cpu()))
    losses = [float(v.cpu()) for v in kept] if keep else kept
    return losses, seen, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _assert_same(remote, local) -> None:
    assert remote[0] == local[0]
    assert remote[1] == local[1]
    for name in local[2]:
        torch.testing.assert_close(remote[2][name], local[2][name], rtol=0, atol=0, msg=name)


def test_repeated_steps_are_replayed_and_exact(session) -> None:
    before = _stats(session)
    remote = _run(session.device, 30)
    d = _delta(before, _stats(session))
    _assert_same(remote, _run("cpu", 30))
    assert d["traces_registered"] >= 1
    # Steps from the third on are replayed whole (the first two are recorded).
    assert d["segments_replayed"] >= 20, d
    assert d["ops_replayed"] >= 20 * 30, d


@pytest.mark.parametrize(
    "variant",
    [
        {"shapes": {k: 8 for k in range(12, 16)}},  # a shape change for a few steps, and back
        {"every_third_branch": True},  # a branch taken every third step
        {"item_every_other": True},  # an extra .item() every other step
    ],
    ids=["shape-change", "branch-every-3rd", "extra-item"],
)
@pytest.mark.parametrize("flush_after", [None, float("inf")], ids=["timed-flush", "no-timed-flush"])
def test_steps_that_differ_fall_back_exactly(fresh, variant, flush_after) -> None:
    # Without timed flushes a partial replay leaves only when the step differs: frees of
    # tensors that died after its last op must go after it (seen: they went before).
    if flush_after is not None:
        fresh.conn.flush_after = flush_after
    remote = _run(fresh.device, 30, **variant)
    d = _stats(fresh)
    _assert_same(remote, _run("cpu", 30, **variant))
    if "item_every_other" in variant:
        # The sync splits the step in two traces, which also replay back to back in the steps
        # without it: nothing mismatches, and both halves replay.
        assert d["traces_registered"] >= 2, d
    else:
        assert d["mismatches"] + d["partial"] >= 1, d  # the differing steps did not replay blindly
    assert d["segments_replayed"] >= 5, d  # and the others still replay


def test_tensors_kept_from_replayed_steps_stay_valid(session) -> None:
    """Losses kept on the device from every step (replayed ones too) keep their own values."""
    before = _stats(session)
    remote = _run(session.device, 20, keep=True, opt="sgd")
    assert _delta(before, _stats(session))["segments_replayed"] >= 10
    _assert_same(remote, _run("cpu", 20, keep=True, opt="sgd"))


def test_batchnorm_cnn_replays_exactly(session) -> None:
    def train(device):
        torch.manual_seed(0)
        model = CNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True)
        model.to(device)
        g = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(12):
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            evals = [model(torch.ones(2, 3, 16, 16).to(device)).sum().item() for _ in range(4)]
        return losses, evals, {k: v.detach().cpu() for k, v in model.state_dict().items()}

    before = _stats(session)
    remote = train(session.device)
    assert _delta(before, _stats(session))["segments_replayed"] >= 8
    _assert_same(remote, train("cpu"))


def test_dropout_draws_like_eager(session) -> None:
    """Random ops in a replayed step draw from the server's generator as eager ops do: a run
    with replay equals the same run with replay off, step by step."""
    code = """
import torch, gpupool, sys
from torch import nn
s = gpupool.connect(sys.argv[1], token=sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 1)).to(s.device)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
out = []
for i in range(12):
    opt.zero_grad()
    loss = model(torch.ones(4, 8).to(s.device)).pow(2).mean()
    loss.backward()
    opt.step()
    out.append(loss.item())
print(repr(out), s.replay_stats()["segments_replayed"])
"""
    from tests.conftest import ServerProc

    server = ServerProc("--cpu-gpus", "1")
    try:
        on = run_python(code, args=[server.address, server.token])
        off = run_python(code, args=[server.address, server.token], env={"GPUPOOL_REPLAY": "0"})
    finally:
        server.stop()
    assert on.returncode == 0, on.stderr
    assert off.returncode == 0, off.stderr
    losses_on, replayed_on = on.stdout.rsplit(" ", 1)
    losses_off, replayed_off = off.stdout.rsplit(" ", 1)
    assert losses_on == losses_off
    assert int(replayed_on) >= 5
    assert int(replayed_off) == 0  # GPUPOOL_REPLAY=0 turns it off


# ---- a hostile client: traces and replays are checked like ops ----------------------------------


def _template(args: list, kwargs: dict | None = None) -> bytes:
    def hook(x):
        if isinstance(x, msgspec.msgpack.Ext):
            return x
        raise TypeError(type(x).__name__)

    return msgspec.msgpack.encode([args, kwargs or {}], enc_hook=hook)


def _val(n: int) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(m.ExtCode.VALUE, m.HANDLE.pack(n))


def _slot(n: int) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(m.ExtCode.SLOT, m.HANDLE.pack(n))


def _scalar(n: int, kind: bytes = b"f") -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(m.ExtCode.SCALAR, m.HANDLE.pack(n) + kind)


def _ask(c: RawClient, trace: m.Trace) -> str:
    c.send([trace])
    reply = c.reply()
    assert isinstance(reply, m.Value), reply
    return reply.value


def _upload(c: RawClient, handle: int, values: list[float]) -> None:
    data = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    c.send([upload_cmd(1, handle, data)], [data])


def _fetch(c: RawClient, handle: int) -> list[float] | m.ErrorInfo:
    reply, data = c.fetch(handle)
    if reply.error is not None:
        return reply.error
    assert data is not None
    return torch.frombuffer(bytearray(data), dtype=torch.float32).tolist()


def _error_after(c: RawClient, cmd: object) -> m.ErrorInfo | None:
    c.send([cmd])
    return c.sync().error


def test_a_good_trace_replays_and_a_bad_one_is_refused(srv, healthy) -> None:
    c = RawClient(srv.address)
    try:
        # add(slot0, slot1) -> v0; mul(v0, scalar0) -> v1
        good = m.Trace(1, [
            m.TraceOp("aten::add.Tensor", _template([_slot(0), _slot(1)]), [0]),
            m.TraceOp("aten::mul.Scalar", _template([_val(0), _scalar(0)]), [1]),
        ], 2)
        assert _ask(c, good) == ""
        _upload(c, 1, [1.0, 2.0])
        _upload(c, 2, [10.0, 20.0])
        base = 1 << 48
        c.send([m.Replay(5, 1, 0, 2, base, [1, 2], [3.0])])
        assert _fetch(c, base + 1) == [33.0, 66.0]

        # Each refused for its own reason (the part of the answer that says which).
        refusals = {
            "denied op": (m.Trace(2, [m.TraceOp("aten::_pin_memory.default", _template([_slot(0)]), [0])], 1),
                          "not on the server's op allowlist"),
            "unknown op": (m.Trace(2, [m.TraceOp("os::system", _template(["ls"]), [])], 0), "namespace 'os'"),
            "a handle in a template": (m.Trace(2, [m.TraceOp(
                "aten::neg.default", _template([msgspec.msgpack.Ext(m.ExtCode.TENSOR, m.HANDLE.pack(1))]), [0])], 1),
                "may not name a tensor handle"),
            "a value used before it is made": (m.Trace(2, [m.TraceOp("aten::neg.default", _template([_val(0)]), [0])], 1),
                                               "used before an op makes it"),
            "slots out of order": (m.Trace(2, [m.TraceOp("aten::add.Tensor", _template([_slot(1), _slot(0)]), [0])], 1),
                                   "slots are not numbered in order"),
            "outputs out of order": (m.Trace(2, [m.TraceOp("aten::neg.default", _template([_slot(0)]), [3])], 4),
                                     "outputs must number new values in order"),
            "a wrong value count": (m.Trace(2, [m.TraceOp("aten::neg.default", _template([_slot(0)]), [0])], 7),
                                    "makes 1 values, not 7"),
            # Typed and string arguments are not checked again per replay: they must be constants.
            "a scalar where a dtype goes": (m.Trace(2, [m.TraceOp(
                "aten::_to_copy.default", _template([_slot(0)], {"dtype": _scalar(0, b"i")}), [0])], 1),
                "argument 'dtype' of aten::_to_copy must be a dtype"),
            "a scalar where a rounding mode goes": (m.Trace(2, [m.TraceOp(
                "aten::div.Tensor_mode", _template([_slot(0), _slot(1)], {"rounding_mode": _scalar(0, b"i")}), [0])], 1),
                "argument 'rounding_mode' of aten::div.Tensor_mode must be one of"),
            "a slot where a device goes": (m.Trace(2, [m.TraceOp(
                "aten::_to_copy.default", _template([_slot(0)], {"device": _slot(1)}), [0])], 1),
                "argument 'device' of aten::_to_copy must be a device"),
            "a malformed template": (m.Trace(2, [m.TraceOp("aten::neg.default", b"\xc1\xff", [0])], 1), "bad template"),
            "an empty trace": (m.Trace(2, [], 0), "a trace has 1 to"),
            "a bad id": (m.Trace(0, [m.TraceOp("aten::neg.default", _template([_slot(0)]), [0])], 1), "trace ids are"),
        }
        for what, (trace, reason) in refusals.items():
            why = _ask(c, trace)
            assert why.startswith(f"trace {trace.trace} refused") and reason in why, (what, why)
        # Replays that do not fit their trace are errors at the next sync, nothing runs.
        bad_replays = {
            "unknown trace": m.Replay(6, 9, 0, 1, base, [1], []),
            "ops past the end": m.Replay(6, 1, 0, 3, base, [1, 2], [3.0]),
            "too few slots": m.Replay(6, 1, 0, 2, base, [1], [3.0]),
            "a scalar of the wrong type": m.Replay(6, 1, 0, 2, base, [1, 2], [True]),
            "frees outside its ops": m.Replay(6, 1, 0, 2, base, [1, 2], [3.0], [m.FreeAt(5, [1])]),
            "a negative base": m.Replay(6, 1, 0, 2, -5, [1, 2], [3.0]),
        }
        for what, replay in bad_replays.items():
            err = _error_after(c, replay)
            assert err is not None and err.kind == "protocol", (what, err)
        # A replay whose slot names a freed handle fails like the op would, and says why.
        err = _error_after(c, m.Replay(7, 1, 0, 2, base + 10, [1, 99], [3.0]))
        assert err is not None and err.kind == "handle", err
        # Forget drops a trace: replaying it afterwards is an error.
        c.send([m.Forget(1)])
        err = _error_after(c, m.Replay(8, 1, 0, 2, base, [1, 2], [3.0]))
        assert err is not None and err.kind == "protocol", err
        assert _fetch(c, 1) == [1.0, 2.0]  # the session's data is intact
    finally:
        c.close()
    assert_healthy(srv, healthy)


def test_replay_runs_every_check_an_op_does(srv, healthy) -> None:
    """A replayed factory past the share is refused as the op would be (Note [Trace templates])."""
    c = RawClient(srv.address)
    try:
        big = m.Trace(1, [m.TraceOp("aten::empty.memory_format", _template([[1 << 40]]), [0])], 1)
        assert _ask(c, big) == ""
        err = _error_after(c, m.Replay(3, 1, 0, 1, 1 << 48, [], []))
        assert err is not None and err.kind == "oom", err
    finally:
        c.close()
    assert_healthy(srv, healthy)


def test_trace_limits_hold(srv, healthy) -> None:
    from gpupool.server.traces import MAX_TRACES

    c = RawClient(srv.address)
    try:
        one = [m.TraceOp("aten::neg.default", _template([_slot(0)]), [0])]
        for i in range(1, MAX_TRACES + 1):
            assert _ask(c, m.Trace(i, one, 1)) == ""
        assert "at most" in _ask(c, m.Trace(MAX_TRACES + 1, one, 1))
        assert _ask(c, m.Trace(1, one, 1)) == ""  # replacing one is fine
    finally:
        c.close()
    assert_healthy(srv, healthy)


def test_two_sessions_interleaved_each_replay_exactly(server) -> None:
    """Two devices in one process, their steps interleaved: each session's ops only ever
    match its own traces (Note [Replay fast path])."""
    a = gpupool.connect(server.address, token=server.token)
    b = gpupool.connect(server.address, token=server.token)
    try:
        def models(dev_a: Any, dev_b: Any) -> tuple[list[float], list[float]]:
            torch.manual_seed(0)
            ma, mb = MLP().to(dev_a), MLP().to(dev_b)
            oa = torch.optim.SGD(ma.parameters(), lr=0.05, momentum=0.9, foreach=True)
            ob = torch.optim.SGD(mb.parameters(), lr=0.05, momentum=0.9, foreach=True)
            la, lb = [], []
            for x, y in _batches(12):
                oa.zero_grad()
                ob.zero_grad()
                # Both forwards before either backward: each session's replay is under way
                # while the other's ops come (the fast path offers them to the wrong one first).
                loss_a = F.cross_entropy(ma(x.to(dev_a)), y.to(dev_a))
                loss_b = F.cross_entropy(mb(x.to(dev_b)), y.to(dev_b))
                loss_a.backward()
                loss_b.backward()
                oa.step()
                ob.step()
                la.append(loss_a.item())
                lb.append(loss_b.item())
            return la, lb

        remote = models(a.device, b.device)
        assert remote == models("cpu", "cpu")
        assert a.replay_stats()["segments_replayed"] >= 5, a.replay_stats()
        assert b.replay_stats()["segments_replayed"] >= 5, b.replay_stats()
    finally:
        a.close()
        b.close()


def test_an_op_of_another_session_never_joins_a_replay(server) -> None:
    """Two sessions running the same loop in lockstep number their replayed tensors alike: an
    op of one that looks like the other's next trace op (same op, same value number) must not
    be taken into the other's replay."""
    a = gpupool.connect(server.address, token=server.token)
    b = gpupool.connect(server.address, token=server.token)
    try:
        xa, xb = torch.full((4,), 2.0).to(a.device), torch.full((4,), 3.0).to(b.device)
        got = []
        for _ in range(8):
            ya, yb = xa.exp(), xb.exp()
            za, zb = ya.log(), yb.log()
            got.append((za.sum().item(), zb.sum().item()))
        assert got == [(8.0, 12.0)] * 8
        assert a.replay_stats()["segments_replayed"] >= 4 and b.replay_stats()["segments_replayed"] >= 4
    finally:
        a.close()
        b.close()


def test_more_step_shapes_than_traces_kept_forget_the_oldest(fresh) -> None:
    """A session keeps 16 traces: the 17th registration forgets the least recently used one
    (on the server too), and a forgotten shape that comes back is learned again."""
    from gpupool.client.replay import MAX_TRACES

    def steps(n: int) -> list[float]:
        out = []
        for _ in range(3):
            x = torch.arange(float(n)).to(fresh.device)
            out.append((x * 2 + 1).sum().item())
        return out

    shapes = list(range(1, MAX_TRACES + 5)) + [1, 2]  # 1 and 2 were forgotten by then
    got = [steps(n) for n in shapes]
    assert got == [[float(n * n)] * 3 for n in shapes]
    stats = fresh.replay_stats()
    assert stats["traces_registered"] > MAX_TRACES and stats["traces_refused"] == 0, stats
    assert len(fresh.conn.replayer.traces) == MAX_TRACES
