"""`gpupool run`: start a command with the gpupool client installed in its Python processes.

The command runs with `boot/` first on PYTHONPATH: its `sitecustomize` installs the client in
every Python process the command starts (see `gpupool.launcher.bootstrap`), and
GPUPOOL_SERVER / GPUPOOL_TOKEN tell the client where the pooled GPU is. Sessions open lazily,
on the program's first use of the device.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot")


def command_env(server: str, token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a command runs in under `gpupool run`."""
    env = dict(os.environ if base is None else base)
    env["GPUPOOL_SERVER"] = server
    env["GPUPOOL_TOKEN"] = token
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = BOOT_DIR + (os.pathsep + old if old else "")
    return env


PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGKILL when this process dies (Linux), or None.

    Note [Die with gpupool run]: a command whose `gpupool run` was killed has lost its lease (the
    server ends it when the hold connection closes, Note [Hold connection] in hold.py), so it must
    not go on alone. PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so the
    child must be started from the main thread. If this process died between the fork and the
    prctl, the signal will never come: the child sees another parent and exits at once. SIGKILL,
    not SIGTERM: a program that handles SIGTERM must not outlive its GPU. The function is resolved
    here, before the fork, so the child only calls into libc (it runs between fork and exec, where
    other threads' locks may be held).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sig = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(125)

    return preexec


def run_command(cmd: list[str], server: str, token: str, extra_env: dict[str, str] | None = None,
                die_with_us: bool = False) -> int:
    """Run `cmd` with the client installed; returns its exit status (signals are forwarded).

    `extra_env` carries a pool lease (GPUPOOL_LEASE_PATH, GPUPOOL_LEASE_GPUS, GPUPOOL_LEASE_ID).
    With `die_with_us`, the command is killed if this process dies (Note [Die with gpupool run]).
    """
    env = command_env(server, token)
    env.update(extra_env or {})
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent() if die_with_us else None)
    except FileNotFoundError:
        print(f"gpupool run: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"gpupool run: permission denied: {cmd[0]}", file=sys.stderr)
        return 126
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    rc = proc.wait()
    # Note: a child killed by a signal reports -N; a shell would report 128+N.
    return 128 - rc if rc < 0 else rc
