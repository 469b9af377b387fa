"""`gpupool run`: start a command with the gpupool client installed in its Python processes.

Placeholder: the transparent-"cuda" bootstrap (sitecustomize) lives beside this file.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_command(cmd: list[str], server: str, token: str) -> int:
    env = dict(os.environ)
    env["GPUPOOL_SERVER"] = server
    env["GPUPOOL_TOKEN"] = token
    here = os.path.dirname(os.path.abspath(__file__))
    boot = os.path.join(here, "boot")
    env["PYTHONPATH"] = boot + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        print(f"gpupool run: command not found: {cmd[0]}")
        return 127
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    return proc.wait()
