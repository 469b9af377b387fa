"""The pool end to end: a real controller, real GPU servers and the real CLI, in processes."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from gpupool.launcher import command_env
from tests.pool_fixtures import (
    ADMIN,
    Proc,
    base_env,
    cli,
    run_bg,
    start_controller,
    start_server,
    wait_file,
    wait_until,
)

# A client that takes its GPU, says so, then computes until told to stop (or until it fails).
HOLDER = textwrap.dedent(
    """
    import os, sys, time, torch
    d = sys.argv[1] if len(sys.argv) > 1 else os.environ["HOLD_DIR"]
    x = torch.ones(1024, 1024, device="cuda")
    assert x.sum().item() == 1024 * 1024
    open(os.path.join(d, "ready"), "w").write(str(x.device))
    try:
        while not os.path.exists(os.path.join(d, "go")):
            assert (x * 2).sum().item() == 2 * 1024 * 1024
            time.sleep(0.2)
    except Exception as e:
        open(os.path.join(d, "error"), "w").write(type(e).__name__ + ": " + str(e))
        raise SystemExit(7)
    print("holder done", flush=True)
    """
)


def _gpus(home: Path, url: str) -> list[dict]:
    r = cli(home, url, "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["gpus"]


def _holder(home: Path, url: str, name: str, *args: str) -> tuple:
    d = home / name
    d.mkdir()
    script = HOLDER.replace('os.environ["HOLD_DIR"]', repr(str(d)))
    return run_bg(home, url, *args, script=script), d


@pytest.fixture()
def pool(tmp_path: Path):
    ctl, url = start_controller(tmp_path)
    srv, addr = start_server(tmp_path, url, "gpu-host-1")
    yield tmp_path, url, ctl, srv, addr
    srv.stop()
    ctl.stop()


def test_two_halves_share_a_gpu_third_refused_at_once(pool) -> None:
    home, url, _, _, _ = pool
    a, da = _holder(home, url, "a", "-n", "1", "-p", "0.5")
    b, db = _holder(home, url, "b", "-n", "1", "-p", "0.5")
    assert wait_file(da / "ready", proc=a) == "gpupool:0"
    assert wait_file(db / "ready", proc=b) == "gpupool:0"
    (gpu,) = _gpus(home, url)
    assert gpu["allocated_bytes"] == gpu["memory_bytes"] == 1024**3
    assert gpu["kind"] == "cpu"
    c = cli(home, url, "run", "-n", "1", "-p", "0.5", "--wait", "0", "--", sys.executable, "-c", "print('never')")
    assert c.returncode != 0
    assert "no capacity" in c.stderr.lower()
    assert "never" not in c.stdout
    (da / "go").touch()
    (db / "go").touch()
    assert a.wait(120) == 0, a.stdout.read() if a.stdout else ""
    assert b.wait(120) == 0
    (gpu,) = _gpus(home, url)
    assert gpu["allocated_bytes"] == 0


def test_request_then_runs_then_release(pool) -> None:
    home, url, _, _, _ = pool
    r = cli(home, url, "request", "-n", "1", "-p", "0.25", "--ttl", "10m", "--json")
    assert r.returncode == 0, r.stderr
    lease = json.loads(r.stdout)
    assert (home / ".gpupool-lease.json").exists()
    for _ in range(2):
        out = cli(home, url, "run", "--", sys.executable, "-c", "import torch; print(torch.ones(3, device='cuda').sum().item())")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("3.0")
    (gpu,) = _gpus(home, url)
    assert gpu["allocated_bytes"] == 1024**3 // 4  # the held lease, not released by the runs
    smi = cli(home, url, "smi", "--json")
    assert json.loads(smi.stdout)["lease"]["id"] == lease["id"]
    assert cli(home, url, "release").returncode == 0
    assert not (home / ".gpupool-lease.json").exists()
    (gpu,) = _gpus(home, url)
    assert gpu["allocated_bytes"] == 0


def test_unrenewed_lease_expires_and_server_ends_its_session(tmp_path: Path) -> None:
    ctl, url = start_controller(tmp_path)
    srv, _ = start_server(tmp_path, url, "gpu-host-1")
    try:
        # A client whose lease stops being renewed once it computes (no `gpupool run`: killed, it
        # would take the client down with it): it computes until the lease expires.
        r = cli(tmp_path, url, "request", "-n", "1", "-p", "0.5", "--ttl", "3", "--json")
        assert r.returncode == 0, r.stderr
        lease = json.loads(r.stdout)
        d = tmp_path / "a"
        d.mkdir()
        text = tmp_path / "lease.txt"
        text.write_text(lease["signed"])
        env = command_env(lease["address"], "", base_env(tmp_path))
        env["GPUPOOL_LEASE_PATH"] = str(text)
        a = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
            while not (d / "ready").exists() and a.poll() is None:  # renewed while torch loads, then no more
                text.write_text(admin.post(f"/v1/leases/{lease['id']}/renew").json()["signed"])
                time.sleep(0.5)
        wait_file(d / "ready", proc=a)
        err = wait_file(d / "error", timeout=60)
        assert err.startswith("LeaseExpired"), err
        assert "lease" in err and "ended" in err
        gpu = wait_until(lambda: (g := _gpus(tmp_path, url)[0])["allocated_bytes"] == 0 and g, what="lease expiry")
        assert gpu["allocated_bytes"] == 0
        wait_until(lambda: "ending its sessions (worker" in srv.log, what="the server to end the session")
        assert a.wait(60) == 7
    finally:
        srv.stop()
        ctl.stop()


def test_killed_server_is_marked_down_and_client_gets_clear_error(pool) -> None:
    home, url, _, srv, _ = pool
    a, da = _holder(home, url, "a", "-n", "1", "-p", "0.5")
    wait_file(da / "ready", proc=a)
    srv.stop(signal.SIGKILL)
    err = wait_file(da / "error", timeout=60)
    assert err.startswith("ServerLost"), err
    assert a.wait(60) != 0
    st = wait_until(lambda: (s := json.loads(cli(home, url, "status", "--json").stdout))["servers_down"] == 1 and s,
                    what="the server to be marked down")
    assert st["leases_active"] == 0


def test_controller_restart_keeps_sessions_and_leases(tmp_path: Path) -> None:
    ctl, url = start_controller(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    srv, _ = start_server(tmp_path, url, "gpu-host-1")
    try:
        a, da = _holder(tmp_path, url, "a", "-n", "1", "-p", "0.5", "--ttl", "6")
        wait_file(da / "ready", proc=a)
        ctl.stop()
        ctl, _ = start_controller(tmp_path, port=port)
        # The session kept computing throughout; the lease is still there and renewals resume.
        wait_until(lambda: _gpus(tmp_path, url)[0]["allocated_bytes"] == 1024**3 // 2, what="the lease after restart")
        time.sleep(8)  # longer than the TTL: only renewals keep it alive
        assert not (da / "error").exists()
        assert _gpus(tmp_path, url)[0]["allocated_bytes"] == 1024**3 // 2
        (da / "go").touch()
        assert a.wait(120) == 0
    finally:
        srv.stop()
        ctl.stop()


def test_pool_server_refuses_missing_and_forged_leases(pool) -> None:
    home, url, _, _, addr = pool
    from tests.conftest import run_python

    code = f"""
    import gpupool
    for lease in ("", "gpl1.eyJ2IjoxfQ.AAAA"):
        try:
            gpupool.connect({addr!r}, token={ADMIN!r}, lease=lease)
        except gpupool.GpupoolError as e:
            print(type(e).__name__, "|", e)
    """
    r = run_python(code)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout + r.stderr
    assert lines[0].startswith("AuthError") and "no lease" in lines[0]
    assert lines[1].startswith("LeaseError") and "refused the lease" in lines[1]


def test_list_exits_nonzero_without_a_pool(tmp_path: Path) -> None:
    r = cli(tmp_path, "http://127.0.0.1:9", "list")
    assert r.returncode != 0
    assert "controller" in r.stderr.lower()


def test_queued_run_shows_its_place_and_starts_when_capacity_frees(pool) -> None:
    home, url, _, _, _ = pool
    a, da = _holder(home, url, "a", "-n", "1")  # the whole GPU
    wait_file(da / "ready", proc=a)
    b, db = _holder(home, url, "b", "-n", "1", "-p", "0.5", "--wait", "120")
    assert b.stdout is not None
    line = b.stdout.readline()
    while "waiting in the queue" not in line:
        assert line, "gpupool run ended without queueing"
        line = b.stdout.readline()
    assert "place 1" in line
    assert not (db / "ready").exists()
    (da / "go").touch()
    assert a.wait(120) == 0
    wait_file(db / "ready", proc=b)  # granted once the whole-GPU lease was released
    (db / "go").touch()
    assert b.wait(120) == 0


def test_tokens_users_and_drain_through_the_cli(pool) -> None:
    home, url, _, _, _ = pool
    made = cli(home, url, "token", "create", "--user", "alice")
    assert made.returncode == 0, made.stderr
    alice = made.stdout.strip().splitlines()[-1]
    r = cli(home, url, "request", "-n", "1", "-p", "0.25", "--json", token=alice)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["user"] == "alice"
    # alice sees only her own leases; an admin sees all
    listed = json.loads(cli(home, url, "token", "list", "--json").stdout)["tokens"]
    tid = next(t["id"] for t in listed if t["user"] == "alice")
    assert cli(home, url, "token", "revoke", tid).returncode == 0
    denied = cli(home, url, "list", token=alice)
    assert denied.returncode != 0 and "token" in denied.stderr.lower()
    # drain: no new leases on the server
    assert cli(home, url, "drain", "gpu-host-1").returncode == 0
    refused = cli(home, url, "request", "-n", "1", "-p", "0.25", "--wait", "0")
    assert refused.returncode != 0
    assert cli(home, url, "drain", "--undo", "gpu-host-1").returncode == 0
    assert cli(home, url, "request", "-n", "1", "-p", "0.25", "--wait", "0").returncode == 0


def test_gpupool_up_keeps_its_secrets_in_0600_files_apart_from_the_database(tmp_path: Path) -> None:
    """Under `gpupool up`: the database, the signing key and pool.json (the admin token) are
    readable by their owner only, created so; the database holds no private key."""
    home = tmp_path / "home"  # created by gpupool up itself
    up = Proc([sys.executable, "-m", "gpupool", "up", "--cpu-gpus", "1", "--cpu-gpu-memory", "1GiB"],
              base_env(home), "gpupool server listening on")
    try:
        assert home.stat().st_mode & 0o777 == 0o700
        for name in ("controller.db", "controller.key.pem", "pool.json", "ca-key.pem"):
            mode = (home / name).stat().st_mode & 0o777
            assert mode == 0o600, f"{name} has mode {mode:04o}"
        assert b"PRIVATE KEY" in (home / "controller.key.pem").read_bytes()
        for f in home.glob("controller.db*"):
            assert b"PRIVATE KEY" not in f.read_bytes(), f
        with sqlite3.connect(home / "controller.db") as db:
            assert {k for (k,) in db.execute("select key from meta")} == {"lock", "pool_version", "public_key"}
    finally:
        up.stop()
