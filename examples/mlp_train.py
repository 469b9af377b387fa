"""Train a small MLP classifier on synthetic data — ordinary PyTorch code written for a GPU.

    python examples/mlp_train.py                                  # on a local GPU (or CPU)
    gpupool run --server HOST:PORT --token T -- python examples/mlp_train.py   # on a pooled GPU
    DEVICE=cpu python examples/mlp_train.py                       # force the CPU

Deterministic: data comes from its own CPU generator, the model is initialised on the CPU from
seed 0, and the device generator is reseeded before training (dropout draws from it), so a run on
any device that shares the CPU's generator and kernels prints the same numbers.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

STEPS = int(os.environ.get("STEPS", "200"))


def make_data(n: int, dim: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(classes, dim, generator=g) * 0.35
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + torch.randn(n, dim, generator=g)
    return x, labels


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    device = os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x, y = make_data(4096, 32, 10)
    model = MLP(32, 128, 10)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    torch.manual_seed(1)  # the device's generator drives dropout from here on
    x, y = x.to(device), y.to(device)
    batches = torch.Generator().manual_seed(7)
    t0 = time.perf_counter()
    model.train()
    for step in range(STEPS):
        idx = torch.randint(0, x.shape[0], (128,), generator=batches).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"device: {next(model.parameters()).device}")
    print(f"final loss: {loss.item():.10e}")
    print(f"accuracy: {acc:.6f}")
    print(f"checksum: {checksum:.10e}")
    print(f"time: {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
