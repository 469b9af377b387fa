"""Training-step benchmarks: one optimizer step of a model, on gpupool and on native eager.

Both sides build the same model from the same seed on the CPU, move it to their device, keep one
fixed batch resident there (data loading is not measured) and run `steps` steps per repetition,
ending with a device sync. The value is milliseconds per step. Optimizers use their defaults
for the device, as user code would (foreach on gpupool and CUDA, the for-loop on the CPU),
unless the config names an implementation (`fused`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tests.models import CNN, GPT, MLP
from torch import nn

from bench.side import Measure, Side


class CNN32(CNN):
    """tests.models.CNN for 32x32 inputs (its classifier expects 16x16)."""

    def __init__(self, classes: int = 10, size: int = 32) -> None:
        super().__init__(classes)
        self.fc = nn.Linear(16 * (size // 4) * (size // 4), classes)


def _batch(kind: str, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    b = int(cfg["batch"])
    if kind == "mlp":
        return torch.randn(b, int(cfg.get("d_in", 32)), generator=g), torch.randint(0, 10, (b,), generator=g)
    if kind in ("cnn", "resnet50"):
        size, classes = int(cfg["size"]), int(cfg.get("classes", 10))
        return torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)
    seq, vocab = int(cfg["seq"]), int(cfg["vocab"])
    return torch.randint(0, vocab, (b, seq), generator=g), torch.randint(0, vocab, (b, seq), generator=g)


def build_model(kind: str, cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(int(cfg.get("d_in", 32)), int(cfg.get("hidden", 64)), 10)
    if kind == "cnn":
        return CNN32(10, int(cfg["size"]))
    if kind == "gpt":
        return GPT(
            vocab=int(cfg["vocab"]),
            d=int(cfg["d"]),
            heads=int(cfg["heads"]),
            layers=int(cfg["layers"]),
            seq=int(cfg.get("max_seq", cfg["seq"])),
            dropout=float(cfg.get("dropout", 0.0)),
        )
    if kind == "resnet50":
        try:
            import torchvision
        except ImportError as e:
            raise Skip(f"torchvision is not importable ({e})") from None
        return torchvision.models.resnet50(num_classes=int(cfg.get("classes", 1000)))
    raise ValueError(f"unknown model {kind!r}")


class Skip(Exception):
    """The benchmark cannot run here (a missing optional package); the row says why."""


def build_optimizer(name: str, params: Any, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    impl: dict[str, Any] = {k: True for k in ("fused", "foreach") if cfg.get(k)}
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, **impl)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, **impl)
    raise ValueError(f"unknown optimizer {name!r}")


def make_step(side: Side, cfg: dict[str, Any]) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    """Build model, optimizer and batch on `side.device`; returns the step and facts about it."""
    kind = cfg["model"]
    model = build_model(kind, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(cfg["optimizer"], model.parameters(), cfg)  # before .to(): must still train
    model.to(side.device)
    model.train()
    x, y = _batch(kind, cfg)
    x, y = x.to(side.device), y.to(side.device)
    amp = cfg.get("amp")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if amp else None

    def autocast() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=side.device.type, dtype=dtype)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return out

    info = {"params": n_params, "amp": amp or "fp32"}
    return step, info


def setup(side: Side, cfg: dict[str, Any]) -> Measure:
    step, info = make_step(side, cfg)
    out = None
    for _ in range(int(cfg.get("warmup", 2))):
        out = step()
    side.sync()
    if out is not None:
        info["out_dtype"] = str(out.dtype).removeprefix("torch.")
    del out
    steps = int(cfg.get("steps", 5))

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        side.sync()
        return (time.perf_counter() - t0) / steps * 1e3

    return Measure(run, info, cpu_scale=1e3 / steps)
