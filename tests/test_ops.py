"""Regression tests for op-path bugs the OpInfo sweep found (client planning and dispatch).

Each test names the bug it guards. All run against the real server fixture, and compare with
the same computation on local CPU tensors exactly.
"""

from __future__ import annotations

import pytest
import torch

import gpupool
from gpupool.client import oprecord

aten = torch.ops.aten


def same(remote: torch.Tensor, local: torch.Tensor) -> None:
    """Equal values, dtype, shape and strides (the client's metadata must be the server's)."""
    assert remote.device.type == "gpupool"
    assert remote.shape == local.shape and remote.dtype == local.dtype
    if local.numel() > 1:
        assert remote.stride() == local.stride(), (remote.stride(), local.stride())
    torch.testing.assert_close(remote.cpu(), local, rtol=0, atol=0, equal_nan=True)


def test_torch_tensor_with_device(session) -> None:
    # Was: INTERNAL ASSERT "func != nullptr" — torch.tensor copies with the Python key excluded.
    for data in (0.5, [1, 2, 3], [[True, False]], 3 + 4j):
        r = torch.tensor(data, device=session.device)
        same(r, torch.tensor(data))
    same(torch.as_tensor([1.5, 2.5], device=session.device), torch.as_tensor([1.5, 2.5]))


def test_to_device_keeps_dense_strides(session) -> None:
    x = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)
    same(x.to(session.device), x.to(torch.float64).to(torch.float32))
    img = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    same(img.to(session.device), img.clone())
    sliced = torch.arange(10.0)[::2]
    same(sliced.to(session.device), sliced.contiguous())
    # The direct `_to_copy` path (one upload) gives the layouts `.to()` promises too.
    for src, mf in ((x, torch.preserve_format), (x, torch.contiguous_format), (img.contiguous(), torch.channels_last)):
        same(aten._to_copy.default(src, device=session.device, memory_format=mf), aten._to_copy.default(src, memory_format=mf))


def test_fetch_one_element_with_odd_strides(session) -> None:
    # Was: the server's byte view refused a (1, 1) tensor with strides (0, 0) (expand of a scalar).
    x = torch.tensor(3.0)
    same(x.to(session.device).expand(1, 1), x.expand(1, 1).contiguous())
    same(x.to(session.device).expand(1, 1).expand(1, 1, 1), torch.full((1, 1, 1), 3.0))


def test_complex_conjugate_results_download(session) -> None:
    # Was: fetching a lazily conjugated server tensor failed ("view ... conjugate view tensors").
    x = torch.randn(5, 7)
    same(torch.fft.ihfft(x.to(session.device)), torch.fft.ihfft(x).resolve_conj())
    c = torch.randn(4, dtype=torch.complex64)
    torch.testing.assert_close(c.to(session.device).conj().cpu(), c.conj().resolve_conj(), rtol=0, atol=0)


def test_out_ops_with_data_dependent_shapes(session) -> None:
    # Was: `out` kept its old shape; the result went to a fresh tensor instead of `out`.
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = torch.empty(0, dtype=torch.int64, device=session.device)
    r = torch.nonzero(x.to(session.device), out=out)
    assert r is out
    same(out, torch.nonzero(x))
    vals = torch.empty(0, device=session.device)
    torch.masked_select(x.to(session.device), x.to(session.device) > 0, out=vals)
    same(vals, torch.masked_select(x, x > 0))


def test_inplace_with_data_dependent_plan_returns_self(session) -> None:
    x = torch.arange(6.0)
    r = x.to(session.device)
    mask = (r > 2).to(session.device)
    ret = r.index_put_((mask,), torch.tensor(-1.0).to(session.device))
    assert ret is r
    x.index_put_((x > 2,), torch.tensor(-1.0))
    same(r, x)


def test_batch_norm_eval_saved_stats_on_cpu_server(session) -> None:
    # Was: the meta kernel says (C,), the CPU kernel returns (0,): fetching them broke the stream.
    assert session.kind == "cpu"
    args = [torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)]
    local = aten.native_batch_norm.default(*args, False, 0.1, 1e-5)
    remote = aten.native_batch_norm.default(*[a.to(session.device) for a in args], False, 0.1, 1e-5)
    for r, loc in zip(remote, local):
        same(r, loc)
    session.synchronize()


def test_lapack_and_fft_layouts_match_server(session) -> None:
    # Was: the meta kernels lay these out row-major; CPU LAPACK/pocketfft do not.
    a = torch.randn(5, 5)
    vals, vecs = torch.linalg.eig(a.to(session.device))
    lv, lvec = torch.linalg.eig(a)
    same(vecs, lvec)
    same(vals, lv)
    x = torch.randn(5, 6, 7)
    same(torch.fft.rfftn(x.to(session.device), dim=(0, 1)), torch.fft.rfftn(x, dim=(0, 1)))
    out = torch.empty(0, dtype=torch.complex64, device=session.device)
    local_out = torch.empty(0, dtype=torch.complex64)
    torch.fft.ifft(x.to(session.device), dim=1, out=out)
    torch.fft.ifft(x, dim=1, out=local_out)
    same(out, local_out)
    xs = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    same(torch.nonzero_static(xs.to(session.device), size=4), torch.nonzero_static(xs, size=4))


def test_meta_kernel_needing_data_goes_to_server(session) -> None:
    # Was: "cannot repeat_interleave a meta tensor without output_size" raised on the client.
    reps = torch.tensor([1, 0, 2])
    same(torch.repeat_interleave(reps.to(session.device)), torch.repeat_interleave(reps))
    x = torch.arange(3.0)
    same(x.to(session.device).repeat_interleave(reps.to(session.device)), x.repeat_interleave(reps))


def test_denied_op_runs_as_allowed_ops(session) -> None:
    # `as_strided_scatter` is denied on the server (it trusts its strides); the client runs it
    # as clone + as_strided + copy_, which the server checks.
    x, src = torch.zeros(3, 3), torch.ones(2)
    same(torch.as_strided_scatter(x.to(session.device), src.to(session.device), (2,), (4,)),
         torch.as_strided_scatter(x, src, (2,), (4,)))


def test_python_custom_op_runs_its_implementation(session) -> None:
    # Non-aten ops never reach the server; a Python custom op runs its own implementation.
    @torch.library.custom_op("gpupool_test::scaled_sum", mutates_args=())
    def scaled_sum(x: torch.Tensor, k: float) -> torch.Tensor:
        return (x * k).sum(0)

    x = torch.randn(4, 3)
    same(scaled_sum(x.to(session.device), 2.5), scaled_sum(x, 2.5))


def test_unsupported_op_fails_at_the_call(session) -> None:
    lib = torch.library.Library("gpupool_test2", "DEF")  # noqa: F841 - kept alive below
    lib.define("opaque(Tensor x) -> Tensor")
    lib.impl("opaque", lambda x: x + 1, "CompositeExplicitAutograd")
    x = torch.ones(2, device=session.device)
    with pytest.raises(gpupool.UnsupportedError, match="gpupool_test2::opaque"):
        torch.ops.gpupool_test2.opaque(x)
    session.synchronize()  # nothing was queued for it


def test_sparse_layouts_are_refused_clearly(session) -> None:
    x = torch.eye(3, device=session.device)
    with pytest.raises((gpupool.UnsupportedError, gpupool.RemoteOpError), match="(?i)sparse"):
        x.to_sparse().cpu()
    session.synchronize()


def test_fast_path_adds_no_route_work(session) -> None:
    """A planned op's route is decided once: later calls find it with one dict lookup."""
    x = torch.ones(3, device=session.device)
    (x + 1).cpu()
    assert oprecord.record_of(aten.add.Tensor).route is None
