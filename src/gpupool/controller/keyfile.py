"""The controller's signing key in a file of its own (PEM, PKCS#8), readable by its owner only.

Note [Signing key file]: whoever holds the key that signs leases can grant themselves any GPU of
the pool, so it is kept apart from the database (which backups, replicas and tools read): in a
0600 file, created with that mode, never widened. The database records only the public key, so a
controller started with a missing or wrong key file refuses to start instead of signing with a
new key that no GPU server knows. Replicas on one database each need a copy of the same file.
Databases from before this kept the key in a `meta` row: `Store.init` moves it to the file and
deletes the row.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpupool.controller import leases as leasing
from gpupool.controller.errors import SigningKeyError

KEY_SUFFIX = ".key.pem"


def default_key_path(sqlite_path: Path | None, home: Path) -> Path | None:
    """Beside a SQLite file (`controller.db` -> `controller.key.pem`); under `home` for a database
    server; None for an in-memory database (its key lives and dies with it)."""
    if sqlite_path is not None:
        return sqlite_path.with_name(sqlite_path.stem + KEY_SUFFIX)
    return home / f"controller{KEY_SUFFIX}"


def read_key(path: Path) -> Ed25519PrivateKey | None:
    """The key in `path`, or None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SigningKeyError(f"cannot read the controller's signing key {path}: {e}") from e
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SigningKeyError(f"the controller's signing key {path} is not a regular file")
        if mode & 0o077:
            raise SigningKeyError(f"the controller's signing key {path} can be read by other users "
                                  f"(mode {stat.S_IMODE(mode):04o}): run `chmod 600 {path}`, and make a new key "
                                  "if someone may have copied it")
        pem = f.read()
    try:
        return leasing.private_key_from_pem(pem)
    except ValueError as e:
        raise SigningKeyError(f"{path} is not an Ed25519 private key in PEM: {e}") from e


def write_key(path: Path, key: Ed25519PrivateKey) -> Ed25519PrivateKey:
    """Create `path` holding `key`, mode 0600 from its creation; returns the key the file holds
    (another controller's, if one created the file first)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(leasing.private_key_to_pem(key))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a key file that exists
        except FileExistsError:
            pass
    except OSError as e:
        raise SigningKeyError(f"cannot write the controller's signing key {path}: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    found = read_key(path)
    if found is None:
        raise SigningKeyError(f"the controller's signing key {path} vanished as it was written")
    return found
