"""What a session worker may still touch once sandboxed (Note [Worker sandbox] in worker.py).

The mechanism is `sandbox.py`; this is the policy: the code and libraries the worker may load
lazily (Python's and torch's, read-only), CPU topology files torch's thread pool reads, its own
/proc entry (never another process's: the listener's environment holds its token), and the
GPU's device files. Nothing here is a secret: the pool's secrets live in 0600 files elsewhere.

$GPUPOOL_SANDBOX=off turns the sandbox off (`gpupool server --no-sandbox`), for debugging only.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

#: System library and CPU-description locations, read-only, where they exist.
_SYSTEM_READ = (
    "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
    "/sys/devices/system/cpu", "/sys/devices/system/node", "/sys/fs/cgroup", "/proc/cpuinfo",
    "/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices/pci0000:00", "/usr/share/nvidia",
)
_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


def read_only_paths() -> list[str]:
    """The directories and files a worker may read after the sandbox is applied."""
    import torch

    import gpupool

    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {sys.prefix, sys.base_prefix + "/lib", sys.exec_prefix + "/lib"}
    paths.add(os.path.dirname(os.path.abspath(gpupool.__file__)))
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))
    paths.add(f"/proc/{os.getpid()}")
    paths.update(_SYSTEM_READ)
    return sorted(p for p in paths if os.path.exists(p))


def device_paths() -> list[str]:
    """GPU device files (none on a CPU-backed host)."""
    found = [p for p in _DEVICES if os.path.exists(p)]
    found += sorted(glob.glob("/dev/nvidia[0-9]*")) + sorted(glob.glob("/dev/nvidia-caps/*"))
    return found


def disabled() -> bool:
    return os.environ.get("GPUPOOL_SANDBOX", "").lower() in ("0", "off", "no", "false")


def apply() -> str:
    """Sandbox this worker, from its main thread, before it starts any other thread; returns
    a line saying what was applied."""
    if disabled():
        return "sandbox off ($GPUPOOL_SANDBOX=off)"
    from gpupool.server import sandbox

    return sandbox.restrict(read_only_paths(), device_paths()).summary()
