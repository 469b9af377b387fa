"""`gpupool run`: start a command with the gpupool client installed in its Python processes.

The command runs with `boot/` first on PYTHONPATH: its `sitecustomize` installs the client in
every Python process the command starts (see `gpupool.launcher.bootstrap`), and
GPUPOOL_SERVER / GPUPOOL_TOKEN tell the client where the pooled GPU is. Sessions open lazily,
on the program's first use of the device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot")


def command_env(server: str, token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a command runs in under `gpupool run`."""
    env = dict(os.environ if base is None else base)
    env["GPUPOOL_SERVER"] = server
    env["GPUPOOL_TOKEN"] = token
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = BOOT_DIR + (os.pathsep + old if old else "")
    return env


def run_command(cmd: list[str], server: str, token: str, extra_env: dict[str, str] | None = None) -> int:
    """Run `cmd` with the client installed; returns its exit status (signals are forwarded).

    `extra_env` carries a pool lease (GPUPOOL_LEASE_PATH, GPUPOOL_LEASE_GPUS, GPUPOOL_LEASE_ID).
    """
    env = command_env(server, token)
    env.update(extra_env or {})
    try:
        proc = subprocess.Popen(cmd, env=env)
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
