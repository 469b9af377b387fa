"""What this host serves: its CUDA GPUs, or CPU-backed devices labelled as such."""

from __future__ import annotations

import dataclasses
import os
import platform


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    index: int
    kind: str  # "cuda" or "cpu"
    name: str
    memory_total: int
    uuid: str = ""  # the GPU's own UUID; empty for CPU-backed devices

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


DEFAULT_CPU_MEMORY = 8 * 1024**3


def discover(cpu_gpus: int | None = None, cpu_memory: int = DEFAULT_CPU_MEMORY) -> list[DeviceInfo]:
    """The CUDA devices of this host, else `cpu_gpus` (default 1) CPU-backed ones.

    Note: the listener calls this, so CUDA is queried in a short-lived subprocess-free way: only
    `torch.cuda.device_count()` and properties, which do not create a context on torch >= 2.x
    with NVML available. Sessions own their context in their worker process.
    """
    if cpu_gpus is None and not os.environ.get("GPUPOOL_FORCE_CPU"):
        import torch

        if torch.cuda.is_available():
            out = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append(DeviceInfo(i, "cuda", p.name, int(p.total_memory), str(getattr(p, "uuid", "") or "")))
            return out
    n = 1 if cpu_gpus is None else cpu_gpus
    cpu = platform.processor() or platform.machine()
    return [DeviceInfo(i, "cpu", f"CPU-backed device ({cpu})", cpu_memory) for i in range(n)]
