"""A pool off loopback: `gpupool up` makes a CA and certificates, and both planes speak TLS.

Uses this host's first non-loopback address (skipped where it has none); nothing leaves the host.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gpupool.controller.client import ControllerClient
from gpupool.errors import ConnectError
from tests.pool_fixtures import Proc, base_env


def _own_address() -> str | None:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    v4 = [a for a in out if "." in a and not a.startswith("127.")]
    return v4[0] if v4 else None


ADDRESS = _own_address()
needs_address = pytest.mark.skipif(ADDRESS is None, reason="this host has no non-loopback address")


@needs_address
def test_gpupool_up_off_loopback_serves_both_planes_over_tls(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = base_env(home)
    env.pop("GPUPOOL_TOKEN")
    up = Proc([sys.executable, "-m", "gpupool", "up", "--cpu-gpus", "1", "--cpu-gpu-memory", "1GiB",
               "--listen", f"{ADDRESS}:0", "--server-listen", f"{ADDRESS}:0"], env, "gpupool server listening on")
    try:
        url = up.wait_for("gpupool controller on").split(" on ", 1)[1].split()[0]
        assert url.startswith(f"https://{ADDRESS}:")
        assert "data plane: TLS" in up.log
        assert (home / "ca-key.pem").stat().st_mode & 0o777 == 0o600
        # The controller speaks only TLS; plain HTTP gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=10)
        # Without the pool's CA, a client does not trust the controller.
        with pytest.raises(httpx.HTTPError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url + "/healthz", timeout=10)
        assert httpx.get(url + "/healthz", verify=ssl.create_default_context(cafile=str(home / "ca.pem")), timeout=10).status_code == 200
        # A program under `gpupool run`: lease over HTTPS, session over TLS, with no TLS flags.
        out = subprocess.run(
            [sys.executable, "-m", "gpupool", "run", "-n", "1", "-p", "0.25", "--", sys.executable, "-c",
             "import torch; print('sum', (torch.ones(3, device='cuda') * 2).sum().item())"],
            capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        assert "sum 6.0" in out.stdout
        assert ", TLS)" in up.log  # the session went through the TLS relay
    finally:
        up.stop()


@needs_address
def test_a_token_is_never_sent_to_a_controller_in_clear_off_loopback() -> None:
    assert ADDRESS is not None
    seen: list[bytes] = []
    listener = socket.create_server((ADDRESS, 0))
    listener.settimeout(2)
    port = listener.getsockname()[1]
    with pytest.raises(ConnectError, match="refusing to send a token in clear to the controller"):
        ControllerClient(f"http://{ADDRESS}:{port}", "secret-token").status()
    try:
        conn, _ = listener.accept()  # nothing may have connected at all
        seen.append(conn.recv(4096))
    except TimeoutError:
        pass
    listener.close()
    assert seen == []


def test_a_controller_off_loopback_without_a_certificate_refuses_to_start() -> None:
    out = subprocess.run([sys.executable, "-m", "gpupool", "controller", "--listen", "0.0.0.0:0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "listening on 0.0.0.0 (not loopback) needs TLS" in out.stderr
    assert "Traceback" not in out.stderr
