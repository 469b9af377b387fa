"""`make demo`: start a pool on this machine, run an unmodified CUDA example on it, stop the pool."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_mlp.py"


def start_server(token: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpupool", "server", "--listen", "127.0.0.1:0", "--token", token],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        print(f"  [server] {line.rstrip()}")
        if "listening on" in line:
            return proc, line.rsplit(" ", 1)[1].strip()
    proc.kill()
    raise SystemExit("the gpupool server did not start")


def main() -> int:
    example = Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE
    token = secrets.token_urlsafe(16)
    print("gpupool demo: starting a server on this machine ...")
    proc, address = start_server(token)
    try:
        cmd = [sys.executable, "-m", "gpupool", "run", "--server", address, "--token", token, "--", sys.executable, str(example)]
        print(f"gpupool demo: running an unmodified CUDA program on it:\n  gpupool run --server {address} --token *** -- python {example.relative_to(ROOT) if example.is_relative_to(ROOT) else example}")
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        print(f"gpupool demo: the program exited with status {rc} after {time.monotonic() - t0:.1f} s")
        return rc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("gpupool demo: pool stopped")


if __name__ == "__main__":
    sys.exit(main())
