"""The benchmarks of the suite: what each measures, against what, at which sizes, with which target.

Sizes come in layers: `cfg` is the full run; `quick`, `tiny` and `gpu` override parts of it for
`--quick` (under 2 minutes on a 2-core machine), `--tiny` (the test: each benchmark once, small)
and `--gpu` (a real GPU; GPU-only rows have `gpu_only`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30

TINY_GPT = {"vocab": 64, "d": 32, "heads": 2, "layers": 1, "seq": 16, "max_seq": 16, "batch": 2}


@dataclass(frozen=True)
class Spec:
    name: str
    unit: str
    better: str  # "lower" | "higher"
    target: float | None  # ratio gpupool / baseline; None: reported only
    family: str | None  # worker family; None: a placeholder row
    what: str
    baseline: str
    cfg: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    gpu_target: float | None = None
    gpu_only: bool = False
    timeout: float = 300.0  # seconds for one setup or one repetition of one side
    rep_scale: int = 1  # cheap, noise-prone rows alternate more often: reps * rep_scale
    note: str = ""
    # Extra environment of the gpupool client process (the remote worker) for this row; the
    # native side never sees it. The driver runs such rows in a remote worker of their own.
    env: dict[str, str] = field(default_factory=dict)

    def config(self, mode: str, tiny: bool) -> dict[str, Any]:
        c = dict(self.cfg)
        if mode == "quick":
            c.update(self.quick)
        if mode == "gpu":
            c.update(self.gpu)
        if tiny:
            c.update(self.tiny)
        return c

    def target_for(self, mode: str) -> float | None:
        return self.gpu_target if mode == "gpu" else self.target


_TRAIN_TINY = {"steps": 1, "warmup": 1}
_MLP = {"model": "mlp", "batch": 16, "optimizer": "adam", "steps": 50, "warmup": 5}
_CNN = {"model": "cnn", "size": 32, "batch": 32, "optimizer": "sgd", "steps": 10, "warmup": 3}
_CNN_TINY = {"size": 8, "batch": 2, **_TRAIN_TINY}
_NO_REPLAY = {"GPUPOOL_REPLAY": "0"}

SPECS: list[Spec] = [
    Spec(
        "mlp_adam_step", "ms/step", "lower", 2.0, "train",
        "MLP 32-64-64-10, batch 16, Adam: one training step",
        "the same step, native eager",
        cfg=_MLP,
        quick={"steps": 30},
        tiny=_TRAIN_TINY,
    ),
    Spec(
        "gpt_small_step", "ms/step", "lower", 1.3, "train",
        "GPT 4 layers, d=256, 4 heads, seq 128, batch 8, vocab 256, AdamW: one training step",
        "the same step, native eager",
        cfg={"model": "gpt", "vocab": 256, "d": 256, "heads": 4, "layers": 4, "seq": 128, "batch": 8,
             "dropout": 0.1, "optimizer": "adamw", "steps": 3, "warmup": 2},
        quick={"steps": 1, "warmup": 1},
        tiny={**TINY_GPT, **_TRAIN_TINY},
        gpu={"steps": 20, "warmup": 3},
    ),
    Spec(
        "cnn_step", "ms/step", "lower", 1.3, "train",
        "CNN (2 conv + BatchNorm), batch 32, 32x32 inputs, SGD momentum: one training step",
        "the same step, native eager",
        cfg=_CNN,
        quick={"steps": 5},
        tiny=_CNN_TINY,
        gpu={"steps": 30},
    ),
    Spec(
        "lstm_step", "ms/step", "lower", 2.0, "train",
        "word_language_model LSTM: embedding 1000x64, nn.LSTM(64, 64, 2 layers), linear decoder, "
        "seq 35, batch 20, truncated BPTT (state carried, detached), SGD lr 20, "
        "clip_grad_norm_ 0.25: one training step",
        "the same step, native eager",
        cfg={"model": "lstm_lm", "vocab": 1000, "emsize": 64, "nhid": 64, "layers": 2, "seq": 35,
             "batch": 20, "dropout": 0.0, "optimizer": "sgd", "lr": 20.0, "momentum": 0.0,
             "clip": 0.25, "steps": 10, "warmup": 3},
        quick={"steps": 5},
        tiny={"vocab": 50, "emsize": 8, "nhid": 8, "seq": 4, "batch": 2, **_TRAIN_TINY},
    ),
    Spec(
        "lstm_cell_loop", "ms/step", "lower", 2.0, "train",
        "time_sequence_prediction: LSTMCell(1, 51), LSTMCell(51, 51), Linear(51, 1) stepped over "
        "100 samples in Python, batch 97, float64, MSE, Adam lr 0.01: one training step",
        "the same step, native eager",
        cfg={"model": "lstm_cells", "hidden": 51, "seq": 100, "batch": 97, "optimizer": "adam",
             "lr": 0.01, "steps": 5, "warmup": 2},
        quick={"steps": 2, "warmup": 1},
        tiny={"seq": 4, "batch": 4, "hidden": 8, **_TRAIN_TINY},
    ),
    Spec(
        "mlp_adam_step_eager", "ms/step", "lower", None, "train",
        "`mlp_adam_step` with step replay off (GPUPOOL_REPLAY=0): one training step",
        "the same step, native eager",
        cfg=_MLP,
        quick={"steps": 30},
        tiny=_TRAIN_TINY,
        env=_NO_REPLAY,
        note="gpupool client with GPUPOOL_REPLAY=0 (step replay off)",
    ),
    Spec(
        "cnn_step_eager", "ms/step", "lower", None, "train",
        "`cnn_step` with step replay off (GPUPOOL_REPLAY=0): one training step",
        "the same step, native eager",
        cfg=_CNN,
        quick={"steps": 5},
        tiny=_CNN_TINY,
        gpu={"steps": 30},
        env=_NO_REPLAY,
        note="gpupool client with GPUPOOL_REPLAY=0 (step replay off)",
    ),
    Spec(
        "op_add_small", "us/op", "lower", None, "op_add",
        "`a + b` on 16-element tensors, 10,000 in a row, then one sync",
        "the same ops, native eager",
        cfg={"numel": 16, "n": 10_000},
        tiny={"n": 50},
    ),
    Spec(
        "h2d_64MiB", "GB/s", "higher", 0.9, "transfer",
        "`.to(device)` of a 64 MiB host tensor, then a sync",
        "plain socket, `sendall` + `recv_into` in 256 KiB slices, 64 MiB",
        cfg={"direction": "h2d", "bytes": 64 * MiB, "inner": 3},
        tiny={"bytes": MiB, "inner": 1},
        gpu_target=0.9,
    ),
    Spec(
        "d2h_64MiB", "GB/s", "higher", 0.9, "transfer",
        "`.cpu()` of a 64 MiB device tensor",
        "plain socket, `sendall` + `recv_into` in 256 KiB slices, 64 MiB",
        cfg={"direction": "d2h", "bytes": 64 * MiB, "inner": 3},
        tiny={"bytes": MiB, "inner": 1},
        gpu_target=0.9,
    ),
    Spec(
        "h2d_1GiB", "GB/s", "higher", 0.9, "transfer",
        "`.to(device)` of a 1 GiB host tensor, then a sync",
        "plain socket, `sendall` + `recv_into` in 256 KiB slices, 1 GiB",
        cfg={"direction": "h2d", "bytes": GiB, "inner": 1},
        tiny={"bytes": 2 * MiB, "inner": 1},
        gpu_target=0.9,
    ),
    Spec(
        "sync_rtt", "us", "lower", 2.0, "rtt",
        "`.item()` of a scalar already computed: one round trip (median of 200 per repetition)",
        "100-byte request/reply on a plain socket (median of 200 per repetition)",
        cfg={"n": 200},
        tiny={"n": 20},
        gpu_target=2.0, rep_scale=5,
    ),
    Spec(
        "lease_grant", "ms", "lower", 5.0, "lease",
        "request + release of a `-p 0.25` lease, 1,000 GPUs registered, 20 clients: p50",
        "`GET` of the controller's health endpoint, same clients",
        cfg={"gpus": 1000, "clients": 20, "per_client": 10},
        quick={"per_client": 5},
        tiny={"gpus": 16, "clients": 2, "per_client": 2},
        gpu_target=5.0, timeout=300,
    ),
    # ---- on a real GPU only (`--gpu`), unless named with --only --------------------------------
    Spec(
        "gpt2_small_b8_s1024", "ms/step", "lower", 1.10, "train",
        "GPT-2 small (124M), batch 8, seq 1024, bf16 autocast, fused AdamW: one training step",
        "the same step, native CUDA eager",
        cfg={"model": "gpt", "vocab": 50304, "d": 768, "heads": 12, "layers": 12, "seq": 1024,
             "max_seq": 1024, "batch": 8, "dropout": 0.0, "optimizer": "adamw", "fused": True,
             "amp": "bf16", "steps": 10, "warmup": 3},
        tiny={**TINY_GPT, **_TRAIN_TINY},
        gpu_target=1.10, gpu_only=True, timeout=600,
    ),
    Spec(
        "gpt2_small_b1_s128", "ms/step", "lower", None, "train",
        "GPT-2 small (124M), batch 1, seq 128, bf16 autocast, fused AdamW: one training step",
        "the same step, native CUDA eager",
        cfg={"model": "gpt", "vocab": 50304, "d": 768, "heads": 12, "layers": 12, "seq": 128,
             "max_seq": 1024, "batch": 1, "dropout": 0.0, "optimizer": "adamw", "fused": True,
             "amp": "bf16", "steps": 20, "warmup": 3},
        tiny={**TINY_GPT, "batch": 1, **_TRAIN_TINY},
        gpu_only=True, timeout=600,
    ),
    Spec(
        "resnet50_b64", "ms/step", "lower", 1.10, "train",
        "ResNet-50, batch 64, 224x224, fp32, SGD momentum: one training step",
        "the same step, native CUDA eager",
        cfg={"model": "resnet50", "size": 224, "batch": 64, "classes": 1000, "optimizer": "sgd",
             "steps": 10, "warmup": 3},
        tiny={"size": 32, "batch": 2, "classes": 10, **_TRAIN_TINY},
        gpu_target=1.10, gpu_only=True, timeout=600,
    ),
]

BY_NAME = {s.name: s for s in SPECS}


def select(mode: str, only: list[str] | None) -> list[Spec]:
    """The benchmarks a run covers: named ones in suite order, else the mode's set."""
    if only:
        unknown = [n for n in only if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        return [s for s in SPECS if s.name in only]
    return [s for s in SPECS if mode == "gpu" or not s.gpu_only]
