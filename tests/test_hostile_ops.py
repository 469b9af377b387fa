"""Hostile ops against a real server process, spoken on the wire by hand: each test performs an
attack that worked before the op policy and sanitisers, and checks that it now fails with an
op error, touches nothing outside the attacker's tensors, and leaves the server serving others.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gpupool
from gpupool.protocol import messages as m
from tests.conftest import ServerProc
from tests.test_bad_input import WAIT, Ext, RawClient, assert_healthy, gone, ref, worker_pid

MiB = 1024**2


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProc]:
    s = ServerProc("--cpu-gpus", "1", "--memory-limit", str(256 * MiB))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def healthy(srv: ServerProc) -> Iterator[Any]:
    s = gpupool.connect(srv.address, token=srv.token)
    yield s
    s.close()


class Wire(RawClient):
    """A raw session with helpers to place exact tensors and read them back."""

    seq = 0

    def put(self, handle: int, t: torch.Tensor) -> None:
        t = t.contiguous()
        data = t.numpy().tobytes()
        name = str(t.dtype).removeprefix("torch.")
        self.send([m.Upload(self._next(), handle, name, list(t.shape), list(t.stride()), 0, len(data))], [data])

    def op(self, name: str, args: list[Any], outs: list[int], **kwargs: Any) -> None:
        self.send([m.Op(self._next(), name, args, kwargs, outs)])

    def get(self, handle: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        r, data = self.fetch(handle)
        assert r.error is None and data is not None, r.error
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def error(self) -> m.ErrorInfo | None:
        return self.sync().error

    def _next(self) -> int:
        Wire.seq += 1
        return Wire.seq


def test_from_file_cannot_read_or_create_files(srv, healthy, tmp_path: Path) -> None:
    secret = tmp_path / "controller.db"
    secret.write_bytes(b"signing key" * 100)
    created = tmp_path / "new-file"
    c = Wire(srv.address)
    for name, path in [("aten::from_file", secret), ("aten::from_file.default", secret),
                       ("aten::from_file.out", created)]:
        c.op(name, [str(path), True, 1000], [1])
        err = c.error()
        assert err is not None and err.kind == "denied", (name, err)
    assert not created.exists()
    c.close()
    assert_healthy(srv, healthy)


def test_max_pool_backward_with_forged_indices_stays_in_its_tensor(srv, healthy) -> None:
    """The attack: `max_pool2d_with_indices_backward` wrote `grad_input[indices]` at any value
    (an out-of-range one hit another tensor, a huge one segfaulted the worker). Sanitised,
    indices are clamped into the input plane: a neighbour tensor keeps its bytes."""
    c = Wire(srv.address)
    canary = torch.full((1 << 16,), 7.0)
    c.put(9, canary)
    c.put(1, torch.ones(1, 1, 2, 2))  # grad_output
    c.put(2, torch.zeros(1, 1, 4, 4))  # self
    for bad in (16, 1000, 1 << 40, -(1 << 40), -1):
        c.put(3, torch.tensor([[[[4, 6], [8, bad]]]], dtype=torch.int64))
        c.op("aten::max_pool2d_with_indices_backward", [ref(1), ref(2), [2, 2], [2, 2], [0, 0], [1, 1], False, ref(3)], [4])
        assert c.error() is None
        grad = c.get(4, torch.float32, (1, 1, 4, 4)).flatten()
        assert grad.sum() == 4  # every gradient landed inside the input plane
        assert grad[4] == 1 and grad[6] == 1 and grad[8] == 1
        assert torch.equal(c.get(9, torch.float32, (1 << 16,)), canary)
    c.close()
    assert_healthy(srv, healthy)


def test_embedding_bag_backward_with_forged_offsets_stays_in_its_tensor(srv, healthy) -> None:
    """The attack: embedding-bag backward read at any `offset2bag` value and wrote at any
    `indices` value (what autograd sends: `_embedding_bag_backward`). Sanitised, both are
    clamped: the gradient stays inside the weight's rows."""
    c = Wire(srv.address)
    c.put(1, torch.ones(2, 3))  # grad: 2 bags, dim 3
    c.put(7, torch.tensor([0, 2]))  # offsets
    c.put(4, torch.tensor([2, 2]))  # bag_size
    c.put(5, torch.zeros(2, dtype=torch.int64))  # maximum_indices (sum mode)
    for indices, offset2bag in (([0, 1, 2, 3], [0, 0, 1, 2]), ([0, 1, 2, 3], [0, 0, 1, 1 << 40]),
                                ([0, 1, 2, 1 << 40], [0, 0, 1, 1]), ([0, 1, 2, -(1 << 40)], [0, 0, 1, -1])):
        c.put(2, torch.tensor(indices))  # into 5 weight rows
        c.put(3, torch.tensor(offset2bag))
        c.op("aten::_embedding_bag_backward",
             [ref(1), ref(2), ref(7), ref(3), ref(4), ref(5), 5, False, 0, False, None], [6])
        assert c.error() is None  # clamped into the rows and bags, not refused
        got = c.get(6, torch.float32, (5, 3))
        assert torch.equal(got.sum(0), torch.full((3,), 4.0)), got  # 4 indices, each one row
        assert torch.equal(got[1:3], torch.ones(2, 3))  # the legitimate indices keep their rows
    c.close()
    assert_healthy(srv, healthy)


def test_ctc_loss_with_forged_lengths_targets_or_blank_is_refused_or_clamped(srv, healthy) -> None:
    """The attack (found by the kernel sweep): `_ctc_loss` and its backward walk whatever
    lengths they are given and index the classes by any target or blank value; -1 or 2**40
    wrote out of bounds or segfaulted the worker."""
    c = Wire(srv.address)
    steps, batch, classes = 6, 2, 4
    log_probs = torch.randn(steps, batch, classes).log_softmax(2)
    c.put(1, log_probs)
    good_targets = torch.tensor([[1, 2], [3, 1]])
    for bad in ({"il": [steps + 1, 5]}, {"il": [-1, 5]}, {"tl": [2, 1 << 40]}, {"blank": classes},
                {"blank": -1}):
        c.put(2, good_targets)
        c.op("aten::_ctc_loss", [ref(1), ref(2), bad.get("il", [6, 5]), bad.get("tl", [2, 2]), bad.get("blank", 0)],
             [3, 4])
        err = c.error()
        assert err is not None and err.kind == "denied" and "must" in err.message, (bad, err)
    c.put(2, torch.tensor([[1, 1 << 40], [-5, 1]]))  # class ids: clamped into the classes
    c.op("aten::_ctc_loss", [ref(1), ref(2), [6, 5], [2, 2], 0], [3, 4])
    assert c.error() is None
    clamped = torch.tensor([[1, classes - 1], [0, 1]])
    want = torch.ops.aten._ctc_loss(log_probs, clamped, [6, 5], [2, 2], 0)[0]
    torch.testing.assert_close(c.get(3, torch.float32, (batch,)), want)
    c.close()
    assert_healthy(srv, healthy)


@pytest.mark.parametrize("op, args, expect", [
    ("aten::grid_sampler_2d", lambda: [ref(1), ref(2), -1, 0, False], "interpolation_mode"),
    ("aten::grid_sampler_2d", lambda: [ref(1), ref(2), 0, 7, False], "padding_mode"),
    ("aten::_fft_r2c", lambda: [ref(1), [1 << 40], 0, True], "dim must list"),
    ("aten::_fft_r2c", lambda: [ref(1), [3, -1], 0, True], "must not repeat"),
])
def test_unchecked_dims_and_modes_are_refused(srv, healthy, op: str, args, expect: str) -> None:
    """The attack (found by the kernel sweep): the grid samplers read out of bounds for a mode
    outside their enum, and the internal FFT kernels crash on a dimension past the tensor's."""
    c = Wire(srv.address)
    c.put(1, torch.randn(1, 2, 4, 4))
    c.put(2, torch.rand(1, 3, 3, 2) * 2 - 1)
    c.op(op, args(), [3])
    err = c.error()
    assert err is not None and err.kind == "denied" and expect in err.message, err
    c.op(op, [ref(1), ref(2), 0, 0, False] if "grid" in op else [ref(1), [3], 0, True], [3])
    assert c.error() is None  # the same op with legitimate arguments runs
    c.close()
    assert_healthy(srv, healthy)


def test_a_huge_polynomial_degree_is_refused(srv, healthy) -> None:
    """The attack: `special_legendre_polynomial_p` with n = 1e13 held a worker for about a day
    in 4 bytes of memory."""
    c = Wire(srv.address)
    c.put(1, torch.tensor([0.5]))
    c.op("aten::special_legendre_polynomial_p.n_scalar", [ref(1), 1e13], [2])
    err = c.error()
    assert err is not None and err.kind == "denied"  # off the list; sanitised if listed
    c.put(3, torch.tensor([1e13, 2.0]))
    c.op("aten::special_legendre_polynomial_p", [ref(1), ref(3)], [4])  # a tensor degree
    assert c.error() is None
    got = c.get(4, torch.float32, (2,))
    assert got[0].isnan() and got[1] == torch.special.legendre_polynomial_p(torch.tensor(0.5), 2.0)
    c.close()
    assert_healthy(srv, healthy)


def test_a_zero_tensor_resized_in_place_does_not_crash_the_worker(srv, healthy) -> None:
    """Found by `make fuzz`: `_efficientzerotensor` then `resize_` wrote through a null data
    pointer and killed the worker with SIGSEGV (plain torch 2.13 crashes the same way)."""
    c = Wire(srv.address)
    c.op("aten::_efficientzerotensor", [[4]], [1], device=Ext(m.ExtCode.DEVICE, b""))
    c.send([m.Op(Wire.seq + 1, "aten::resize_", [ref(1), [7]], {}, [-1], False)])
    Wire.seq += 1
    c.op("aten::add_.Scalar", [ref(1), 2.0], [-1])
    assert c.error() is None
    assert c.get(1, torch.float32, (7,))[:4].tolist() == [2.0] * 4
    c.close()
    assert_healthy(srv, healthy)


_LONG_OP_CLIENT = """
    import sys, torch, gpupool
    s = gpupool.connect(sys.argv[1], token=sys.argv[2])
    x = torch.rand(1 << 22).to(s.device)
    s.synchronize()
    y = torch.special.legendre_polynomial_p(x, torch.full_like(x, 10_000))   # ~4e10 steps
    print("SESSION", s.id, flush=True)
    y.sum().item()
"""


def test_a_client_killed_during_a_long_op_frees_its_worker(srv, healthy) -> None:
    """The attack: after its client disconnected, a long op kept its worker running. The worker
    now ends when every client of it hung up, even inside an op."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_LONG_OP_CLIENT), srv.address, srv.token],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SESSION"), line
        pid = worker_pid(srv, line.split()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        assert gone(pid), f"worker {pid} kept computing for its killed client"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_healthy(srv, healthy)


def test_out_ops_cannot_grow_past_the_share(srv, healthy) -> None:
    """The attack: `zeros.out` into a small tensor reached 6.5x a 128 MiB share, and kept it."""
    c = Wire(srv.address)
    c.put(1, torch.zeros(4))
    c.op("aten::zeros.out", [[512 * MiB // 4]], [-1], out=ref(1))
    err = c.error()
    assert err is not None and err.kind == "oom"
    assert c.sync().memory_used == 16
    assert torch.equal(c.get(1, torch.float32, (4,)), torch.zeros(4))
    c.close()
    assert_healthy(srv, healthy)


def test_a_session_cannot_use_another_sessions_handles(srv, healthy) -> None:
    a, b = Wire(srv.address), Wire(srv.address)
    a.put(1, torch.arange(4.0))
    assert a.error() is None
    b.op("aten::neg", [ref(1)], [2])
    err = b.error()
    assert err is not None and err.kind == "handle"
    a.close()
    b.close()
