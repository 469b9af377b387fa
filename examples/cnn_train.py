"""Train a small CNN with BatchNorm on synthetic images — ordinary PyTorch code for a GPU.

Picks its device the way pytorch/examples does (`torch.accelerator`), so under
`gpupool run ... -- python examples/cnn_train.py` it trains on the pooled GPU. DEVICE=cpu forces
the CPU. Deterministic: data and batches come from CPU generators, the model is initialised on
the CPU, and the device generator is reseeded before training.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

STEPS = int(os.environ.get("STEPS", "60"))


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 images of a noisy bar: horizontal, vertical or one of the two diagonals."""
    g = torch.Generator().manual_seed(99)
    labels = torch.randint(0, 4, (n,), generator=g)
    img = torch.randn(n, 1, 16, 16, generator=g) * 0.8
    r = torch.arange(16)
    pos = torch.randint(3, 13, (n,), generator=g)
    for i in range(n):
        p, k = int(pos[i]), int(labels[i])
        if k == 0:
            img[i, 0, p, :] += 2
        elif k == 1:
            img[i, 0, :, p] += 2
        elif k == 2:
            img[i, 0, r, r] += 2
        else:
            img[i, 0, r, 15 - r] += 2
    return img, labels


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def main() -> None:
    if os.environ.get("DEVICE"):
        device = torch.device(os.environ["DEVICE"])
    elif torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)
    x, y = make_data(1024)
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    torch.manual_seed(1)
    x, y = x.to(device), y.to(device)
    batches = torch.Generator().manual_seed(5)
    t0 = time.perf_counter()
    model.train()
    for step in range(STEPS):
        idx = torch.randint(0, x.shape[0], (64,), generator=batches).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}")
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    state = model.state_dict()  # includes BatchNorm's running statistics
    checksum = sum(t.detach().double().sum().item() for t in state.values() if t.is_floating_point())
    print(f"device: {next(model.parameters()).device}")
    print(f"final loss: {loss.item():.10e}")
    print(f"accuracy: {acc:.6f}")
    print(f"checksum: {checksum:.10e}")
    print(f"time: {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
