"""Where the time of a gpupool op goes: `python -m bench.profile [op_add_small] [mlp_adam_step]`.

The client (this process) runs the workload under cProfile — also on the autograd device thread,
where backward ops are dispatched — and its self time is summed into categories (dispatch entry,
meta plan, wrappers, encoding, socket, sync wait, torch's own Python). The server's session worker
is sampled with py-spy at the same time, when py-spy is installed (`pip install py-spy`), and its
busy samples are split the same way (decode, resolve, the aten op itself, bookkeeping).
The numbers are per op (or per step) and come from one run: read them as proportions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ServerProc, child_env

#: (category, predicate on "path:function") for the client, first match wins.
WAIT_BACKWARD = "main thread waits for backward (the device thread's work is counted)"
CLIENT_RULES: list[tuple[str, Callable[[str, str], bool]]] = [
    (WAIT_BACKWARD, lambda f, n: n == "run_backward"),
    ("sync wait (server behind)", lambda f, n: n in ("recv_into", "_recv_exact_into", "read_message")),
    ("socket send + flush", lambda f, n: n in ("sendall", "send", "_flush_locked", "flush") and ("framing" in f or "connection" in f or f == "~")),
    ("meta inference (cache miss)", lambda f, n: "client/meta" in f and n in ("_infer", "to_meta", "layout_of", "flat_tensors", "structure_of")),
    ("meta plan (cache key + hit)", lambda f, n: "client/meta" in f),
    ("output wrappers (alloc/free)", lambda f, n: "client/tensor" in f and n != "__torch_dispatch__" or n in ("wrap", "_make_wrapper_subclass", "_set_layout")),
    ("encode + queue command", lambda f, n: "connection" in f or "session.py" in f and n == "enc_hook" or n == "encode"),
    ("dispatch entry + routing", lambda f, n: "gpupool/client" in f or "torch/_ops" in f or "torch/_library" in f),
    ("torch Python (autograd, optim, nn)", lambda f, n: "torch/" in f),
]

#: The same for the server's py-spy samples, matched against the innermost frames first.
#: py-spy names methods "Class.method"; only the method name is matched.
SERVER_RULES: list[tuple[str, Callable[[str, str], bool]]] = [
    ("receive (socket)", lambda f, n: "framing" in f and n in ("_recv_exact_into", "read_message", "read_buffer_into")),
    ("reply (encode + send)", lambda f, n: "framing" in f),
    ("decode batch (msgspec, ext hook, GC it triggers)", lambda f, n: "torchcodec" in f or n == "serve" and "executor" in f),
    ("aten op execution", lambda f, n: "torch/" in f),
    ("resolve args + op lookup", lambda f, n: n in ("_resolve", "_get", "_lookup_op", "<listcomp>", "<dictcomp>")),
    ("store / free / memory ledger", lambda f, n: n in ("_store", "_free", "memory_used", "memory_peak") or "memory.py" in f),
    ("replies (item, sync, fetch)", lambda f, n: n in ("item", "synced", "fetch", "_take_error")),
    ("command loop (handle, run_op, flatten)", lambda f, n: "executor" in f),
]


def _categorize(path: str, func: str, rules: list[tuple[str, Callable[[str, str], bool]]]) -> str | None:
    path = path.replace(os.sep, "/")
    for cat, pred in rules:
        if pred(path, func):
            return cat
    return None


# ---- workloads ---------------------------------------------------------------------------------


def workload(name: str, device: Any) -> tuple[Callable[[], None], int, str]:
    """(one unit of work, how many ops or steps it holds, the unit's name)."""
    import torch

    if name == "op_add_small":
        a, b = torch.randn(16).to(device), torch.randn(16).to(device)

        def adds() -> None:
            for _ in range(1000):
                c = a + b  # noqa: F841
        return adds, 1000, "op"
    from bench.specs import BY_NAME

    spec = BY_NAME.get(name)
    if spec is not None and spec.family == "train":
        from bench.side import Side
        from bench.training import make_step

        step, _ = make_step(Side("remote", device, lambda: None), spec.cfg)
        n = 20 if spec.cfg["model"] == "mlp" else 2

        def steps() -> None:
            for _ in range(n):
                step()
        return steps, n, "step"
    if name == "sync_rtt":
        x = torch.ones((), device=device) * 2

        def items() -> None:
            for _ in range(200):
                x.item()
        return items, 200, "round trip"
    raise SystemExit(f"no profile workload {name!r}: op_add_small, sync_rtt or a training benchmark")


# ---- client: cProfile on the main thread and on the autograd device thread ---------------------


class ThreadProfiles:
    """cProfile profiles one thread; backward runs on the device's autograd thread: profile it too."""

    def __init__(self) -> None:
        self.main = cProfile.Profile()
        self.others: dict[int, cProfile.Profile] = {}
        self.active = False

    def hook(self, grad: Any) -> Any:
        tid = threading.get_ident()
        if tid != threading.main_thread().ident:
            p = self.others.get(tid)
            if p is None and self.active:
                p = self.others[tid] = cProfile.Profile()
                p.enable()
            elif p is not None and not self.active:
                p.disable()
        return grad

    def stats(self) -> pstats.Stats:
        st = pstats.Stats(self.main)
        for p in self.others.values():
            st.add(p)
        return st


def client_breakdown(st: pstats.Stats, units: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Self time per category and the top functions, in microseconds per unit.

    Builtins (C functions such as dict.get or msgspec's encode) are charged to their callers'
    categories in proportion to the time spent under each caller.
    """
    cats: dict[str, float] = defaultdict(float)
    top = []
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    for (path, _line, func), (_cc, nc, tt, _ct, callers) in raw.items():
        label = f"{Path(path).name}:{func}" if path != "~" else func
        top.append((label, tt / units * 1e6, nc))
        cat = _categorize(path, _short(func), CLIENT_RULES)
        if cat is None and path == "~" and callers:
            total = sum(v[2] for v in callers.values()) or 1.0
            for (cpath, _cl, cfunc), v in callers.items():
                c2 = _categorize(cpath, cfunc, CLIENT_RULES) or "other"
                cats[c2] += tt * v[2] / total
            continue
        cats[cat or "other"] += tt
    top.sort(key=lambda x: -x[1])
    return {k: v / units * 1e6 for k, v in cats.items()}, top


def _short(func: str) -> str:
    # builtins look like "<method 'sendall' of '_socket.socket' objects>"
    if func.startswith("<method '") or func.startswith("<built-in method "):
        return func.split("'")[1] if "'" in func else func.split()[-1].rstrip(">")
    return func


# ---- server: py-spy on the session's worker ----------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def session_worker(server_pid: int) -> int | None:
    """The oldest worker child of the server: the spare started after it waits idle."""
    kids = _children(server_pid)
    return min(kids, key=_start_time) if kids else None


def server_breakdown(raw_file: Path, units: int, rate: int) -> tuple[dict[str, float], float]:
    """Busy time per category (µs per unit) and the busy seconds sampled."""
    cats: dict[str, float] = defaultdict(float)
    busy = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        busy += n
        frames = stack.split(";")
        cat = None
        for fr in reversed(frames):  # innermost first
            func, _, loc = fr.partition(" (")
            cat = _categorize(loc, func.strip().rsplit(".", 1)[-1], SERVER_RULES)
            if cat is not None:
                break
        cats[cat or "other (interpreter, gc)"] += n
    per = 1e6 / rate / units
    return {k: v * per for k, v in cats.items()}, busy / rate


# ---- the report --------------------------------------------------------------------------------


def profile_one(name: str, session: Any, server: ServerProc, spy: str | None, out_dir: Path, top_n: int) -> str:
    from gpupool.client import meta

    fn, per, unit = workload(name, session.device)
    for _ in range(3):
        fn()
    session.synchronize()
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    session.synchronize()
    wall = (time.perf_counter() - t0) / (reps * per) * 1e6
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        session.synchronize()
        wall_nogc = (time.perf_counter() - t0) / (reps * per) * 1e6
    finally:
        gc.enable()
    stats0 = meta.cache_stats()

    # Server sampling runs while the client is profiled, over the same window.
    spy_proc = None
    raw = out_dir / f"{name}-server.txt"
    worker = session_worker(server.proc.pid)
    rate = 1000
    if spy and worker:
        spy_proc = subprocess.Popen(
            [spy, "record", "--pid", str(worker), "--rate", str(rate), "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=open(out_dir / "py-spy.log", "w"),  # noqa: SIM115
        )
        time.sleep(1.0)  # py-spy attaches
    tp = ThreadProfiles()
    hooks: list[Any] = []
    tp.active = True
    _install_grad_hooks(tp, hooks)
    tp.main.enable()
    t1 = time.perf_counter()
    for _ in range(reps):
        fn()
    session.synchronize()
    prof_wall = time.perf_counter() - t1
    tp.main.disable()
    tp.active = False
    _flush_thread_profiles(fn, session)
    for h in hooks:
        h.remove()
    units = reps * per
    cats, top = client_breakdown(tp.stats(), units)
    stats1 = meta.cache_stats()
    lines = [
        f"## {name}: {wall:.1f} µs per {unit} unprofiled (client wall time, ends with a sync)",
        "",
        f"with the client's garbage collector off: {wall_nogc:.1f} µs per {unit} (what GC costs the client)",
        f"meta plan cache: {stats1['hits'] - stats0['hits']} hits, {stats1['misses'] - stats0['misses']} misses in the profiled window",
        f"client under cProfile: {prof_wall / units * 1e6:.1f} µs per {unit} (profiler overhead included; shares are what count)",
        "",
        f"| client category (self time) | µs per {unit} | share |",
        "|---|---:|---:|",
    ]
    waited = cats.pop(WAIT_BACKWARD, 0.0)
    total = sum(cats.values()) or 1.0
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.1f} | {v / total:.0%} |")
    if waited:
        lines.append(f"| ({WAIT_BACKWARD}) | {waited:.1f} | — |")
    lines += ["", f"Top client functions by self time (µs per {unit}, calls in the window):", "", "```"]
    lines += [f"{t:8.2f}  {n:>8}  {label}" for label, t, n in top[:top_n]]
    lines.append("```")
    if spy_proc is not None:
        spy_proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C, not on SIGTERM
        try:
            spy_proc.wait(20)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
        if raw.exists():
            scats, busy = server_breakdown(raw, units, rate)
            lines += [
                "",
                f"Server session worker (py-spy, {rate} Hz, busy samples only, window {prof_wall:.1f} s + attach): "
                f"{busy:.2f} s busy",
                "",
                f"| server category | µs per {unit} | share |",
                "|---|---:|---:|",
            ]
            stotal = sum(scats.values()) or 1.0
            for k, v in sorted(scats.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {k} | {v:.1f} | {v / stotal:.0%} |")
        else:
            log = (out_dir / "py-spy.log").read_text()[-500:]
            lines += ["", f"py-spy produced no samples: {log}"]
    elif not spy:
        lines += ["", "Server side not sampled: py-spy is not installed (`pip install py-spy`)."]
    return "\n".join(lines)


def _install_grad_hooks(tp: ThreadProfiles, hooks: list[Any]) -> None:
    """Hook `torch.Tensor.backward` so each graph's root carries a hook run on the device thread."""
    import torch

    original = torch.Tensor.backward

    def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.requires_grad:
            self.register_hook(tp.hook)
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]

    class Undo:
        def remove(self) -> None:
            torch.Tensor.backward = original  # type: ignore[method-assign]

    hooks.append(Undo())


def _flush_thread_profiles(fn: Callable[[], None], session: Any) -> None:
    """One more unit so the device thread's hook sees `active = False` and stops its profile."""
    fn()
    session.synchronize()


def server_decode_cost(n_ops: int = 512, rounds: int = 100) -> str:
    """The server's decoder on a batch of `a + b` ops, with and without its garbage collector."""
    try:
        import msgspec
        import torch

        from gpupool.protocol import messages as m
        from gpupool.server.executor import Executor

        ex = Executor(torch.device("cpu"), 1 << 30)
        ref = lambda h: msgspec.msgpack.Ext(m.ExtCode.TENSOR, m.HANDLE.pack(h))  # noqa: E731
        cmds = [msgspec.Raw(m.plain_encoder.encode(m.Op(i, "aten::add.Tensor", [ref(1), ref(2)], {}, [100 + i]))) for i in range(n_ops)]
        raw = m.plain_encoder.encode(m.Batch(cmds))  # type: ignore[arg-type]
        out = []
        for label, off in (("GC on", False), ("GC off", True)):
            gc.collect()
            if off:
                gc.disable()
            try:
                t0 = time.perf_counter()
                for _ in range(rounds):
                    ex.decoder.decode(raw)
                out.append(f"{label} {(time.perf_counter() - t0) / rounds / n_ops * 1e6:.2f} µs")
            finally:
                gc.enable()
        return (
            f"Server decode alone (Executor.decoder, in this process, a batch of {n_ops} `add` ops, "
            f"{len(raw) / n_ops:.0f} bytes each): " + ", ".join(out) + " per op."
        )
    except Exception as e:  # noqa: BLE001 - the server's internals may change; this is a probe
        return f"Server decode probe unavailable: {type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=["op_add_small", "mlp_adam_step"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (see bench.run)")
    p.add_argument("--raw", type=Path, help="keep py-spy's raw stacks and logs in this folder")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    env = child_env({"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(a.threads)})
    spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy") if (Path(sys.executable).parent / "py-spy").exists() else None)
    import torch

    torch.set_num_threads(a.threads)
    import gpupool

    with tempfile.TemporaryDirectory(prefix="gpupool-profile-") as tmp:
        server = ServerProc("profile", env, Path(tmp) / "server.log", cpu=True)
        session = gpupool.connect(server.address, token="profile")
        try:
            keep = a.raw or Path(tmp)
            keep.mkdir(parents=True, exist_ok=True)
            parts = [profile_one(n, session, server, spy, keep, a.top) for n in a.names]
        finally:
            session.close()
            server.stop()
    parts.append(server_decode_cost())
    text = "\n\n".join(parts)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
