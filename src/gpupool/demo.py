"""`make demo`: start a pool on this machine (`gpupool up`), run an unmodified CUDA example on
half of its GPU (`gpupool run -n 1 -p 0.5`), print the results, stop the pool."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mlp_train.py"


def start_pool(env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpupool", "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        print(f"  [pool] {line.rstrip()}", flush=True)
        if "listening on" in line:
            return proc
    proc.kill()
    raise SystemExit("gpupool demo: the pool did not start")


def main() -> int:
    example = Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE
    with tempfile.TemporaryDirectory(prefix="gpupool-demo-") as tmp:
        env = dict(os.environ, GPUPOOL_HOME=tmp, PYTHONUNBUFFERED="1")
        print("gpupool demo: starting a pool on this machine (gpupool up) ...", flush=True)
        pool = start_pool(env)
        try:
            shown = example.relative_to(ROOT) if example.is_relative_to(ROOT) else example
            print(f"gpupool demo: running an unmodified CUDA program on half a GPU:\n"
                  f"  gpupool run -n 1 -p 0.5 -- python {shown}", flush=True)
            t0 = time.monotonic()
            rc = subprocess.call(
                [sys.executable, "-m", "gpupool", "run", "-n", "1", "-p", "0.5", "--wait", "60", "--",
                 sys.executable, str(example)],
                env=env,
            )
            print(f"gpupool demo: the program exited with status {rc} after {time.monotonic() - t0:.1f} s", flush=True)
            subprocess.call([sys.executable, "-m", "gpupool", "list"], env=env)
            return rc
        finally:
            pool.terminate()
            try:
                pool.wait(20)
            except subprocess.TimeoutExpired:
                pool.kill()
            print("gpupool demo: pool stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
