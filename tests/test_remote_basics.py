"""The remote device's core contract: results equal local ones, errors surface at sync points."""

from __future__ import annotations

import time

import pytest
import torch

import gpupool


def test_session_reports_cpu_backed_device(session) -> None:
    assert session.kind == "cpu"
    assert "CPU-backed" in session.device_name
    assert session.device.type == "gpupool"


def test_roundtrip_and_ops_match_cpu(session) -> None:
    a = torch.randn(17, 33)
    b = torch.randn(33, 5)
    ra, rb = a.to(session.device), b.to(session.device)
    assert ra.device == session.device
    torch.testing.assert_close((ra @ rb).relu().cpu(), (a @ b).relu(), rtol=0, atol=0)
    torch.testing.assert_close((ra * 3 - 1).sum(dim=0).cpu(), (a * 3 - 1).sum(dim=0), rtol=0, atol=0)


def test_views_and_inplace_alias_like_local(session) -> None:
    a = torch.arange(12.0).reshape(3, 4)
    r = a.to(session.device)
    rv = r.t()
    rv[1].mul_(10)
    a.t()[1].mul_(10)
    assert rv._base is r
    torch.testing.assert_close(r.cpu(), a)
    r2 = r[:, 1:3]
    r2.add_(1)
    a[:, 1:3].add_(1)
    torch.testing.assert_close(r.cpu(), a)


def test_item_bool_and_data_dependent_shapes(session) -> None:
    a = torch.tensor([1.0, -2.0, 3.0, -4.0])
    r = a.to(session.device)
    assert r.sum().item() == a.sum().item()
    assert bool((r > 2).any())
    assert r[r > 0].cpu().tolist() == [1.0, 3.0]
    assert r.nonzero().shape == a.nonzero().shape
    assert r.tolist() == a.tolist()


def test_out_ops_and_arange_resize(session) -> None:
    r = torch.arange(5, device=session.device)
    assert r.cpu().tolist() == [0, 1, 2, 3, 4]
    out = torch.empty(0, device=session.device)
    torch.add(torch.ones(3, device=session.device), 2, out=out)
    assert out.shape == (3,)
    assert out.cpu().tolist() == [3.0, 3.0, 3.0]


def test_autograd_matches_cpu(session) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(5, 8)
    rw = w.detach().to(session.device).requires_grad_()
    rx = x.to(session.device)
    loss = torch.tanh(x @ w).pow(2).mean()
    rloss = torch.tanh(rx @ rw).pow(2).mean()
    loss.backward()
    rloss.backward()
    torch.testing.assert_close(rw.grad.cpu(), w.grad, rtol=0, atol=0)


def test_remote_error_names_op_and_line(session) -> None:
    a = torch.randn(3, device=session.device)
    idx = torch.tensor([7]).to(session.device)
    bad = a[idx]  # index out of range: fails on the server, surfaces at the next sync
    with pytest.raises(gpupool.RemoteOpError) as ei:
        bad.cpu()
    msg = str(ei.value)
    assert "aten::index" in msg
    assert "test_remote_basics.py" in msg
    # the session carries on
    assert (a * 0).sum().item() == 0.0


def test_manual_seed_reproducible(session) -> None:
    torch.manual_seed(123)
    x1 = torch.randn(4, device=session.device).cpu()
    torch.manual_seed(123)
    x2 = torch.randn(4, device=session.device).cpu()
    assert torch.equal(x1, x2)


def test_print_shows_device(session) -> None:
    r = torch.ones(2, device=session.device)
    assert "gpupool:0" in repr(r)
    assert repr(r).startswith("tensor([1., 1.]")


def test_large_download_is_fresh_and_exact(session) -> None:
    """A download big enough to be advised huge pages (see Note [Huge pages]) returns new
    memory with every byte of the device tensor, at any offset."""
    from gpupool.client.hostmem import HUGE_MIN_BYTES

    n = HUGE_MIN_BYTES // 4 + 12345
    x = torch.arange(n, dtype=torch.int32)
    d = x.to(session.device)
    a, b = d.cpu(), d[3:].cpu()
    assert torch.equal(a, x) and torch.equal(b, x[3:])
    assert a.data_ptr() != b.data_ptr()


def test_queued_ops_leave_without_a_sync_point(session) -> None:
    """Ops do not wait in the client for a sync point: they leave with the next op once they have
    waited FLUSH_AFTER_S, and as an optimizer step returns, so the server computes while the
    program goes on (Note [Flush latency])."""
    from gpupool.client.connection import FLUSH_AFTER_S

    conn = session.conn
    a = torch.ones(4, device=session.device)
    b = a + 1
    time.sleep(FLUSH_AFTER_S * 20)
    waited = list(conn._cmds)  # those not sent yet (a loaded machine may have sent some already)
    c = b * 2  # queued after the others waited long enough: they all leave now
    # Note: only the ops that waited must be gone; `b * 2` itself may open a new batch when the
    # earlier ops already left on their own (then it is the newest command, and too young).
    assert not [x for x in conn._cmds if any(x is w for w in waited)]
    assert len(conn._cmds) <= 1
    p = torch.nn.Parameter(torch.ones(3, device=session.device))
    opt = torch.optim.SGD([p], lr=0.5)
    (p * 2).sum().backward()
    opt.step()
    assert not conn._cmds, "the optimizer step's ops are still queued in the client"
    assert c.cpu().tolist() == [4.0] * 4
    assert p.detach().cpu().tolist() == [0.0] * 3


def test_detach_shares_data_but_not_metadata(session) -> None:
    """`detach` costs no remote op (the alias shares its source's server tensor), yet behaves
    like a local detach: writes to the data are seen by both, metadata changes by one only."""
    a = torch.arange(6.0).reshape(2, 3)
    ra = a.to(session.device)
    rd, d = ra.detach(), a.detach()
    rd.add_(1)
    d.add_(1)
    torch.testing.assert_close(ra.cpu(), a, rtol=0, atol=0)
    rd.t_()
    d.t_()
    assert rd.shape == d.shape == (3, 2) and ra.shape == a.shape == (2, 3)
    torch.testing.assert_close(rd.cpu(), d, rtol=0, atol=0)
    torch.testing.assert_close(ra.cpu(), a, rtol=0, atol=0)
    rd.mul_(2)  # still the same storage after the metadata change
    d.mul_(2)
    torch.testing.assert_close(ra.cpu(), a, rtol=0, atol=0)
    re, e = ra.detach(), a.detach()
    ra.resize_(6)
    a.resize_(6)
    assert re.shape == e.shape == (2, 3)
    torch.testing.assert_close(re.cpu(), e, rtol=0, atol=0)
    torch.testing.assert_close(ra.cpu(), a, rtol=0, atol=0)
    out = torch.empty(0, device=session.device)
    alias = out.detach()
    torch.add(torch.ones(4, device=session.device), 1, out=out)  # out= resizes `out` only
    assert out.shape == (4,) and alias.shape == (0,)
    assert out.cpu().tolist() == [2.0] * 4
