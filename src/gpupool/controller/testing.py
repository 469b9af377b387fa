"""A real controller for tests: uvicorn on a free loopback port, SQLite in a given folder.

Nothing here is a mock: `Pool` starts the same app `gpupool controller` serves and talks to it
over HTTP, playing the part of GPU servers (register, heartbeat) and users where a test needs it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from gpupool.controller.app import Settings
from gpupool.controller.runner import ControllerThread

ADMIN_TOKEN = "gpp_test-admin-token"
GiB = 1024**3


class Pool:
    """A controller on 127.0.0.1 (port chosen at run time) with its database at `folder/db_name`
    (its signing key beside it)."""

    def __init__(self, folder: Path, db_name: str = "controller.db", **settings: Any) -> None:
        self.db_url = f"sqlite:///{Path(folder) / db_name}"
        base: dict[str, Any] = dict(heartbeat_interval_s=60.0, sweep_interval_s=0.1, poll_interval_s=2.0)
        base.update(settings)
        self.settings = Settings(db_url=self.db_url, admin_token=ADMIN_TOKEN, **base)
        self._clients: list[httpx.Client] = []
        self._addresses: dict[str, str] = {}  # by server name: one address each (Note [One server per address])
        self.thread = ControllerThread(self.settings).start()
        self.admin = self.client(ADMIN_TOKEN)

    @property
    def url(self) -> str:
        return self.thread.url

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        self._clients.append(c)
        return c

    def token(self, user: str, role: str = "user", **extra: Any) -> str:
        r = self.admin.post("/v1/tokens", json={"user": user, "role": role, **extra})
        r.raise_for_status()
        return str(r.json()["token"])

    def user(self, name: str) -> httpx.Client:
        """A client holding a fresh user token for `name`."""
        return self.client(self.token(name))

    def register(self, name: str, *memory: int, model: str = "CPU-backed device", kind: str = "cpu",
                 client: httpx.Client | None = None, **extra: Any) -> dict[str, Any]:
        """Register a server `name` offering one GPU per entry of `memory` (bytes), at an address of
        its own (`address=` gives one)."""
        body = {"name": name, "address": extra.pop("address", None) or self._address(name),
                "gpus": [{"index": i, "uuid": f"{name}-uuid-{i}", "model": model, "memory_bytes": m, "kind": kind}
                         for i, m in enumerate(memory)], **extra}
        r = (client or self.admin).post("/v1/servers", json=body)
        r.raise_for_status()
        return dict(r.json())

    def _address(self, name: str) -> str:
        if name not in self._addresses:
            port = 7000 + len(name)
            while f"127.0.0.1:{port}" in self._addresses.values():
                port += 1
            self._addresses[name] = f"127.0.0.1:{port}"
        return self._addresses[name]

    def heartbeat(self, name: str, client: httpx.Client | None = None) -> dict[str, Any]:
        r = (client or self.admin).post(f"/v1/servers/{name}/heartbeat", json={"gpus": []})
        r.raise_for_status()
        return dict(r.json())

    def restart(self, **settings: Any) -> None:
        """Stop the controller and start a new one on the same database (and a new port)."""
        self.thread.stop()
        self.settings = replace(self.settings, **settings)
        self.thread = ControllerThread(self.settings).start()
        for c in self._clients:
            c.base_url = httpx.URL(self.url)

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self.thread.stop()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
