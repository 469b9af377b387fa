"""`python -m bench.run [--quick] [--gpu] [--only NAME...] [--reps N] [--tiny]`: run the suite.

Starts a gpupool server (CPU-backed here, the machine's GPU with `--gpu`), the plain-socket
baseline server and two worker processes — `remote` (gpupool client) and `local` (native eager
and socket client) — all on loopback. For each benchmark both sides are prepared, then
repetitions alternate between them (ABBA order, to cancel drift), and the row reports both
medians and their ratio. Writes bench/results/{latest,quick,gpu-latest}.json and the table in
docs/benchmarks.md (see Note [Generated sections] in report.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, LineProc, ServerProc, Worker, WorkerError, child_env, median
from bench.report import met_text, table, update_markdown, write_json
from bench.specs import Spec, select

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DEFAULT_REPS = {"cpu": 7, "quick": 3, "gpu": 5}


class Fleet:
    """The processes of one run; workers that die are restarted for the next benchmark."""

    def __init__(self, mode: str, server: str | None, token: str | None, logs: Path, threads: int) -> None:
        self.mode = mode
        self.logs = logs
        # Note [Threads]: on a small CPU-only machine the gpupool client, the server's worker and
        # the native baseline share the cores. Each side computes on `threads` threads (the
        # server's worker inherits this environment), leaving the client a core of its own as it
        # would have on a real deployment; idle OpenMP teams sleep instead of spinning, so the
        # side that just finished does not steal cycles from the one measured next.
        extra: dict[str, str] = {}
        if threads > 0:
            extra.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.env = child_env(extra)
        self.procs: list[LineProc] = []
        self.sockbase = LineProc([sys.executable, "-m", "bench.sockbase"], self.env, logs / "sockbase.log", stdin=False)
        self.procs.append(self.sockbase)
        line = self.sockbase.readline(60)
        self.sock_address = line.rsplit(" ", 1)[1].strip()
        self.server: ServerProc | None = None
        if server is None:
            self.token = secrets.token_hex(12)
            self.server = ServerProc(self.token, self.env, logs / "server.log", cpu=mode != "gpu")
            self.procs.append(self.server)
            self.address = self.server.address
        else:
            self.address, self.token = server, token or os.environ.get("GPUPOOL_TOKEN", "")
        self.remote: Worker | None = None
        self.local: Worker | None = None
        self.remote_env: dict[str, str] = {}  # see ensure()
        self.restarts = 0
        self.ensure()
        assert self.remote is not None
        kind = self.remote.hello.get("device_kind")
        if mode == "gpu" and kind != "cuda":
            self.close()
            raise SystemExit(
                f"bench --gpu: the gpupool server at {self.address} offers a {kind} device, not a "
                "CUDA GPU; the comparison with native CUDA would be meaningless"
            )

    def _spawn(self, side: str) -> Worker:
        env = self.env
        if side == "remote":
            args = ["--server", self.address, "--token", self.token]
            env = dict(env, **self.remote_env)
        else:
            args = ["--device", "cuda" if self.mode == "gpu" else "cpu", "--sockbase", self.sock_address]
        w = Worker(side, args, env, self.logs / f"{side}-{self.restarts}.log")
        self.procs.append(w)
        return w

    def ensure(self, remote_env: dict[str, str] | None = None) -> None:
        """Both workers up and ready (started together: each imports torch).

        `remote_env`: extra environment the gpupool client must run with (a Spec's `env`); a
        remote worker started with another one is replaced. None keeps the current one.
        """
        if remote_env is not None and remote_env != self.remote_env:
            if self.remote is not None:
                self.remote.stop(grace=5)
                self.restarts += 1
            self.remote, self.remote_env = None, dict(remote_env)
        fresh = []
        if self.remote is None or not self.remote.alive():
            self.remote = self._spawn("remote")
            fresh.append(self.remote)
        if self.local is None or not self.local.alive():
            self.local = self._spawn("local")
            fresh.append(self.local)
        for w in fresh:
            w.wait_ready()

    def restart(self, w: Worker) -> None:
        w.stop(grace=2)
        self.restarts += 1
        if w is self.remote:
            self.remote = None
        if w is self.local:
            self.local = None
        self.ensure()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(grace=5)

    def server_cpu(self) -> float | None:
        """CPU seconds used so far by the server's session worker (None if not ours or unknown).

        The session worker is the server's oldest live child: the listener starts a spare after
        each hand-off, and a worker exits with its session.
        """
        if self.server is None:
            return None
        try:
            kids = [int(x) for x in Path(f"/proc/{self.server.proc.pid}/task/{self.server.proc.pid}/children").read_text().split()]
            stats = [Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split() for k in kids]
        except (OSError, ValueError):
            return None
        if not stats:
            return None
        oldest = min(stats, key=lambda f: int(f[19]))
        return (int(oldest[11]) + int(oldest[12])) / os.sysconf("SC_CLK_TCK")


def _row(spec: Spec, mode: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "unit": spec.unit,
        "value": None,
        "baseline": None,
        "ratio": None,
        "target": spec.target_for(mode),
        "better": spec.better,
        "met": None,
        "note": spec.note,
        "samples": {"value": [], "baseline": []},
        "cpu": None,
    }


def run_spec(fleet: Fleet, spec: Spec, mode: str, reps: int, tiny: bool, deadline: float = float("inf")) -> dict[str, Any]:
    row = _row(spec, mode)
    if spec.family is None:
        row["error"] = spec.note
        row["skipped"] = True
        return row
    if time.monotonic() > deadline - 20:
        row["error"] = row["note"] = "skipped: the run's time budget is spent"
        row["skipped"] = True
        return row

    def limit() -> float:
        """One call's timeout: the spec's, but never past the run's budget."""
        return max(20.0, min(spec.timeout, deadline - time.monotonic()))
    cfg = spec.config(mode, tiny)
    notes: list[str] = []
    fleet.ensure(spec.env)
    assert fleet.remote is not None and fleet.local is not None
    remote, local = fleet.remote, fleet.local
    try:
        try:
            info_r = remote.call(limit(), op="setup", family=spec.family, cfg=cfg)["info"]
        except WorkerError as e:
            if not cfg.get("amp") or e.skip:
                raise
            # Autocast is a client feature that may be missing: compare fp32 with fp32 rather
            # than report nothing, and say so.
            notes.append(f"{cfg['amp']} autocast failed on gpupool ({e}); both sides ran fp32")
            cfg = dict(cfg, amp=None)
            info_r = remote.call(limit(), op="setup", family=spec.family, cfg=cfg)["info"]
        info_l = local.call(limit(), op="setup", family=spec.family, cfg=cfg)["info"]
        cpu: dict[str, list[float]] = {"gpupool_client": [], "gpupool_server": [], "baseline": []}
        for i in range(reps * (1 if tiny else spec.rep_scale)):
            order = (remote, local) if i % 4 in (0, 3) else (local, remote)
            for w in order:
                s0 = fleet.server_cpu() if w is remote else None
                reply = w.call(limit(), op="run")
                s1 = fleet.server_cpu() if w is remote else None
                row["samples"]["value" if w is remote else "baseline"].append(float(reply["value"]))
                if w is remote and reply.get("info"):
                    info_r.update(reply["info"])  # what the runs learned (ops replayed)
                if reply.get("cpu") is not None:
                    cpu["gpupool_client" if w is remote else "baseline"].append(reply["cpu"])
                    if s0 is not None and s1 is not None:
                        cpu["gpupool_server"].append((s1 - s0) * reply["cpu_scale"])
        if any(cpu.values()):
            row["cpu"] = {k: median(v) for k, v in cpu.items()}
        for w in (remote, local):
            w.call(limit(), op="teardown")
    except WorkerError as e:
        row["error"] = str(e)
        row["skipped"] = e.skip
        row["note"] = "; ".join([*notes, str(e)])
        for w in (remote, local):
            try:
                w.call(60, op="teardown")
            except (WorkerError, EOFError, TimeoutError):
                fleet.restart(w)
        return row
    except (EOFError, TimeoutError) as e:
        row["error"] = str(e)
        row["note"] = "; ".join([*notes, f"a worker failed: {e}"])
        for w in (remote, local):
            fleet.restart(w)
        return row
    v, b = median(row["samples"]["value"]), median(row["samples"]["baseline"])
    row["value"], row["baseline"] = v, b
    if v is not None and b:
        row["ratio"] = v / b
        t = row["target"]
        if t is not None:
            row["met"] = row["ratio"] <= t if spec.better == "lower" else row["ratio"] >= t
    facts = _facts(info_r, info_l, row["cpu"], spec.unit)
    row["note"] = "; ".join(x for x in [*notes, facts, spec.note] if x)
    row["info"] = {"gpupool": info_r, "baseline": info_l}
    return row


def _facts(info_r: dict[str, Any], info_l: dict[str, Any], cpu: dict[str, Any] | None, unit: str) -> str:
    out = []
    if cpu and cpu.get("baseline"):
        c, s, b = cpu.get("gpupool_client"), cpu.get("gpupool_server"), cpu["baseline"]
        server = f" + server {s:.3g}" if s is not None else ""
        out.append(f"CPU time {unit}: gpupool client {c:.3g}{server}, native {b:.3g}")
        n_ops = info_r.get("ops_per_step")
        if c is not None and n_ops and unit == "ms/step":
            out.append(f"client {c * 1e3 / n_ops:.3g} µs/op ({n_ops} aten ops/step on gpupool)")
        if "replayed_ops_per_step" in info_r:
            out.append(f"{info_r['replayed_ops_per_step']} server ops/step replayed")
    if "params" in info_r:
        n = info_r["params"]
        out.append(f"{n / 1e6:.1f}M params" if n >= 1e6 else f"{n / 1e3:.1f}k params")
    if "out_dtype" in info_r and info_r.get("out_dtype") != info_l.get("out_dtype"):
        out.append(f"output dtype {info_r['out_dtype']} on gpupool vs {info_l.get('out_dtype')} native")
    return ", ".join(out)


def machine_info(mode: str, reps: int, fleet: Fleet | None) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    try:
        import gpupool

        gp_version = gpupool.__version__
        gp_path = str(Path(gpupool.__file__).resolve().parent)
    except ImportError:
        gp_version, gp_path = "?", None
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "gpupool": gp_version,
        "gpupool_path": gp_path,
        "git": git or None,
        "mode": mode,
        "reps": reps,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
    }
    if fleet is not None and fleet.remote is not None and fleet.local is not None:
        r, loc = fleet.remote.hello, fleet.local.hello
        info["torch"] = loc.get("torch")
        info["server_torch"] = r.get("server_torch")
        info["torch_threads"] = loc.get("threads")
        info["remote_device"] = f"{r.get('device')} = {r.get('device_kind')} '{r.get('device_name')}' (server on loopback)"
        info["local_device"] = f"{loc.get('device')}: {loc.get('device_name')}, {loc.get('threads')} threads"
    return info


def _check_environment(gpu: bool) -> None:
    """Fail fast, with the fix, when the machine cannot run the suite."""
    missing = []
    for mod in ("torch", "msgspec", "numpy"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise SystemExit(
            f"bench: {', '.join(missing)} not importable by {sys.executable}. gpupool needs torch, "
            "msgspec and numpy (host buffers); on a host without a package index, carry their "
            "wheels and `pip install` them, or put them on PYTHONPATH."
        )
    if gpu:
        import torch

        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA (a CPU-only build)"
            raise SystemExit(
                f"bench --gpu: CUDA is not available here (torch {torch.__version__}, built with "
                f"{built}). Run it on a host with an NVIDIA GPU, or `make bench` for the "
                "CPU-backed suite."
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (< 2 min)")
    p.add_argument("--gpu", action="store_true", help="against native CUDA eager, GPU rows added")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these benchmarks only")
    p.add_argument("--reps", type=int, help="repetitions per side (default: 7, quick 3, gpu 5)")
    p.add_argument("--tiny", action="store_true", help="each benchmark once at a tiny size (the test)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/{latest,quick,gpu-latest}.json)")
    p.add_argument("--md", type=Path, help="Markdown to update (default docs/benchmarks.md; none for --quick, --tiny)")
    p.add_argument("--no-md", action="store_true", help="do not update any Markdown file")
    p.add_argument(
        "--threads", type=int,
        help="torch threads per side (default 1 on the CPU suite, see Note [Threads]; 0: torch's default)",
    )
    p.add_argument("--budget", type=float, help="seconds for the whole run; later rows are skipped (default: 450 with --gpu)")
    p.add_argument("--server", help="use this running gpupool server (HOST:PORT) instead of starting one")
    p.add_argument("--token", help="its token (default $GPUPOOL_TOKEN)")
    a = p.parse_args(argv)
    if a.quick and a.gpu:
        p.error("--quick and --gpu do not combine")
    mode = "gpu" if a.gpu else "quick" if a.quick else "cpu"
    if a.budget is None and mode == "gpu":
        a.budget = 450.0
    _check_environment(a.gpu)
    specs = select(mode, a.only)
    reps = a.reps or (1 if a.tiny else DEFAULT_REPS[mode])
    threads = a.threads if a.threads is not None else (0 if mode == "gpu" else 1)
    out = a.out or RESULTS / ("tiny.json" if a.tiny else {"cpu": "latest.json", "quick": "quick.json", "gpu": "gpu-latest.json"}[mode])
    md = None if a.no_md else a.md or (DOC if mode != "quick" and not a.tiny else None)
    started = time.monotonic()
    # `make bench-gpu` must finish in 8 minutes: rows not started in time are marked skipped.
    deadline = started + (a.budget if a.budget else float("inf"))
    load0 = _loadavg()
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-") as tmp:
        fleet = Fleet(mode, a.server, a.token, Path(tmp), threads)
        try:
            machine = machine_info(mode, reps, fleet)
            machine["threads"] = threads or "torch default"
            print(f"bench ({mode}): gpupool {machine.get('remote_device')} vs {machine.get('local_device')}; {reps} reps", flush=True)
            rows = []
            for spec in specs:
                t0 = time.monotonic()
                row = run_spec(fleet, spec, mode, reps, a.tiny, deadline)
                rows.append(row)
                _progress(row, time.monotonic() - t0)
        finally:
            fleet.close()
    machine["loadavg_start"], machine["loadavg_end"] = load0, _loadavg()
    machine["seconds"] = round(time.monotonic() - started, 1)
    result = {"machine": machine, "mode": mode, "tiny": a.tiny, "benchmarks": rows}
    write_json(out, result)
    print(f"\n{table(result)}\n\nwrote {_rel(out)}" + (f" and {_rel(md)}" if md else "") + f" in {machine['seconds']} s")
    if md is not None:
        update_markdown(md, result)
    return 0


def _progress(row: dict[str, Any], seconds: float) -> None:
    if row.get("error"):
        print(f"  {row['name']:<22} {'skipped' if row.get('skipped') else 'ERROR'}: {row['note']}", flush=True)
        return
    print(
        f"  {row['name']:<22} gpupool {row['value']:.4g} {row['unit']}, baseline {row['baseline']:.4g}: "
        f"ratio {row['ratio']:.3g} ({met_text(row)}) [{seconds:.0f} s]",
        flush=True,
    )


def _loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    sys.exit(main())
