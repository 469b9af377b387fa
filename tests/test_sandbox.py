"""The worker sandbox (server/sandbox.py, Note [Worker sandbox]): each attack a kernel exploit
would try next is performed by a real sandboxed process, and the work a worker must still do
is done by the same process; real session workers run sandboxed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpupool.server import sandbox
from tests.conftest import ServerProc
from tests.test_bad_input import RawClient, worker_pid

REPORT = sandbox.probe()
needs_landlock = pytest.mark.skipif(REPORT.landlock_abi == 0, reason="this kernel has no Landlock")
needs_seccomp = pytest.mark.skipif(not REPORT.seccomp, reason="this kernel or architecture has no seccomp")

# The child: applies the worker's sandbox policy, then tries each attack and each legitimate
# act, and prints what happened as JSON.
CHILD = """
    import ctypes, json, os, socket, subprocess, sys, threading
    import torch
    from gpupool.server import sandbox, worker_sandbox
    secret, victim_pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    kept_a, kept_b = socket.socketpair()
    report = sandbox.restrict(worker_sandbox.read_only_paths(), worker_sandbox.device_paths())
    out = {"applied": list(report.applied)}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "done"
        except OSError as e:
            out[name] = "refused: " + type(e).__name__

    def ptrace():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, victim_pid, None, None) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), "ptrace")

    def io_uring():
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)
        if libc.syscall(425, 8, params) < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")

    attempt("read a secret file", lambda: open(secret).read())
    attempt("create a file", lambda: open(os.path.join(os.path.dirname(secret), "new"), "w"))
    attempt("read another process's environment", lambda: open(f"/proc/{os.getppid()}/environ").read())
    attempt("create a socket", lambda: socket.socket())
    attempt("connect out", lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
    attempt("fork", os.fork)
    attempt("start a program", lambda: subprocess.run(["/bin/true"]))
    attempt("exec a program", lambda: os.execv("/bin/true", ["true"]))
    attempt("signal another process", lambda: os.kill(victim_pid, 15))
    attempt("ptrace another process", ptrace)
    attempt("set up io_uring", io_uring)
    # What a worker still does:
    torch.set_num_threads(2)
    x = torch.randn(256, 256)
    out["matmul"] = float((x @ x.T).trace()) > 0
    t = threading.Thread(target=lambda: out.__setitem__("thread", True))
    t.start(); t.join()
    kept_a.send(b"ping"); out["socketpair"] = kept_b.recv(4) == b"ping"
    socket.send_fds(kept_a, [b"fd"], [kept_b.fileno()])
    out["send_fds"] = len(socket.recv_fds(kept_b, 16, 1)[1]) == 1
    out["own status"] = "VmData" in open("/proc/self/status").read()
    out["lazy import"] = __import__("json.tool") is not None
    out["urandom"] = len(os.urandom(8)) == 8
    os.kill(os.getpid(), 0)
    out["signal itself"] = True
    print(json.dumps(out))
"""


@needs_landlock
@needs_seccomp
def test_a_sandboxed_process_cannot_escape_but_can_compute(tmp_path: Path) -> None:
    secret = tmp_path / "controller.key.pem"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    listener = socket.create_server(("127.0.0.1", 0))
    victim = subprocess.Popen(["sleep", "120"])
    try:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", GPUPOOL_TEST_SECRET="do-not-read")
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHILD), str(secret), str(victim.pid), str(listener.getsockname()[1])],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.splitlines()[-1])
        assert {"landlock-fs", "seccomp"} <= set(out["applied"])
        attacks = [k for k, v in out.items() if isinstance(v, str) and k != "applied"]
        assert len(attacks) == 11
        for name in attacks:
            assert out[name].startswith("refused"), f"{name}: {out[name]}"
        for name in ("matmul", "thread", "socketpair", "send_fds", "own status", "lazy import", "urandom", "signal itself"):
            assert out[name] is True, name
        assert victim.poll() is None  # the signal did not reach it
        assert not (tmp_path / "new").exists()
    finally:
        victim.kill()
        victim.wait()
        listener.close()


def test_restrict_refuses_a_process_with_threads() -> None:
    code = """
        import threading, time
        from gpupool.server import sandbox
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        try:
            sandbox.restrict(["/usr"])
        except sandbox.SandboxError as e:
            print("refused:", e)
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert "refused:" in r.stdout and "threads run" in r.stdout, r.stdout + r.stderr


def test_probe_says_what_this_kernel_offers() -> None:
    if REPORT.landlock_abi == 0:
        assert any("Landlock is not available" in s for s in REPORT.missing)
    if not REPORT.seccomp:
        assert any("seccomp" in s for s in REPORT.missing)
    assert REPORT.summary().startswith("sandbox: ")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@needs_seccomp
def test_session_workers_run_sandboxed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real server's session worker: no_new_privs set and a seccomp filter installed (the
    Landlock domain is not visible in /proc; the worker logs it)."""
    monkeypatch.setenv("GPUPOOL_LOG", "INFO")
    srv = ServerProc("--cpu-gpus", "1")
    try:
        c = RawClient(srv.address)
        assert c.sync().error is None
        pid = worker_pid(srv, c.session)
        status = _status(pid)
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"  # filter mode
        assert "GPUPOOL_TOKEN" not in open(f"/proc/{pid}/environ").read()
        assert f"worker {pid}: sandbox: landlock-fs" in srv.log or REPORT.landlock_abi == 0, srv.log[-2000:]
        c.close()
    finally:
        srv.stop()


def test_gpupool_status_says_whether_workers_are_sandboxed(tmp_path: Path) -> None:
    from tests.pool_fixtures import cli, start_controller, start_server

    ctl, url = start_controller(tmp_path)
    srv, _ = start_server(tmp_path, url, "gpu-host-1")
    try:
        assert "session workers: sandboxed" in srv.log or REPORT.summary() == "sandbox: nothing"
        r = cli(tmp_path, url, "status")
        expect = " ".join(([f"landlock-{REPORT.landlock_abi}"] if REPORT.landlock_abi else [])
                          + (["seccomp"] if REPORT.seccomp else [])) or "none"
        assert f"workers sandboxed: {expect}" in r.stdout, r.stdout + r.stderr
    finally:
        srv.stop()
        ctl.stop()


def test_a_sandboxed_worker_serves_an_allowlist_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$GPUPOOL_ALLOWLIST may name a file the sandbox would not let the worker open: the worker
    reads its policy before it restricts itself, and then enforces that list."""
    import torch

    import gpupool

    listed = tmp_path / "ops.txt"
    listed.write_text("[ops]\naten::_to_copy\naten::_copy_from\naten::empty.memory_format\naten::copy_\n"
                      "aten::exp\naten::empty_strided\n")
    with monkeypatch.context() as env:  # the server's list only: the client checks against its own
        env.setenv("GPUPOOL_ALLOWLIST", str(listed))
        srv = ServerProc("--cpu-gpus", "1")
    try:
        s = gpupool.connect(srv.address, token=srv.token)
        x = torch.randn(4)
        torch.testing.assert_close(x.to(s.device).exp().cpu(), x.exp())
        with pytest.raises(gpupool.RemoteOpError, match=r"aten::neg is not on the server.s op allowlist \(ops.txt\)"):
            (-x.to(s.device)).cpu()
        s.close()
    finally:
        srv.stop()


def test_a_server_whose_allowlist_cannot_load_refuses_to_start(tmp_path: Path) -> None:
    """Rather than listen and fail every session: the error names the file and the line."""
    bad = tmp_path / "ops.txt"
    bad.write_text("[ops]\nnot an op\n")
    out = subprocess.run(
        [sys.executable, "-m", "gpupool", "server", "--listen", "127.0.0.1:0", "--token", "t", "--cpu-gpus", "1"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, GPUPOOL_ALLOWLIST=str(bad)),
    )
    assert out.returncode != 0
    assert f"gpupool server: {bad}:2: 'not an op' is not a canonical op name" in out.stderr, out.stderr
    assert "listening" not in out.stdout
