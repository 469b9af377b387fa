"""`python -m bench.tls [--reps N] [--gib G]`: the data plane over TLS against plain TCP.

Starts two CPU-backed gpupool servers on loopback, one plain and one with a certificate from a
throw-away CA, and one client process with a session on each. Every row alternates the two
(ABBA, to cancel drift) and reports both medians and TLS / plain. Rows: `h2d` and `d2h` of
G GiB (GB/s, higher is better), `sync_rtt` (µs per `.item()` round trip) and `op_stream` (µs
per small op, 2,000 adds then one sync). Writes bench/results/tls.json.

Over TLS each session's bytes pass through the listener's relay (Note [TLS relay] in
server/relay.py), so the cost measured is the encryption and that extra hop together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

CLIENT = r"""
import json, statistics, sys, time
import torch, gpupool

plain_addr, tls_addr, token, reps, nbytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sessions = {"plain": gpupool.connect(plain_addr, token=token, tls=False),
            "tls": gpupool.connect(tls_addr, token=token, tls=True)}
host = torch.ones(nbytes, dtype=torch.uint8)

def h2d(s):
    t = time.perf_counter(); x = host.to(s.device); s.synchronize()
    dt = time.perf_counter() - t; del x; s.synchronize()
    return nbytes / dt / 1e9

dev = {k: torch.ones(nbytes, dtype=torch.uint8, device=s.device) for k, s in sessions.items()}
def d2h(s, k):
    t = time.perf_counter(); dev[k].cpu(); return nbytes / (time.perf_counter() - t) / 1e9

scal = {k: torch.ones((), device=s.device) * 2 for k, s in sessions.items()}
def rtt(s, k):
    times = []
    for _ in range(300):
        t = time.perf_counter(); scal[k].item(); times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6

small = {k: torch.ones(16, device=s.device) for k, s in sessions.items()}
def ops(s, k):
    x = small[k]; s.synchronize()
    t = time.perf_counter()
    for _ in range(2000):
        x = x + 1
    s.synchronize()
    return (time.perf_counter() - t) / 2000 * 1e6

rows = {"h2d": lambda k: h2d(sessions[k]), "d2h": lambda k: d2h(sessions[k], k),
        "sync_rtt": lambda k: rtt(sessions[k], k), "op_stream": lambda k: ops(sessions[k], k)}
out = {}
for name, fn in rows.items():
    fn("plain"); fn("tls")  # warm up both
    got = {"plain": [], "tls": []}
    for r in range(reps):
        order = ("plain", "tls") if r % 2 == 0 else ("tls", "plain")
        for k in order:
            got[k].append(fn(k))
    out[name] = got
print(json.dumps(out), flush=True)
"""

HIGHER_IS_BETTER = {"h2d": True, "d2h": True, "sync_rtt": False, "op_stream": False}
UNITS = {"h2d": "GB/s", "d2h": "GB/s", "sync_rtt": "µs", "op_stream": "µs/op"}


def _server(argv: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    f = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gpupool.server", "--listen", "127.0.0.1:0", "--cpu-gpus", "1",
                             "--cpu-gpu-memory", "8GiB", *argv], stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        if "listening on" in line:
            return proc, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError("server did not start")


def main() -> None:
    from gpupool import pki

    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--gib", type=float, default=1.0, help="bytes of the bulk rows, in GiB")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gpupool-bench-tls-"))
    ca = pki.load_or_make_ca(tmp)
    pki.write_leaf(ca, ["127.0.0.1"], tmp / "server.pem", tmp / "server-key.pem")
    token = secrets.token_hex(12)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", GPUPOOL_CA=str(tmp / "ca.pem"), OMP_NUM_THREADS="1")
    procs = []
    try:
        plain, plain_addr = _server(["--token", token], env, tmp / "plain.log")
        procs.append(plain)
        tls, tls_addr = _server(["--token", token, "--tls-cert", str(tmp / "server.pem"),
                                 "--tls-key", str(tmp / "server-key.pem")], env, tmp / "tls.log")
        procs.append(tls)
        nbytes = int(a.gib * (1 << 30))
        out = subprocess.run([sys.executable, "-c", CLIENT, plain_addr, tls_addr, token, str(a.reps), str(nbytes)],
                             capture_output=True, text=True, env=env, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"bench client failed:\n{out.stderr[-3000:]}")
        got: dict[str, dict[str, list[float]]] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    rows: list[dict[str, Any]] = []
    print(f"{'row':<10} {'plain':>10} {'tls':>10}  tls/plain   (median of {a.reps}, {a.gib:g} GiB bulk)")
    for name, sides in got.items():
        pm, tm = statistics.median(sides["plain"]), statistics.median(sides["tls"])
        ratio = tm / pm
        rows.append({"row": name, "unit": UNITS[name], "plain": pm, "tls": tm, "ratio": ratio,
                     "higher_is_better": HIGHER_IS_BETTER[name], "plain_all": sides["plain"], "tls_all": sides["tls"]})
        print(f"{name:<10} {pm:>10.3f} {tm:>10.3f}  {ratio:>8.2f}x   {UNITS[name]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpus": os.cpu_count(),
            "bytes": nbytes, "reps": a.reps}
    (RESULTS / "tls.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
