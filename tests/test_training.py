"""Training equivalence: the same models trained on the gpupool device and on the local CPU give
the same losses and parameters (the server is CPU-backed here, so bit-for-bit)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import CNN, GPT, MLP

STEPS = 200


def _data(kind: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        if kind == "mlp":
            x = torch.randn(16, 32, generator=g)
            y = torch.randint(0, 10, (16,), generator=g)
        elif kind == "cnn":
            x = torch.randn(8, 3, 16, 16, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
        else:
            x = torch.randint(0, 64, (4, 16), generator=g)
            y = torch.randint(0, 64, (4, 16), generator=g)
        out.append((x, y))
    return out


def _make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"mlp": MLP, "cnn": CNN, "gpt": GPT}[kind]()


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, **kw),
    "adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-3, **kw),
    "adamw": lambda p, **kw: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, **kw),
}


def _train(kind: str, opt_name: str, device: torch.device | str, impl: dict, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _make(kind)
    opt = OPTIMIZERS[opt_name](model.parameters(), **impl)  # built before .to(): must still train
    model.to(device)
    model.train()
    torch.manual_seed(42)  # dropout stream: the device's generator, like CUDA's
    losses = []
    for x, y in _data(kind, steps):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return [float(v.cpu()) for v in losses], {k: v.detach().cpu() for k, v in model.state_dict().items()}


CASES = [
    ("mlp", "sgd", {}),
    ("mlp", "adam", {"foreach": False}),
    ("mlp", "adamw", {"fused": True}),
    ("cnn", "sgd", {"foreach": True}),
    ("cnn", "adam", {}),
    ("gpt", "adamw", {"foreach": True}),
    ("gpt", "sgd", {"foreach": False}),
    ("gpt", "adam", {"fused": True}),
]


@pytest.mark.parametrize(("kind", "opt_name", "impl"), CASES, ids=[f"{k}-{o}-{'-'.join(i) or 'default'}" for k, o, i in CASES])
def test_training_matches_cpu(session, kind: str, opt_name: str, impl: dict) -> None:
    steps = STEPS if kind != "gpt" else STEPS // 2
    # Locally, name the implementation the device picks by default (foreach, as on CUDA).
    local_impl = impl or {"foreach": True}
    local_losses, local_params = _train(kind, opt_name, "cpu", local_impl, steps)
    remote_losses, remote_params = _train(kind, opt_name, session.device, impl, steps)
    assert remote_losses == local_losses
    assert local_losses[-1] < local_losses[0]
    assert remote_params.keys() == local_params.keys()
    for name in local_params:
        torch.testing.assert_close(remote_params[name], local_params[name], rtol=0, atol=0, msg=name)
