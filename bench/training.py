"""Training-step benchmarks: one optimizer step of a model, on gpupool and on native eager.

Both sides build the same model from the same seed on the CPU, move it to their device, keep one
fixed batch resident there (data loading is not measured) and run `steps` steps per repetition,
ending with a device sync. The value is milliseconds per step. Optimizers use their defaults
for the device, as user code would (foreach on gpupool and CUDA, the for-loop on the CPU),
unless the config names an implementation (`fused`).

The recurrent rows follow pytorch/examples: `lstm_lm` is word_language_model (truncated BPTT: the
hidden state is carried from step to step, detached, and gradients are clipped), `lstm_cells` is
time_sequence_prediction (two LSTMCells stepped over the sequence in Python, float64, MSE).

During the warm-up, one step runs under an op counter (a TorchDispatchMode, outside the timed
region): `info["ops_per_step"]` is the number of aten ops one step issues on that side's device,
from which the driver reports the client's CPU time per op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tests.models import CNN, GPT, MLP, SineLSTM, WordLM
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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
    if kind == "lstm_lm":  # (seq, batch) tokens, next-token targets flattened as in the example
        stream = torch.randint(0, int(cfg["vocab"]), (int(cfg["seq"]) + 1, b), generator=g)
        return stream[:-1].contiguous(), stream[1:].reshape(-1)
    if kind == "lstm_cells":  # time_sequence_prediction's sines (built there with numpy), float64
        t, n = float(cfg.get("period", 20)), b + 3
        x = torch.arange(int(cfg["seq"]) + 1) + torch.randint(int(-4 * t), int(4 * t), (n, 1), generator=g)
        data = torch.sin(x.double() / t)
        return data[3:, :-1].contiguous(), data[3:, 1:].contiguous()
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
    if kind == "lstm_lm":
        return WordLM(int(cfg["vocab"]), int(cfg["emsize"]), int(cfg["nhid"]), int(cfg["layers"]), float(cfg.get("dropout", 0.0)))
    if kind == "lstm_cells":
        return SineLSTM(int(cfg["hidden"])).double()
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
    """The optimizer with the suite's defaults; `lr` and `momentum` in `cfg` override them."""
    impl: dict[str, Any] = {k: True for k in ("fused", "foreach") if cfg.get(k)}
    lr = cfg.get("lr")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr or 1e-3, **impl)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr or 3e-4, weight_decay=0.01, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.05, momentum=cfg.get("momentum", 0.9), **impl)
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

    clip = cfg.get("clip")
    # Truncated BPTT (lstm_lm): the state one step leaves is the next step's input, detached.
    hidden = model.init_hidden(int(cfg["batch"])) if isinstance(model, WordLM) else None

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal hidden
        if kind == "lstm_lm":
            assert hidden is not None
            out, state = model(x, tuple(h.detach() for h in hidden))
            hidden = state
            return out, F.cross_entropy(out, y)
        if kind == "lstm_cells":
            out = model(x)
            return out, F.mse_loss(out, y)
        out = model(x)
        return out, F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out, loss = forward()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        opt.step()
        return out

    info = {"params": n_params, "amp": amp or "fp32"}
    return step, info


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the device's dispatch, backward's included."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], torch.Tensor], sync: Callable[[], None]) -> int:
    """The aten ops one call of `step` issues (the call is one more step: run it in the warm-up)."""
    counter = OpCounter()
    with counter:
        step()
    sync()
    return counter.n


def setup(side: Side, cfg: dict[str, Any]) -> Measure:
    step, info = make_step(side, cfg)
    # Ops are counted in a steady step (the first one also creates optimizer state), and at least
    # one ordinary step follows before timing.
    out = step()
    info["ops_per_step"] = count_ops(step, side.sync)
    for _ in range(max(1, int(cfg.get("warmup", 2)) - 1)):
        out = step()
    side.sync()
    info["out_dtype"] = str(out.dtype).removeprefix("torch.")
    del out
    steps = int(cfg.get("steps", 5))

    def replayed() -> int:
        return int(side.session.replay_stats()["ops_replayed"]) if side.session is not None else 0

    def run() -> float:
        before = replayed()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        side.sync()
        dt = (time.perf_counter() - t0) / steps * 1e3
        if side.session is not None:
            info["replayed_ops_per_step"] = round((replayed() - before) / steps)
        return dt

    return Measure(run, info, cpu_scale=1e3 / steps)
