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
from tests.test_bad_input import WAIT, RawClient, assert_healthy, gone, ref, worker_pid

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
    """The attack: `_embedding_bag_dense_backward` read at any `offset2bag` value."""
    c = Wire(srv.address)
    c.put(1, torch.ones(2, 3))  # grad: 2 bags, dim 3
    c.put(2, torch.tensor([0, 1, 2, 3]))  # indices into 5 weight rows
    c.put(4, torch.tensor([1, 1]))  # bag_size
    c.put(5, torch.zeros(0, dtype=torch.int64))  # maximum_indices (sum mode)
    for bad in (2, 1 << 40, -(1 << 40)):
        c.put(3, torch.tensor([0, 0, 1, bad]))  # offset2bag
        c.op("aten::_embedding_bag_dense_backward", [ref(1), ref(2), ref(3), ref(4), ref(5), 5, False, 0, None], [6])
        err = c.error()
        assert err is None or err.kind in ("op", "denied"), err
        if err is None:
            assert c.get(6, torch.float32, (5, 3)).isfinite().all()
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
