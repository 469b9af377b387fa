"""PyTorch semantics users rely on, on the gpupool device: autograd features, dtypes,
modules and optimizers, checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import GPT, MLP


def test_retain_graph_hooks_and_autograd_grad(session) -> None:
    dev = session.device
    x = torch.randn(4, 3).to(dev).requires_grad_()
    seen = []
    x.register_hook(lambda g: seen.append(g.shape) or g * 2)
    y = (x.sin() * x).sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    y.backward()
    xc = x.detach().cpu().requires_grad_()
    yc = (xc.sin() * xc).sum()
    (gc,) = torch.autograd.grad(yc, xc)
    torch.testing.assert_close(g1.cpu(), gc * 2, rtol=0, atol=0)
    torch.testing.assert_close(x.grad.cpu(), gc * 2, rtol=0, atol=0)
    assert seen == [torch.Size([4, 3])] * 2


def test_no_grad_and_inference_mode(session) -> None:
    w = torch.randn(3, 3).to(session.device).requires_grad_()
    with torch.no_grad():
        y = w * 2
    assert not y.requires_grad
    with torch.inference_mode():
        z = w @ w
    assert not z.requires_grad and z.is_inference()
    torch.testing.assert_close(z.cpu(), w.detach().cpu() @ w.detach().cpu(), rtol=0, atol=0)


def test_bfloat16_runs_in_bf16(session) -> None:
    a = torch.randn(8, 8)
    r = a.to(session.device, dtype=torch.bfloat16)
    out = r @ r
    assert out.dtype == torch.bfloat16
    ab = a.bfloat16()
    torch.testing.assert_close(out.cpu(), ab @ ab, rtol=0, atol=0)


def test_sdpa_uses_fused_kernel_and_matches(session) -> None:
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    rq, rk, rv = (t.to(session.device) for t in (q, k, v))
    out = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True)
    torch.testing.assert_close(out.cpu(), F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    from gpupool.client import functions

    assert functions._choices, "the server was asked which fused kernel to use"
    mask = torch.rand(16, 16) > 0.3
    mask.fill_diagonal_(True)
    out = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=mask.to(session.device))
    torch.testing.assert_close(out.cpu(), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=0)


def test_module_to_keeps_optimizer_and_parameters(session) -> None:
    model = MLP()
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.to(session.device)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    assert all(p.device == session.device for p in model.parameters())
    before = model.net[0].weight.detach().cpu().clone()
    model(torch.randn(2, 32).to(session.device)).sum().backward()
    opt.step()
    assert not torch.equal(model.net[0].weight.detach().cpu(), before)


def test_state_dict_roundtrip_and_deepcopy(session) -> None:
    torch.manual_seed(0)
    model = MLP().to(session.device)
    sd = model.state_dict()
    other = MLP()
    other.load_state_dict({k: v.cpu() for k, v in sd.items()})
    x = torch.randn(3, 32)
    torch.testing.assert_close(other(x), model(x.to(session.device)).cpu(), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    assert all(p.device == session.device for p in twin.parameters())
    torch.testing.assert_close(twin(x.to(session.device)).cpu(), other(x), rtol=0, atol=0)


def _save(obj: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_checkpoint_is_a_cuda_checkpoint(session) -> None:
    t = torch.randn(5, 7).to(session.device)
    buf = _save({"t": t, "view": t[1:3]})
    # it names "cuda" storages, exactly like a checkpoint written on a GPU
    import zipfile

    with zipfile.ZipFile(buf) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pkl
    buf.seek(0)
    host = torch.load(buf, map_location="cpu")
    assert host["t"].device.type == "cpu"
    torch.testing.assert_close(host["t"], t.cpu(), rtol=0, atol=0)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert back["t"].device == session.device
    torch.testing.assert_close(back["t"].cpu(), t.cpu(), rtol=0, atol=0)


def test_whole_model_save_load_keeps_parameters_and_ties(session) -> None:
    torch.manual_seed(0)
    model = GPT().to(session.device)
    back = torch.load(_save(model), weights_only=False)
    params = dict(back.named_parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.device == session.device for p in params.values())
    # tied weights are still one tensor
    assert back.head.weight is back.tok.weight
    idx = torch.randint(0, 64, (2, 16))
    model.eval()
    back.eval()
    torch.testing.assert_close(back(idx.to(session.device)).cpu(), model(idx.to(session.device)).cpu(), rtol=0, atol=0)
    # state_dict with weights_only onto the device
    sd = torch.load(_save(model.state_dict()), weights_only=True)
    assert all(v.device == session.device for v in sd.values())
    fresh = GPT()
    fresh.load_state_dict({k: v.cpu() for k, v in sd.items()})
    torch.testing.assert_close(fresh.eval()(idx), model(idx.to(session.device)).cpu(), rtol=0, atol=0)


def test_dropout_reproducible_with_manual_seed(session) -> None:
    x = torch.ones(1000).to(session.device)
    torch.manual_seed(7)
    a = F.dropout(x, 0.5).cpu()
    torch.manual_seed(7)
    b = F.dropout(x, 0.5).cpu()
    assert torch.equal(a, b)
    assert 300 < int((a == 0).sum()) < 700


def test_forked_child_cannot_use_the_parents_session(session) -> None:
    import os

    import gpupool

    x = torch.ones(4).to(session.device)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must get a clear error, and must not disturb the parent's session
        try:
            (x + 1).cpu()
            msg = b"no error"
        except gpupool.UnsupportedError as e:
            msg = b"ok " + str(e).encode()[:200]
        except BaseException as e:  # noqa: BLE001
            msg = repr(e).encode()[:200]
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    got = os.read(r, 400).decode()
    assert got.startswith("ok ") and "spawn" in got, got
    assert (x + 1).sum().item() == 8.0  # the parent's session is intact


def test_share_exceeded_is_a_torch_out_of_memory_error(server) -> None:
    from tests.conftest import run_python

    code = f"""
    import torch, gpupool
    import subprocess
    s = gpupool.connect({server.address!r}, token={server.token!r})
    try:
        torch.empty(10**13, dtype=torch.uint8, device=s.device).sum().item()
    except torch.OutOfMemoryError as e:
        print("caught", isinstance(e, gpupool.ShareExceeded))
    """
    r = run_python(code)
    assert r.stdout.strip() == "caught True", r.stdout + r.stderr


def test_bad_generator_state_is_a_clear_error_and_the_session_goes_on(session) -> None:
    import gpupool

    good = session.get_rng_state()
    session.set_rng_state(torch.zeros(7, dtype=torch.uint8))  # not a generator state
    with pytest.raises(gpupool.RemoteOpError) as ei:
        session.synchronize()
    assert "set_rng_state" in str(ei.value)
    session.set_rng_state(good)
    a = torch.rand(3, device=session.device).cpu()
    session.set_rng_state(good)
    assert torch.equal(torch.rand(3, device=session.device).cpu(), a)


def test_lstm_and_gru_train_on_the_device(session) -> None:
    """The layers run whole on the server (tests/test_whole_rnn.py); with that off
    (GPUPOOL_WHOLE_RNN=0) PyTorch takes CUDA's fused-cell path, which client/rnn.py decomposes.
    Either way they must work on any server, forward and backward, and agree with the CPU."""
    for cls in (nn.LSTM, nn.GRU):
        torch.manual_seed(0)
        cpu = cls(8, 16, num_layers=2, batch_first=True)
        dev = copy.deepcopy(cpu).to(session.device)
        x = torch.randn(3, 5, 8)
        out_c, _ = cpu(x)
        out_d, _ = dev(x.to(session.device))
        torch.testing.assert_close(out_d.cpu(), out_c, rtol=1e-5, atol=1e-6)
        out_c.pow(2).sum().backward()
        out_d.pow(2).sum().backward()
        for (name, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
            torch.testing.assert_close(pd.grad.cpu(), pc.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_optimizers_step_like_the_cpu(session, name: str) -> None:
    """`fused=True` (what nanoGPT picks on a CUDA device): `_fused_sgd_` returns nothing, and
    the device once returned an empty tuple for it, which PyTorch refuses."""
    torch.manual_seed(0)
    cpu = torch.nn.Linear(4, 3)
    dev = torch.nn.Linear(4, 3).to(session.device)
    dev.load_state_dict(cpu.state_dict())
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    opts = [getattr(torch.optim, name)(m.parameters(), fused=True, **kwargs) for m in (cpu, dev)]
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, opt, inp in ((cpu, opts[0], x), (dev, opts[1], x.to(session.device))):
            opt.zero_grad()
            m(inp).pow(2).sum().backward()
            opt.step()
    for a, b in zip(cpu.parameters(), dev.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=0, atol=0)
