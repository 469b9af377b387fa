"""Where gpupool keeps its state on a machine, and how commands find the pool without flags.

- `$GPUPOOL_HOME` (default `~/.local/share/gpupool`, created 0700): the controller's SQLite
  database `controller.db` and its signing key `controller.key.pem` (Note [Signing key file] in
  controller/keyfile.py), and `pool.json`, written by `gpupool up` (its controller URL and admin
  token) and removed when it stops. All three are created readable by their owner only (0600).
- `.gpupool-lease.json` in the current directory: written by `gpupool request`, read by later
  `gpupool run` / `gpupool smi` / `gpupool release` in that directory. `GPUPOOL_LEASE_FILE`
  names another file (e.g. one per shell: `export GPUPOOL_LEASE_FILE=/tmp/lease-$$.json`).

Controller URL and token are resolved in this order: the command's flags, then
`GPUPOOL_CONTROLLER` / `GPUPOOL_TOKEN`, then `pool.json` of a running `gpupool up`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpupool.errors import ControllerUnreachable

LEASE_FILE_NAME = ".gpupool-lease.json"


def home() -> Path:
    return Path(os.environ.get("GPUPOOL_HOME") or Path.home() / ".local" / "share" / "gpupool")


def pool_file() -> Path:
    return home() / "pool.json"


def write_pool(url: str, token: str) -> Path:
    p = pool_file()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _write_private(p, {"url": url, "token": token, "pid": os.getpid()})  # an admin token


def read_pool() -> dict[str, Any] | None:
    return _read_record(pool_file(), "url")


def _write_private(p: Path, data: dict[str, Any]) -> Path:
    """Write JSON readable by its owner only, atomically (a reader never sees half a file).

    Note: the file is created 0600 (O_EXCL, so a stale temporary file with a wider mode is never
    reused), never narrowed after the secret is in it."""
    tmp = p.with_name(p.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    tmp.replace(p)
    return p


def _read_record(p: Path, key: str) -> dict[str, Any] | None:
    """The JSON object in `p` if it has `key`; None if missing or not ours."""
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and key in data else None


def remove_pool() -> None:
    rec = read_pool()
    if rec is not None and rec.get("pid") == os.getpid():
        pool_file().unlink(missing_ok=True)


def resolve_controller(url: str | None, token: str | None) -> tuple[str, str]:
    """The controller URL and token to use, or a clear error saying how to give them."""
    pool = read_pool()
    url = url or os.environ.get("GPUPOOL_CONTROLLER") or (pool or {}).get("url")
    token = token or os.environ.get("GPUPOOL_TOKEN") or (pool or {}).get("token")
    if not url:
        raise ControllerUnreachable(
            "no pool found: start one with `gpupool up`, or pass --controller URL (or set "
            f"GPUPOOL_CONTROLLER); looked for {pool_file()}"
        )
    if not token:
        raise ControllerUnreachable("no token: pass --token or set GPUPOOL_TOKEN")
    return url, token


def lease_file() -> Path:
    return Path(os.environ.get("GPUPOOL_LEASE_FILE") or Path.cwd() / LEASE_FILE_NAME)


def write_lease(lease: dict[str, Any], url: str) -> Path:
    return _write_private(lease_file(), {"controller": url, "lease": lease})


def read_lease() -> dict[str, Any] | None:
    return _read_record(lease_file(), "lease")


def remove_lease() -> None:
    lease_file().unlink(missing_ok=True)
