"""What a benchmark needs to know about the process it runs in: which side of the comparison.

Two kinds of worker process take part in every benchmark: `remote` (a gpupool client whose
device is a session on the server) and `local` (native eager PyTorch on the CPU or CUDA, and the
plain-socket client for the wire baselines). They are separate processes because registering the
gpupool backend in a process that also trains on local CUDA tensors breaks autograd there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Side:
    name: str  # "remote" or "local"
    device: torch.device
    sync: Callable[[], None]
    session: Any = None  # the gpupool Session on the remote side
    sockbase: str | None = None  # address of the plain-socket baseline server (local side)

    @property
    def remote(self) -> bool:
        return self.name == "remote"


@dataclass
class Measure:
    """A prepared benchmark: each `run()` is one repetition and returns its value in the row's unit.

    `cpu_scale` converts CPU seconds spent in one repetition into the row's unit (e.g. 1e3 / steps
    for ms/step); None where CPU time says nothing useful (transfers, round trips).
    """

    run: Callable[[], float]
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    cpu_scale: float | None = None
