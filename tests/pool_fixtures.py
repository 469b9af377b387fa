"""Real pool processes for the end-to-end tests: `gpupool controller` and `gpupool server
--controller` started as subprocesses on loopback, and `gpupool` CLI calls against them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ADMIN = "gpt_test-admin-token-0123456789"


class Proc:
    """A subprocess whose output is collected; `wait_for(text)` returns the line that has it."""

    def __init__(self, cmd: list[str], env: dict[str, str], ready: str, timeout: float = 90) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()
        self.ready_line = self.wait_for(ready, timeout)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.proc.poll() is not None and not self._cv.wait(0.2):
                    raise RuntimeError(f"process exited waiting for {text!r}:\n" + "".join(self.lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out waiting for {text!r}:\n" + "".join(self.lines))
                self._cv.wait(min(left, 0.5))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPUPOOL_HOME=str(home), GPUPOOL_TOKEN=ADMIN)
    env.pop("GPUPOOL_CONTROLLER", None)
    env.pop("GPUPOOL_SERVER", None)
    return env


def start_controller(home: Path, port: int = 0, ttl: float = 600) -> tuple[Proc, str]:
    p = Proc(
        [sys.executable, "-m", "gpupool", "controller", "--listen", f"127.0.0.1:{port}",
         "--db", f"sqlite:///{home}/controller.db", "--admin-token", ADMIN,
         "--heartbeat-interval", "0.5", "--sweep-interval", "0.2", "--default-ttl", str(ttl)],
        base_env(home),
        "listening on",
    )
    return p, p.ready_line.rsplit(" ", 1)[1].strip()


def start_server(home: Path, url: str, name: str, memory: str = "1GiB") -> tuple[Proc, str]:
    p = Proc(
        [sys.executable, "-m", "gpupool", "server", "--listen", "127.0.0.1:0", "--controller", url,
         "--name", name, "--cpu-gpus", "1", "--cpu-gpu-memory", memory],
        base_env(home),
        "listening on",
    )
    return p, p.ready_line.rsplit(" ", 1)[1].strip()


def cli(home: Path, url: str, *args: str, timeout: float = 120, token: str = ADMIN) -> subprocess.CompletedProcess[str]:
    env = base_env(home)
    env["GPUPOOL_CONTROLLER"] = url
    env["GPUPOOL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "gpupool", *args], capture_output=True, text=True,
                          env=env, cwd=home, timeout=timeout)


def run_bg(home: Path, url: str, *args: str, script: str) -> subprocess.Popen[str]:
    """`gpupool run ARGS -- python -c SCRIPT` in the background, in its own process group."""
    env = base_env(home)
    env["GPUPOOL_CONTROLLER"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "gpupool", "run", *args, "--", sys.executable, "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=home,
        start_new_session=True,
    )


def wait_file(path: Path, timeout: float = 120, proc: subprocess.Popen[str] | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"process exited before writing {path}:\n{out}")
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear")


def wait_until(pred, timeout: float = 60, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")
