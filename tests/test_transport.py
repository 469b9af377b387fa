"""The client's `Transport` seam: sessions on the in-process server (the real executor in a thread
of this process) and on a `SocketTransport` to a real server process."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gpupool
from gpupool.client import inprocess
from gpupool.client.inprocess import InProcessServer
from gpupool.client.transport import SocketTransport, open_transport
from gpupool.errors import ProtocolError, ServerLost
from tests.conftest import ServerProc

WAIT = 60.0  # generous: only so that a broken server fails the test instead of hanging it


@pytest.fixture
def local() -> Iterator[gpupool.Session]:
    s = inprocess.connect(memory_limit=256 << 20)
    yield s
    s.close()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> nn.Module:
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
    return model


def test_in_process_session_reports_itself(local) -> None:
    assert local.kind == "cpu"
    assert "CPU-backed" in local.device_name and "in-process" in local.device_name
    assert local.memory_limit == 256 << 20
    assert local.conn.address == "in-process"
    assert isinstance(local.conn.transport, SocketTransport)


def test_mlp_training_step_in_process_equals_cpu_bit_for_bit(local) -> None:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)
    remote = _step(_mlp(), x, y, local.device)
    cpu = _step(_mlp(), x, y, "cpu")
    for (name, p), q in zip(remote.named_parameters(), cpu.parameters(), strict=True):
        assert p.device == local.device
        assert torch.equal(p.detach().cpu(), q.detach()), name
    assert local.memory_stats().memory_used > 0  # the parameters live on the executor's ledger


def test_op_error_surfaces_at_next_sync(local) -> None:
    a = torch.randn(3).to(local.device)
    idx = torch.tensor([7]).to(local.device)
    bad = torch.index_select(a, 0, idx)  # index out of range: fails in the executor, queued
    with pytest.raises(gpupool.RemoteOpError) as ei:
        bad.cpu()
    assert "index_select" in str(ei.value)
    assert "test_transport.py" in str(ei.value)  # the line that issued it
    assert torch.equal((a + 1).cpu(), a.cpu() + 1)  # the session goes on


def test_protocol_error_ends_the_session_with_its_reason(local) -> None:
    sock = local.conn.transport.sock  # type: ignore[attr-defined]
    sock.sendall(b"garbage!")
    select.select([sock], [], [], WAIT)  # the server's answer has arrived
    with pytest.raises(ProtocolError, match="bad frame magic"):
        local.synchronize()
    with pytest.raises(ServerLost, match="bad frame magic"):
        torch.ones(2).to(local.device)


def test_closing_the_session_ends_the_server_thread() -> None:
    s = inprocess.connect(memory_limit=64 << 20)
    thread = s.conn.transport.thread  # type: ignore[attr-defined]
    assert thread.is_alive()
    assert torch.arange(4).to(s.device).sum().item() == 6
    s.close()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_closing_the_server_ends_its_sessions() -> None:
    server = InProcessServer(memory_limit=64 << 20)
    s1 = gpupool.connect(transport=server.transport())
    s2 = gpupool.connect(transport=server.transport())
    try:
        assert s1.id != s2.id
        assert s1.conn.address == "in-process"
        t = torch.ones(3).to(s1.device)
        server.close(timeout=WAIT)
        assert server.threads and not any(th.is_alive() for th in server.threads)
        with pytest.raises(ServerLost):
            t.cpu()
        with pytest.raises(RuntimeError, match="closed"):
            server.transport()
    finally:
        s1.close()
        s2.close()


def test_socket_transport_to_a_real_server(server: ServerProc) -> None:
    transport = open_transport(server.address, 30.0)
    assert transport.label == server.address
    assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    s = gpupool.connect(token=server.token, transport=transport)
    try:
        assert s.conn.address == server.address
        assert s.conn.transport is transport
        assert transport.sock.gettimeout() is None  # the handshake's timeout ended
        a, b = torch.randn(5, 7), torch.randn(7, 2)
        assert torch.equal((a.to(s.device) @ b.to(s.device)).cpu(), a @ b)
    finally:
        s.close()
    assert transport.sock.fileno() == -1
