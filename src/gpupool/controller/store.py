"""The controller's state in SQL: the one module that talks to the database (SQLAlchemy 2).

Tables: users, tokens (hashed), servers, gpus, leases, lease_gpus, queue, meta (the signing key's
public half: the key itself lives in a file, Note [Signing key file] in keyfile.py).
Every method is one transaction and returns plain dataclasses, never ORM objects, so nothing
outside this module holds a session. Time is passed in (`now`, seconds since the epoch).

Note [Write serialization]: every write transaction reads the pool, decides (the pure scheduler)
and writes back; two of them interleaving could both grant the same free bytes. So writers are
serialized: within a process by a lock, across processes on SQLite by `BEGIN IMMEDIATE` (the
database's single writer lock), and on other databases by a `SELECT ... FOR UPDATE` of one row
in `meta` that every write transaction takes first. Reads run in plain transactions and may see
a state that is already out of date by the time they return; nothing is granted from a read.

Note [Pool cache]: the scheduler's view of the pool (every GPU, what leases hold on it) is kept in
memory between write transactions, because reading 1,000 GPU rows was most of the cost of every
grant. It is tagged with the version number kept in the `pool_version` meta row, and every write
transaction that changes what the view holds (a lease granted or ended, a server or GPU added,
changed, down, up, draining) bumps that number. A writer reads the number after taking the write
lock: if it is the cached snapshot's, the snapshot is the database's state (writes are
serialized), else (another replica wrote, or this cache was dropped) it is read again. Within a
transaction, grants and ends of leases update the snapshot in place of a re-read; anything else
drops it (`_PoolTxn`). Leases past their expiry are ended by `_expire` before a snapshot is used.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from gpupool.controller import keyfile
from gpupool.controller import leases as leasing
from gpupool.controller import scheduler as sched
from gpupool.controller.errors import (
    ControllerError,
    LeaseExpired,
    NoCapacity,
    NotFound,
    QuotaExceeded,
    SigningKeyError,
)

ROLES = ("user", "admin", "server")
_TOKEN_CACHE_MAX = 10_000
TOKEN_PREFIX = "gpp_"


def gpupool_home() -> Path:
    """Where gpupool keeps its state: $GPUPOOL_HOME, else ~/.local/share/gpupool."""
    return Path(os.environ.get("GPUPOOL_HOME") or Path.home() / ".local" / "share" / "gpupool")


def default_db_url() -> str:
    return f"sqlite:///{gpupool_home() / 'controller.db'}"


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or another kind of database."""
    if not url.startswith("sqlite") or url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
    return Path(path) if path else None


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (SQLite gives its -wal and -shm files
    the same mode); an existing one that others can read is narrowed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if p.exists() and p.stat().st_mode & 0o077:
                p.chmod(0o600)  # a database made before this rule: tokens' hashes, the old key


class AuthFailed(ControllerError):
    """The bearer token is missing, unknown, expired or revoked (HTTP 401)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unauthorized", 401)


# -- schema -------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    quota_gpus: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ServerRow(Base):
    __tablename__ = "servers"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    address: Mapped[str] = mapped_column(String(300))
    owner: Mapped[str] = mapped_column(String(64))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))  # "up" | "down"
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float)


class GpuRow(Base):
    __tablename__ = "gpus"
    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    server_id: Mapped[str] = mapped_column(ForeignKey("servers.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    used_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    utilization: Mapped[float | None] = mapped_column(Float, nullable=True)
    sessions: Mapped[int | None] = mapped_column(Integer, nullable=True)


class LeaseRow(Base):
    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    server_id: Mapped[str] = mapped_column(ForeignKey("servers.id"), index=True)
    address: Mapped[str] = mapped_column(String(300))
    # "active" | "released" | "abandoned" | "expired" | "server_down" | "gpu_gone"
    state: Mapped[str] = mapped_column(String(16), index=True)
    exclusive: Mapped[bool] = mapped_column(Boolean)
    ttl_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    entry_id: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    # Note: what a grant checks is "the active leases on this server"; without this index, SQLite
    # walked every lease the GPU or server ever had (a cost that grew with the history).
    __table_args__ = (Index("ix_leases_state_server", "state", "server_id"),)


class LeaseGpuRow(Base):
    __tablename__ = "lease_gpus"
    lease_id: Mapped[str] = mapped_column(ForeignKey("leases.id"), primary_key=True)
    gpu_id: Mapped[str] = mapped_column(ForeignKey("gpus.id"), primary_key=True, index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)


class QueueRow(Base):
    __tablename__ = "queue"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer)
    ttl_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    # "waiting" | "granted" | "refused" | "rejected" | "timed_out" | "cancelled"
    state: Mapped[str] = mapped_column(String(16), index=True)
    code: Mapped[str] = mapped_column(String(32), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# -- statements of the hot path -------------------------------------------------------------------
# Note [Hot path]: a grant and a release run these Core statements, built once here, on the
# session's connection: an ORM query costs ~100 µs of Python per statement on top of the
# database's own work, a prebuilt Core statement ~25 µs, and a grant was ~30 statements. The rest
# of the store uses the ORM. `Store._conn` flushes the ORM's pending changes before a Core
# statement runs, and `_schedule` expires the ORM's objects after its Core writes, so the two
# never see different states.

def _table(name: str) -> Table:
    return Base.metadata.tables[name]


_leases, _lease_gpus, _queue, _users = _table("leases"), _table("lease_gpus"), _table("queue"), _table("users")
_gpus, _servers, _meta, _tokens = _table("gpus"), _table("servers"), _table("meta"), _table("tokens")

_Q_VERSION = select(_meta.c.value).where(_meta.c.key == "pool_version")
_Q_SET_VERSION = update(_meta).where(_meta.c.key == "pool_version").values(value=bindparam("v"))
_Q_ANY_DUE = union_all(
    select(_leases.c.id).where(_leases.c.state == "active", _leases.c.expires_at <= bindparam("now")),
    select(_queue.c.id).where(_queue.c.state == "waiting", _queue.c.deadline < bindparam("now")),
).limit(1)
_Q_WAITING = select(_queue.c.id, _queue.c.user, _queue.c.request, _queue.c.priority, _queue.c.seq,
                    _queue.c.ttl_s).where(_queue.c.state == "waiting")
_Q_USER = select(_users.c.quota_gpus).where(_users.c.name == bindparam("user"))
_Q_ALLOCATIONS = (select(_lease_gpus.c.gpu_id, _lease_gpus.c.bytes, _leases.c.exclusive)
                  .join(_leases, _leases.c.id == _lease_gpus.c.lease_id)
                  .where(_leases.c.state == "active", _leases.c.expires_at > bindparam("now")))
_Q_ALLOCATIONS_ON = _Q_ALLOCATIONS.where(_leases.c.server_id == bindparam("server"))
_Q_MEMORY_ON = select(_gpus.c.memory_bytes).where(_gpus.c.id == bindparam("gpu"), _gpus.c.present)
_Q_LEASE = select(_leases).where(_leases.c.id == bindparam("id"))
_Q_LEASE_GPUS = select(_lease_gpus.c.gpu_id, _lease_gpus.c.bytes).where(_lease_gpus.c.lease_id == bindparam("id"))
_Q_LEASE_GPU_INFO = (select(_gpus.c.id, _gpus.c.index, _gpus.c.uuid, _gpus.c.model, _gpus.c.kind,
                            _gpus.c.memory_bytes, _lease_gpus.c.bytes)
                     .join(_gpus, _gpus.c.id == _lease_gpus.c.gpu_id)
                     .where(_lease_gpus.c.lease_id == bindparam("id")).order_by(_gpus.c.index))
_Q_SERVER_NAME = select(_servers.c.name).where(_servers.c.id == bindparam("id"))
_Q_END_LEASE = update(_leases).where(_leases.c.id == bindparam("lid")).values(
    state=bindparam("state"), ended_at=bindparam("ended_at"))
_Q_ENTRY_DONE = update(_queue).where(_queue.c.id == bindparam("qid")).values(
    state=bindparam("state"), code=bindparam("code"), reason=bindparam("reason"), lease_id=bindparam("lid"))
_I_QUEUE, _I_LEASE, _I_LEASE_GPU = insert(_queue), insert(_leases), insert(_lease_gpus)
_Q_TOKEN = select(_tokens.c.id, _tokens.c.user, _tokens.c.role, _tokens.c.revoked_at,
                  _tokens.c.expires_at).where(_tokens.c.hash == bindparam("hash"))

_SQLITE: dict[tuple[int, tuple[str, ...]], tuple[Any, str, tuple[str, ...]]] = {}


def _run(c: Connection, stmt: Any, params: dict[str, Any] | None = None,
         many: Sequence[dict[str, Any]] | None = None) -> list[tuple[Any, ...]]:
    """Run a prebuilt statement; its rows as plain tuples (SQLite: booleans read back as 0/1).

    On SQLite the statement is compiled once and run on the driver's own cursor, which costs
    ~5 µs where a Core execution costs ~25 (Note [Hot path]); elsewhere it goes through Core.
    Statements that read JSON or need named columns use Core everywhere.
    """
    first = many[0] if many else (params or {})
    if c.dialect.name != "sqlite":
        result = c.execute(stmt, list(many) if many else first)
        return [tuple(r) for r in result] if result.returns_rows else []
    key = (id(stmt), tuple(first))
    hit = _SQLITE.get(key)
    if hit is None:
        compiled = stmt.compile(dialect=c.dialect, column_keys=list(first))
        hit = _SQLITE[key] = (compiled, str(compiled), tuple(compiled.positiontup or ()))
    compiled, sql, names = hit
    raw = c.connection.driver_connection
    assert raw is not None
    if many:
        raw.executemany(sql, [[compiled.construct_params(p)[n] for n in names] for p in many])
        return []
    full = compiled.construct_params(first)
    return raw.execute(sql, [full[n] for n in names]).fetchall()


# -- values returned ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user behind a token and the token's role."""

    user: str
    role: str
    token_id: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user: str
    role: str
    note: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class UserInfo:
    name: str
    quota_gpus: float | None
    usage_gpus: float


@dataclass(frozen=True)
class GpuSpec:
    """A GPU as a server registers it."""

    index: int
    uuid: str
    model: str
    memory_bytes: int
    kind: str = "cuda"
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuUsage:
    """What a server reports of a GPU in its heartbeat."""

    index: int
    used_bytes: int | None = None
    utilization: float | None = None
    sessions: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    id: str
    server_id: str
    server: str
    address: str
    server_state: str
    draining: bool
    index: int
    uuid: str
    model: str
    kind: str
    memory_bytes: int
    allocated_bytes: int
    exclusive: bool
    leases: int
    used_bytes: int | None
    utilization: float | None
    sessions: int | None
    labels: dict[str, str]


@dataclass(frozen=True)
class ServerInfo:
    id: str
    name: str
    address: str
    owner: str
    state: str
    draining: bool
    labels: dict[str, str]
    registered_at: float
    last_heartbeat: float
    gpus: int


@dataclass(frozen=True)
class LeaseGpuInfo:
    gpu_id: str
    index: int
    uuid: str
    model: str
    kind: str
    memory_bytes: int
    bytes: int


@dataclass(frozen=True)
class LeaseInfo:
    id: str
    user: str
    server_id: str
    server: str
    address: str
    state: str
    exclusive: bool
    gpus: tuple[LeaseGpuInfo, ...]
    created_at: float
    expires_at: float
    ended_at: float | None
    text: str
    ttl_s: float = 0.0  # what a renewal pushes the expiry to, from its time


@dataclass(frozen=True)
class EntryInfo:
    """A queue entry: a request and what became of it."""

    id: str
    user: str
    state: str
    priority: int
    position: int | None
    created_at: float
    deadline: float
    code: str
    reason: str
    lease: LeaseInfo | None


@dataclass(frozen=True)
class SweepResult:
    servers_down: list[str]
    leases_ended: int
    changed: bool


# -- request (de)serialization for the queue table ------------------------------------------------


def request_to_json(req: sched.Request) -> dict[str, Any]:
    return {"n": req.n, "share": {"kind": req.share.kind, "fraction": req.share.fraction, "bytes": req.share.bytes,
                                   "min_bytes": req.share.min_bytes},
            "model": req.model, "kind": req.kind, "min_memory_bytes": req.min_memory_bytes,
            "server": req.server, "labels": dict(req.labels), "spread": req.spread}


def request_from_json(d: dict[str, Any]) -> sched.Request:
    share = sched.Share(d["share"]["kind"], fraction=d["share"]["fraction"], bytes=d["share"]["bytes"],
                        min_bytes=d["share"].get("min_bytes", 0))  # absent in entries queued before it existed
    return sched.Request(n=d["n"], share=share, model=d["model"], kind=d["kind"],
                         min_memory_bytes=d["min_memory_bytes"], server=d["server"],
                         labels=d["labels"], spread=d["spread"])


def hash_token(secret: str) -> str:
    """Tokens are 256-bit random strings, so a plain SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


class _PoolTxn:
    """The scheduler's snapshot of the pool within one write transaction (Note [Pool cache]).

    `snap` is None until someone reads it (then `Store._snapshot` fills it from the database) and
    after a change it cannot follow; `changed` makes the commit bump the pool version.
    """

    def __init__(self, cached: tuple[int, sched.Snapshot] | None, version: int | None) -> None:
        self.version = version
        fresh = cached is not None and version is not None and cached[0] == version
        self.snap: sched.Snapshot | None = cached[1] if cached is not None and fresh else None
        self.changed = False

    @property
    def next_version(self) -> int:
        assert self.version is not None
        return self.version + 1

    def change(self, snap: sched.Snapshot | None = None) -> None:
        """The pool changed: to `snap`, or (None) to something only a re-read knows."""
        self.snap, self.changed = snap, True

    def cache_after_commit(self) -> tuple[int, sched.Snapshot] | None:
        """What the store may keep after the commit: nothing without a version row (before
        `init` made one), as no later writer could tell whether it is current."""
        if self.snap is None or self.version is None:
            return None
        return (self.next_version if self.changed else self.version), self.snap


# -- the store ----------------------------------------------------------------------------------


class Store:
    """The controller's database. Thread-safe; one instance per process."""

    def __init__(self, url: str | None = None, token_cache_s: float = 2.0, key_file: str | Path | None = None) -> None:
        """`key_file`: the signing key's file (default: `keyfile.default_key_path`)."""
        self.url = url or default_db_url()
        self.sqlite = self.url.startswith("sqlite")
        db_file = sqlite_file(self.url)
        memory = self.sqlite and db_file is None
        self.key_file = Path(key_file) if key_file else (None if memory else keyfile.default_key_path(db_file, gpupool_home()))
        if self.sqlite:
            if db_file is not None:
                _create_private(db_file)
            kw: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
            if memory:
                kw["poolclass"] = StaticPool
            self._write_engine = create_engine(self.url, **kw)
            self._read_engine = self._write_engine if memory else create_engine(self.url, **kw)
            _sqlite_transactions(self._write_engine, "BEGIN IMMEDIATE")
            if self._read_engine is not self._write_engine:
                _sqlite_transactions(self._read_engine, "BEGIN")
        else:
            self._write_engine = self._read_engine = create_engine(self.url, pool_pre_ping=True)
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        self._reads = sessionmaker(self._read_engine, expire_on_commit=False)
        self._lock = threading.Lock()
        self._pool_cache: tuple[int, sched.Snapshot] | None = None  # Note [Pool cache]
        self._tokens: dict[str, tuple[Principal, float | None, float]] = {}  # see cached_principal
        self.token_cache_s = token_cache_s
        self._key: Ed25519PrivateKey | None = None
        # Called (from the writing thread) with the ids of queue entries that left "waiting".
        self.on_entries_changed: Callable[[set[str]], None] | None = None

    def init(self) -> None:
        """Create the tables (if missing), the lock row, the pool version, and load (or create) the
        signing key."""
        Base.metadata.create_all(self._write_engine)
        for index in _leases.indexes:  # create_all skips the indexes of existing tables
            index.create(self._write_engine, checkfirst=True)
        with self._write() as s:
            if s.get(MetaRow, "lock") is None:
                s.add(MetaRow(key="lock", value="pool writers take this row first"))
            if s.get(MetaRow, "pool_version") is None:
                s.add(MetaRow(key="pool_version", value="0"))
        self.signing_key()

    def close(self) -> None:
        self._write_engine.dispose()
        self._read_engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        changed: set[str] = set()
        with self._lock, self._writes() as s:
            with s.begin():
                if not self.sqlite:
                    s.execute(select(MetaRow).where(MetaRow.key == "lock").with_for_update())
                s.info["changed_entries"] = changed
                rows = _run(s.connection(), _Q_VERSION)
                version = rows[0][0] if rows else None
                pool = _PoolTxn(self._pool_cache, int(version) if version is not None else None)
                s.info["pool"] = pool
                yield s
                if pool.changed and version is not None:
                    _run(self._conn(s), _Q_SET_VERSION, {"v": str(pool.next_version)})
            self._pool_cache = pool.cache_after_commit()
        # Only after the commit: a waiter woken now reads the new state.
        if changed and self.on_entries_changed is not None:
            self.on_entries_changed(changed)

    @staticmethod
    def _conn(s: Session) -> Connection:
        """The session's connection for Core statements, with the ORM's pending changes written
        first (Note [Hot path])."""
        s.flush()
        return s.connection()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads() as s, s.begin():
            yield s

    # -- signing key ----------------------------------------------------------------------------

    def signing_key(self) -> Ed25519PrivateKey:
        """The controller's Ed25519 key (Note [Signing key file] in keyfile.py)."""
        if self._key is None:
            self._key = self._load_key()
        return self._key

    def _load_key(self) -> Ed25519PrivateKey:
        """Read the key file (or create it, or move the key of an older database out to it) and
        check it against the public key this database's leases are signed with."""
        with self._write() as s:
            legacy, recorded = s.get(MetaRow, "signing_key"), s.get(MetaRow, "public_key")
            key = keyfile.read_key(self.key_file) if self.key_file is not None else None
            if legacy is not None:
                key = self._move_legacy_key(s, legacy, key)
            elif key is None:
                key = self._create_key(recorded)
            self._check_public(s, key, recorded)
        if legacy is not None and self.sqlite:
            self._scrub_sqlite()
        return key

    def _create_key(self, recorded: MetaRow | None) -> Ed25519PrivateKey:
        if recorded is not None:
            raise SigningKeyError(
                f"the signing key file {self.key_file} is missing, but this database's leases are signed with key "
                f"{leasing.key_id(leasing.public_key_from_text(recorded.value))}: copy that controller's key file "
                "there (or pass --key-file)")
        key = leasing.generate_key()
        return keyfile.write_key(self.key_file, key) if self.key_file is not None else key

    def _check_public(self, s: Session, key: Ed25519PrivateKey, recorded: MetaRow | None) -> None:
        public = leasing.public_key_to_text(key.public_key())
        if recorded is None:
            s.add(MetaRow(key="public_key", value=public))
        elif recorded.value != public:
            theirs = leasing.key_id(leasing.public_key_from_text(recorded.value))
            raise SigningKeyError(
                f"the signing key in {self.key_file} (key {leasing.key_id(key.public_key())}) is not the one this "
                f"database's leases are signed with ({theirs}): pass --key-file with that controller's key")

    def _move_legacy_key(self, s: Session, legacy: MetaRow, key: Ed25519PrivateKey | None) -> Ed25519PrivateKey:
        old = leasing.private_key_from_pem(legacy.value.encode())
        if key is None:
            key = keyfile.write_key(self.key_file, old) if self.key_file is not None else old
        if leasing.public_key_to_text(key.public_key()) != leasing.public_key_to_text(old.public_key()):
            raise SigningKeyError(f"the database holds a signing key, and {self.key_file} holds another: "
                                  "move one of them away (the servers know the database's)")
        s.delete(legacy)
        return key

    def _scrub_sqlite(self) -> None:
        """Leave no copy of a deleted key in the file: free pages and old WAL frames keep what a
        DELETE removed, so rebuild the file and empty the WAL."""
        with self._write_engine.connect() as c:
            raw = c.connection.driver_connection
            assert raw is not None
            raw.execute("VACUUM")
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- users and tokens -----------------------------------------------------------------------

    def _ensure_user(self, s: Session, user: str, now: float) -> UserRow:
        row = s.get(UserRow, user)
        if row is None:
            row = UserRow(name=user, quota_gpus=None, created_at=now)
            s.add(row)
            s.flush()
        return row

    def _quota(self, s: Session, user: str, now: float | None = None) -> float | None:
        """The user's quota (None: none), read once per write transaction. With `now`, a user not
        seen before is recorded."""
        quotas: dict[str, float | None] = s.info.setdefault("quotas", {})
        if user not in quotas:
            rows = _run(self._conn(s), _Q_USER, {"user": user})
            if rows:
                quotas[user] = rows[0][0]
            elif now is not None:
                quotas[user] = self._ensure_user(s, user, now).quota_gpus
            else:
                return None
        return quotas[user]

    def create_token(self, user: str, role: str, now: float, expires_at: float | None = None, note: str = "",
                     secret: str | None = None) -> tuple[TokenInfo, str]:
        """A new token for `user` with `role`; returns it once in clear (only its hash is kept)."""
        if role not in ROLES:
            raise ControllerError(f"role must be one of {', '.join(ROLES)}, not {role!r}", "invalid_request", 422)
        secret = secret or TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as s:
            self._ensure_user(s, user, now)
            if s.scalar(select(TokenRow).where(TokenRow.hash == hash_token(secret))) is not None:
                raise ControllerError("that token already exists", "conflict", 409)
            row = TokenRow(id=_new_id("t"), hash=hash_token(secret), user=user, role=role, note=note,
                           created_at=now, expires_at=expires_at, revoked_at=None)
            s.add(row)
            return _token_info(row), secret

    def ensure_token(self, secret: str, user: str, role: str, now: float, note: str = "") -> TokenInfo:
        """Make sure `secret` is a valid token (for `gpupool up`, which records its admin token)."""
        with self._read() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.hash == hash_token(secret)))
            if row is not None:
                if row.revoked_at is not None:
                    raise ControllerError(f"token {row.id} was revoked; pass a new one", "conflict", 409)
                return _token_info(row)
        info, _ = self.create_token(user, role, now, note=note, secret=secret)
        return info

    def authenticate(self, secret: str, now: float) -> Principal:
        digest = hash_token(secret)
        with self._read() as s:
            row = s.connection().execute(_Q_TOKEN, {"hash": digest}).first()
            if row is None:
                raise AuthFailed("invalid token: check --token or GPUPOOL_TOKEN")
            if row.revoked_at is not None:
                raise AuthFailed(f"token {row.id} was revoked")
            if row.expires_at is not None and now >= row.expires_at:
                raise AuthFailed(f"token {row.id} expired")
            principal = Principal(row.user, row.role, row.id)
        if len(self._tokens) >= _TOKEN_CACHE_MAX:
            self._tokens.clear()
        self._tokens[digest] = (principal, row.expires_at, now + self.token_cache_s)
        return principal

    def cached_principal(self, secret: str, now: float) -> Principal | None:
        """The token's principal if this store checked it less than `token_cache_s` ago, else None
        (then call `authenticate`).

        Note: every API call presents a token, and checking it in the database was a third of a
        grant's cost. A token revoked through this store stops working at once (`revoke_token`
        forgets it); one revoked through another replica, within `token_cache_s`. Expiry is
        checked on every use.
        """
        hit = self._tokens.get(hash_token(secret))
        if hit is None:
            return None
        principal, expires_at, fresh_until = hit
        if now >= fresh_until or (expires_at is not None and now >= expires_at):
            return None
        return principal

    def list_tokens(self) -> list[TokenInfo]:
        with self._read() as s:
            return [_token_info(r) for r in s.scalars(select(TokenRow).order_by(TokenRow.created_at))]

    def revoke_token(self, token_id: str, now: float) -> TokenInfo:
        with self._write() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                raise NotFound(f"no token {token_id!r}", "not_found", 404)
            if row.revoked_at is None:
                row.revoked_at = now
            self._tokens.clear()  # Note: before the commit too, so no request passes in between
            return _token_info(row)

    def set_quota(self, user: str, quota_gpus: float | None, now: float) -> UserInfo:
        with self._write() as s:
            row = self._ensure_user(s, user, now)
            row.quota_gpus = quota_gpus
            s.info.pop("quotas", None)
            self._schedule(s, now)  # a raised quota may let waiting requests through
        return self.get_user(user, now)

    def get_user(self, user: str, now: float) -> UserInfo:
        with self._read() as s:
            row = s.get(UserRow, user)
            if row is None:
                raise NotFound(f"no user {user!r}", "not_found", 404)
            return UserInfo(row.name, row.quota_gpus, float(self._usage(s, now).get(user, Fraction(0))))

    def list_users(self, now: float) -> list[UserInfo]:
        with self._read() as s:
            usage = self._usage(s, now)
            return [UserInfo(r.name, r.quota_gpus, float(usage.get(r.name, Fraction(0))))
                    for r in s.scalars(select(UserRow).order_by(UserRow.name))]

    # -- servers --------------------------------------------------------------------------------

    def _server(self, s: Session, ref: str) -> ServerRow:
        row = s.get(ServerRow, ref) or s.scalar(select(ServerRow).where(ServerRow.name == ref))
        if row is None:
            raise NotFound(f"no server {ref!r} (give its id or name; `gpupool status` lists them)", "not_found", 404)
        return row

    def register_server(self, owner: Principal, name: str, address: str, labels: dict[str, str],
                        gpus: Sequence[GpuSpec], now: float) -> ServerInfo:
        """Add a server, or update one registering again under the same name (a restart).

        Leases on a GPU that is gone, or whose uuid or memory changed, end ("gpu_gone"); the others
        stay, so a server that re-registers after a network blip keeps its sessions' leases.
        An address another server that is up has registered is refused (409 `address_in_use`).
        """
        with self._write() as s:
            self._pool_changed(s)
            self._check_address_free(s, name, address)
            row = s.scalar(select(ServerRow).where(ServerRow.name == name))
            if row is None:
                row = ServerRow(id=_new_id("s"), name=name, address=address, owner=owner.user, labels=labels,
                                state="up", draining=False, registered_at=now, last_heartbeat=now)
                s.add(row)
                s.flush()
            else:
                if row.owner != owner.user and not owner.admin:
                    raise ControllerError(f"server {name!r} is registered by another user ({row.owner})",
                                          "forbidden", 403)
                row.address, row.labels, row.state, row.last_heartbeat = address, labels, "up", now
                row.registered_at = now
            old = {g.index: g for g in s.scalars(select(GpuRow).where(GpuRow.server_id == row.id))}
            for spec in gpus:
                g = old.pop(spec.index, None)
                if g is None:
                    s.add(GpuRow(id=f"{row.id}-{spec.index}", server_id=row.id, index=spec.index, uuid=spec.uuid,
                                 model=spec.model, kind=spec.kind, memory_bytes=spec.memory_bytes,
                                 labels=spec.labels, present=True))
                    continue
                if g.uuid != spec.uuid or g.memory_bytes != spec.memory_bytes or not g.present:
                    self._end_leases_on_gpus(s, [g.id], "gpu_gone", now)
                g.uuid, g.model, g.kind, g.memory_bytes = spec.uuid, spec.model, spec.kind, spec.memory_bytes
                g.labels, g.present = spec.labels, True
            for g in old.values():
                self._end_leases_on_gpus(s, [g.id], "gpu_gone", now)
                g.present = False
            s.flush()
            self._schedule(s, now)
            return self._server_info(s, row)

    @staticmethod
    def _check_address_free(s: Session, name: str, address: str) -> None:
        """Note [One server per address]: clients find a server by the address its lease names, so
        two live servers at one address would let one pose as the other. Leases bind to the server
        id, not the address (Note [Lease binding] in server/admission.py), so this is the second
        wall: a server that is down gives its address up (a host renamed, or moved)."""
        clash = s.scalar(select(ServerRow).where(func.lower(ServerRow.address) == address.lower(),
                                                 ServerRow.name != name, ServerRow.state == "up"))
        if clash is not None:
            raise ControllerError(
                f"address {address} is already registered by server {clash.name!r}, which is up: give this "
                f"server its own address (--advertise HOST:PORT), register it under the name {clash.name!r} "
                "if it is that server, or stop that one first (it is marked down when it misses its heartbeats)",
                "address_in_use", 409)

    def heartbeat(self, caller: Principal, ref: str, usage: Sequence[GpuUsage], now: float
                  ) -> tuple[ServerInfo, list[LeaseInfo]]:
        """Record that a server lives and what its GPUs use; return its active leases.

        The answer's lease list is how a server learns that a lease ended early (released, or
        expired here): it ends sessions whose lease is no longer listed. See Note [Lease expiry].
        """
        with self._write() as s:
            row = self._server(s, ref)
            if row.owner != caller.user and not caller.admin:
                raise ControllerError(f"server {ref!r} is registered by another user", "forbidden", 403)
            was_down = row.state == "down"
            row.last_heartbeat, row.state = now, "up"
            gpus = {g.index: g for g in s.scalars(select(GpuRow).where(GpuRow.server_id == row.id))}
            for u in usage:
                g = gpus.get(u.index)
                if g is not None:
                    g.used_bytes, g.utilization, g.sessions = u.used_bytes, u.utilization, u.sessions
            if was_down:
                self._pool_changed(s)
                self._schedule(s, now)
            else:
                self._expire(s, now)
            leases = s.scalars(select(LeaseRow).where(LeaseRow.server_id == row.id, LeaseRow.state == "active"))
            return self._server_info(s, row), [self._lease_info(s, lr, now) for lr in leases]

    def set_draining(self, ref: str, draining: bool, now: float) -> ServerInfo:
        with self._write() as s:
            row = self._server(s, ref)
            if row.draining != draining:
                row.draining = draining
                self._pool_changed(s)
            self._schedule(s, now)
            return self._server_info(s, row)

    def list_servers(self) -> list[ServerInfo]:
        with self._read() as s:
            return [self._server_info(s, r) for r in s.scalars(select(ServerRow).order_by(ServerRow.name))]

    def list_gpus(self, now: float) -> list[GpuInfo]:
        with self._read() as s:
            alloc = self._allocations(s, now)
            out = []
            rows = s.execute(select(GpuRow, ServerRow).join(ServerRow, GpuRow.server_id == ServerRow.id)
                             .where(GpuRow.present).order_by(ServerRow.name, GpuRow.index))
            for g, srv in rows:
                a_bytes, excl, n = alloc.get(g.id, (0, False, 0))
                out.append(GpuInfo(g.id, srv.id, srv.name, srv.address, srv.state, srv.draining, g.index, g.uuid,
                                   g.model, g.kind, g.memory_bytes, a_bytes, excl, n, g.used_bytes,
                                   g.utilization, g.sessions, dict(g.labels or {})))
            return out

    def _server_info(self, s: Session, r: ServerRow) -> ServerInfo:
        n = len(list(s.scalars(select(GpuRow.id).where(GpuRow.server_id == r.id, GpuRow.present))))
        return ServerInfo(r.id, r.name, r.address, r.owner, r.state, r.draining, dict(r.labels or {}),
                          r.registered_at, r.last_heartbeat, n)

    # -- sweeping: server liveness, lease expiry, queue deadlines --------------------------------

    def sweep(self, now: float, down_after_s: float, alive_since: float) -> SweepResult:
        """Mark servers that missed their heartbeats down (ending their leases), expire leases and
        queue entries, and serve the queue with what that freed.

        Note: a server counts as heard from at `alive_since` at the latest (the controller's start),
        so a controller that was itself down for a while does not mark every server down at start.
        """
        with self._write() as s:
            down = []
            for row in s.scalars(select(ServerRow).where(ServerRow.state == "up")):
                if now - max(row.last_heartbeat, alive_since) > down_after_s:
                    row.state = "down"
                    down.append(row.id)
                    self._pool_changed(s)
            ended = 0
            if down:
                gpu_ids = list(s.scalars(select(GpuRow.id).where(GpuRow.server_id.in_(down))))
                ended += self._end_leases_on_gpus(s, gpu_ids, "server_down", now)
            ended += self._expire(s, now)
            granted = self._schedule(s, now)
            return SweepResult(down, ended, bool(down or ended or granted))

    def _expire(self, s: Session, now: float) -> int:
        """End leases past their expiry and queue entries past their deadline.

        Note [Lease expiry]: a lease is held while state == "active" and now < expires_at. Every
        write transaction calls this before it looks at allocations, so a lease past its expiry
        never counts as held, even if the sweeper has not run yet.
        """
        if s.info.get("expired_at") == now:
            return 0  # already done in this transaction
        s.info["expired_at"] = now
        if not _run(self._conn(s), _Q_ANY_DUE, {"now": now}):
            return 0  # the common case, in one cheap statement (Note [Hot path])
        n = 0
        for lr in list(s.scalars(select(LeaseRow).where(LeaseRow.state == "active", LeaseRow.expires_at <= now))):
            lr.state, lr.ended_at = "expired", lr.expires_at
            self._end_lease(s, lr)
            n += 1
        # A request with wait 0 has deadline == now: it is still considered once, then refused.
        for q in s.scalars(select(QueueRow).where(QueueRow.state == "waiting", QueueRow.deadline < now)):
            self._time_out(s, q, now)
            n += 1
            s.info["changed_entries"].add(q.id)
        if n:
            s.flush()
        return n

    def _time_out(self, s: Session, q: QueueRow, now: float) -> None:
        code, why = self._why_waiting(s, q, request_from_json(q.request), now)
        q.state, q.code = "timed_out", code
        q.reason = f"gave up after waiting {q.deadline - q.created_at:g} s: {why}"

    def _end_leases_on_gpus(self, s: Session, gpu_ids: Sequence[str], state: str, now: float) -> int:
        if not gpu_ids:
            return 0
        ids = set(s.scalars(select(LeaseGpuRow.lease_id).where(LeaseGpuRow.gpu_id.in_(gpu_ids))))
        n = 0
        for lr in list(s.scalars(select(LeaseRow).where(LeaseRow.id.in_(ids), LeaseRow.state == "active"))):
            lr.state, lr.ended_at = state, now
            self._end_lease(s, lr)
            n += 1
        s.flush()
        return n

    def _end_lease(self, s: Session, lr: Any, held: Sequence[tuple[str, int]] | None = None) -> None:
        """An active lease has just ended (its row says so): its bytes go back to the pool
        snapshot of the transaction. `lr`: its row, ORM or Core (`id`, `server_id`, `address`,
        `exclusive`); `held`: its (GPU id, bytes), when the caller has read them."""
        pool: _PoolTxn = s.info["pool"]
        if pool.snap is None:
            pool.change(None)
            return
        if held is None:
            held = [(g, b) for g, b in _run(self._conn(s), _Q_LEASE_GPUS, {"id": lr.id})]
        grants = tuple(sched.GpuGrant(gpu_id, 0, "", nbytes) for gpu_id, nbytes in held)
        pool.change(sched.unapply(pool.snap, sched.Placement(lr.server_id, lr.address, grants, lr.exclusive)))

    def _pool_changed(self, s: Session) -> None:
        """Servers or GPUs changed: the snapshot is read again when next needed."""
        s.info["pool"].change(None)

    # -- scheduling -----------------------------------------------------------------------------

    def _allocations(self, s: Session, now: float, server_id: str | None = None
                     ) -> dict[str, tuple[int, bool, int]]:
        """Per GPU id (of the pool, or of server `server_id`): (bytes held by leases held at
        `now`, held whole?, number of leases)."""
        out: dict[str, tuple[int, bool, int]] = {}
        c = self._conn(s)
        rows = (_run(c, _Q_ALLOCATIONS, {"now": now}) if server_id is None
                else _run(c, _Q_ALLOCATIONS_ON, {"now": now, "server": server_id}))
        for gpu_id, nbytes, excl in rows:
            b, e, n = out.get(gpu_id, (0, False, 0))
            out[gpu_id] = (b + nbytes, e or excl, n + 1)
        return out

    def _usage(self, s: Session, now: float) -> dict[str, Fraction]:
        """GPUs' worth of memory each user holds at `now` (the quota unit)."""
        out: dict[str, Fraction] = {}
        rows = s.execute(select(LeaseRow.user, LeaseGpuRow.bytes, GpuRow.memory_bytes)
                         .join(LeaseGpuRow, LeaseGpuRow.lease_id == LeaseRow.id)
                         .join(GpuRow, GpuRow.id == LeaseGpuRow.gpu_id)
                         .where(LeaseRow.state == "active", LeaseRow.expires_at > now))
        for user, nbytes, mem in rows:
            out[user] = out.get(user, Fraction(0)) + Fraction(nbytes, mem)
        return out

    def _snapshot(self, s: Session, now: float) -> sched.Snapshot:
        """The pool at `now`, as the scheduler sees it (Note [Pool cache]). Write transactions only."""
        self._expire(s, now)
        pool: _PoolTxn = s.info["pool"]
        if pool.snap is None:
            pool.snap = self._read_snapshot(s, now)
        return pool.snap

    def _read_snapshot(self, s: Session, now: float) -> sched.Snapshot:
        alloc = self._allocations(s, now)
        by_server: dict[str, list[sched.GpuView]] = {}
        # Note: plain rows, not ORM objects: a snapshot reads every GPU of the pool on every
        # request, and building ORM instances was most of a grant's cost with 1,000 GPUs.
        rows = s.execute(
            select(GpuRow.id, GpuRow.server_id, GpuRow.index, GpuRow.memory_bytes, GpuRow.model,
                   GpuRow.kind, GpuRow.uuid, GpuRow.labels)
            .where(GpuRow.present).order_by(GpuRow.server_id, GpuRow.index)
        )
        for gid, server_id, index, memory, model, kind, uid, labels in rows:
            b, e, n = alloc.get(gid, (0, False, 0))
            by_server.setdefault(server_id, []).append(sched.GpuView(
                gid, index, memory, model=model, kind=kind, uuid=uid,
                labels=dict(labels or {}), allocated_bytes=b, exclusive=e, leases=n))
        servers = []
        for srv in s.scalars(select(ServerRow).order_by(ServerRow.id)):
            gpus = by_server.get(srv.id, [])
            servers.append(sched.ServerView(srv.id, srv.name, srv.address, tuple(gpus),
                                            state="up" if srv.state == "up" else "down",
                                            draining=srv.draining, labels=dict(srv.labels or {})))
        return sched.Snapshot(tuple(servers))

    def _schedule(self, s: Session, now: float) -> dict[str, LeaseInfo]:
        """Serve the queue on the current pool; returns the leases granted, by queue entry id.

        Must run inside a write transaction (Note [Write serialization]).
        """
        self._expire(s, now)
        c = self._conn(s)
        waiting = {row.id: row for row in c.execute(_Q_WAITING)}
        if not waiting:
            return {}
        snap = self._snapshot(s, now)
        items = [sched.QueueItem(q.id, q.user, request_from_json(q.request), q.priority, q.seq)
                 for q in waiting.values()]
        quotas: dict[str, Fraction | None] = {}
        for u in {q.user for q in waiting.values()}:
            quota = self._quota(s, u)
            quotas[u] = None if quota is None else Fraction(quota)
        usage = self._usage(s, now) if any(q is not None for q in quotas.values()) else {}
        decisions, after = sched.schedule_queue(snap, items, usage, quotas)
        granted: dict[str, LeaseInfo] = {}
        for d in decisions:
            q = waiting[d.item_id]
            s.info["changed_entries"].add(q.id)
            if isinstance(d, sched.Reject):
                _run(c, _Q_ENTRY_DONE, {"qid": q.id, "state": "rejected", "code": d.code, "reason": d.reason,
                                          "lid": None})
                continue
            lease = self._grant(s, q.id, q.user, q.ttl_s, d.placement, snap, now)
            _run(c, _Q_ENTRY_DONE, {"qid": q.id, "state": "granted", "code": "", "reason": "", "lid": lease.id})
            granted[q.id] = lease
        if granted:
            s.info["pool"].change(after)
        if decisions:
            s.expire_all()  # ORM objects of these rows, loaded earlier, are out of date (Note [Hot path])
        return granted

    def _grant(self, s: Session, entry_id: str, user: str, ttl_s: float, p: sched.Placement,
               snap: sched.Snapshot, now: float) -> LeaseInfo:
        # Belt and braces for Note [No over-commit] and Note [Pool cache]: re-check the chosen
        # GPUs against the rows, not against the snapshot the decision was made on.
        c = self._conn(s)
        alloc = self._allocations(s, now, p.server_id)
        for g in p.gpus:
            b, excl, n = alloc.get(g.gpu_id, (0, False, 0))
            found = _run(c, _Q_MEMORY_ON, {"gpu": g.gpu_id})
            memory = found[0][0] if found else None
            if memory is None or excl or b + g.bytes > memory or (p.exclusive and n):
                raise RuntimeError(f"scheduler bug: GPU {g.gpu_id} would be over-committed")
        lease_id = _new_id("l")
        expires = now + ttl_s
        claims = leasing.LeaseClaims(
            lease_id, user, p.address, p.server_id,
            tuple(leasing.LeaseGpu(g.index, g.uuid, g.bytes) for g in p.gpus),
            p.exclusive, int(now * 1000), int(expires * 1000))
        text = leasing.sign_lease(claims, self.signing_key())
        _run(c, _I_LEASE, dict(
            id=lease_id, user=user, server_id=p.server_id, address=p.address, state="active", exclusive=p.exclusive,
            ttl_s=ttl_s, created_at=now, expires_at=claims.expires_at, ended_at=None, entry_id=entry_id, text=text))
        _run(c, _I_LEASE_GPU, many=[{"lease_id": lease_id, "gpu_id": g.gpu_id, "bytes": g.bytes} for g in p.gpus])
        server = next(sv for sv in snap.servers if sv.id == p.server_id)
        gpus = []
        for g in p.gpus:
            view = snap.gpu(g.gpu_id, p.server_id)
            gpus.append(LeaseGpuInfo(g.gpu_id, g.index, g.uuid, view.model, view.kind, view.memory_bytes, g.bytes))
        return LeaseInfo(lease_id, user, p.server_id, server.name, p.address, "active", p.exclusive, tuple(gpus),
                         now, claims.expires_at, None, text, ttl_s)

    # -- requests and the queue -----------------------------------------------------------------

    def submit(self, caller: Principal, req: sched.Request, priority: int, ttl_s: float, wait_s: float,
               now: float) -> EntryInfo:
        """Queue a request and serve the queue at once.

        The entry comes back "granted" (with its lease), "waiting" (until `now + wait_s`), or, when
        `wait_s` is 0 and it was not granted at once, "refused" with the reason: it never waits.
        Raises NoCapacity("unsatisfiable") when no GPU in the pool could ever take it and
        QuotaExceeded when it alone is more than the user's quota.
        """
        with self._write() as s:
            snap = self._snapshot(s, now)
            quota = self._quota(s, caller.user, now)
            if quota is not None:
                empty = sched.emptied(snap)
                if sched.place(req, empty) is None:
                    raise NoCapacity(f"no capacity: {sched.explain(req, empty)}", "unsatisfiable", 409)
                floor = sched.least_worth(req, empty) or Fraction(0)
                if floor > Fraction(quota):
                    raise QuotaExceeded(f"the request needs at least {float(floor):g} GPUs' worth of memory, but "
                                        f"{caller.user}'s quota is {quota:g}", "quota_exceeded", 403)
            entry_id = _new_id("q")
            self._conn(s).execute(_I_QUEUE, dict(
                id=entry_id, user=caller.user, request=request_to_json(req), priority=priority, ttl_s=ttl_s,
                created_at=now, deadline=now + wait_s, state="waiting", code="", reason=""))
            lease = self._schedule(s, now).get(entry_id)
            if lease is not None:  # the common case, answered without reading the entry back
                return EntryInfo(entry_id, caller.user, "granted", priority, None, now, now + wait_s, "", "", lease)
            q = s.scalar(select(QueueRow).where(QueueRow.id == entry_id))
            assert q is not None
            if q.state != "granted":
                # Note: checked only when not granted at once (a grant proves it satisfiable);
                # raising here rolls the queue entry back with the transaction.
                empty = sched.emptied(snap)
                if sched.place(req, empty) is None:
                    raise NoCapacity(f"no capacity: {sched.explain(req, empty)}", "unsatisfiable", 409)
            if q.state == "waiting" and wait_s <= 0:
                q.state = "refused"
                q.code, q.reason = self._why_waiting(s, q, req, now)
            return self._entry_info(s, q, now)

    def _why_waiting(self, s: Session, q: QueueRow, req: sched.Request, now: float) -> tuple[str, str]:
        snap = self._snapshot(s, now)
        row = s.get(UserRow, q.user)
        if row is not None and row.quota_gpus is not None:
            used = self._usage(s, now).get(q.user, Fraction(0))
            floor = sched.least_worth(req, sched.emptied(snap)) or Fraction(0)
            if used + floor > Fraction(row.quota_gpus):
                return "quota_exceeded", (f"{q.user} holds {float(used):g} GPUs' worth of memory; this request "
                                          f"needs {float(floor):g} more and the quota is {row.quota_gpus:g}: "
                                          "release a lease or wait")
        ahead = self._position(s, q) - 1
        if sched.place(req, snap) is not None and ahead:
            return "no_capacity", f"no capacity: {ahead} earlier request(s) in the queue are served first"
        why = sched.explain(req, snap)
        return "no_capacity", f"no capacity: {why}" + (f"; {ahead} request(s) ahead in the queue" if ahead else "")

    def _position(self, s: Session, q: QueueRow) -> int:
        waiting = s.execute(select(QueueRow.id, QueueRow.priority, QueueRow.seq).where(QueueRow.state == "waiting"))
        items = [sched.QueueItem(i, "", sched.Request(), p, sq) for i, p, sq in waiting]
        if q.id not in {i.id for i in items}:
            items.append(sched.QueueItem(q.id, "", sched.Request(), q.priority, q.seq))
        return sched.queue_position(items, q.id)

    def _entry_row(self, s: Session, entry_id: str, caller: Principal) -> QueueRow:
        q = s.scalar(select(QueueRow).where(QueueRow.id == entry_id))
        if q is None or (q.user != caller.user and not caller.admin):
            raise NotFound(f"no queue entry {entry_id!r}", "not_found", 404)
        return q

    def get_entry(self, entry_id: str, caller: Principal, now: float) -> EntryInfo:
        with self._read() as s:
            return self._entry_info(s, self._entry_row(s, entry_id, caller), now)

    def cancel_entry(self, entry_id: str, caller: Principal, now: float, state: str = "cancelled") -> EntryInfo:
        """Stop waiting. An entry already granted stays granted (the caller gets its lease)."""
        with self._write() as s:
            q = self._entry_row(s, entry_id, caller)
            if q.state == "waiting":
                s.info["changed_entries"].add(q.id)
                if state == "timed_out":
                    self._time_out(s, q, now)
                else:
                    q.state, q.code, q.reason = state, "cancelled", "cancelled while waiting"
                self._schedule(s, now)  # the queue behind it may move now
            return self._entry_info(s, q, now)

    def list_entries(self, caller: Principal, now: float, waiting_only: bool = True) -> list[EntryInfo]:
        with self._read() as s:
            query = select(QueueRow).order_by(QueueRow.seq)
            if waiting_only:
                query = query.where(QueueRow.state == "waiting")
            if not caller.admin:
                query = query.where(QueueRow.user == caller.user)
            return [self._entry_info(s, q, now) for q in s.scalars(query)]

    def _entry_info(self, s: Session, q: QueueRow, now: float) -> EntryInfo:
        lease = None
        if q.lease_id:
            lr = s.get(LeaseRow, q.lease_id)
            lease = self._lease_info(s, lr, now) if lr is not None else None
        pos = self._position(s, q) if q.state == "waiting" else None
        return EntryInfo(q.id, q.user, q.state, q.priority, pos, q.created_at, q.deadline, q.code, q.reason, lease)

    # -- leases ---------------------------------------------------------------------------------

    def _lease_row(self, s: Session, lease_id: str, caller: Principal) -> LeaseRow:
        lr = s.get(LeaseRow, lease_id)
        if lr is None or (lr.user != caller.user and not caller.admin):
            raise _no_lease(lease_id)
        return lr

    def _lease_info(self, s: Session, lr: LeaseRow, now: float) -> LeaseInfo:
        """The lease as the API shows it. A lease past its expiry reads "expired" even before the
        sweeper has written that (Note [Lease expiry])."""
        rows = s.execute(select(LeaseGpuRow, GpuRow).join(GpuRow, GpuRow.id == LeaseGpuRow.gpu_id)
                         .where(LeaseGpuRow.lease_id == lr.id).order_by(GpuRow.index))
        gpus = tuple(LeaseGpuInfo(g.id, g.index, g.uuid, g.model, g.kind, g.memory_bytes, lg.bytes) for lg, g in rows)
        srv = s.get(ServerRow, lr.server_id)
        state = "expired" if lr.state == "active" and lr.expires_at <= now else lr.state
        return LeaseInfo(lr.id, lr.user, lr.server_id, srv.name if srv else "", lr.address, state, lr.exclusive,
                         gpus, lr.created_at, lr.expires_at, lr.ended_at, lr.text, lr.ttl_s)

    def get_lease(self, lease_id: str, caller: Principal, now: float) -> LeaseInfo:
        with self._read() as s:
            return self._lease_info(s, self._lease_row(s, lease_id, caller), now)

    def list_leases(self, caller: Principal, now: float, include_ended: bool = False) -> list[LeaseInfo]:
        """The caller's leases; an admin's list has everyone's."""
        with self._read() as s:
            query = select(LeaseRow).order_by(LeaseRow.created_at, LeaseRow.id)
            if not include_ended:
                query = query.where(LeaseRow.state == "active", LeaseRow.expires_at > now)
            if not caller.admin:
                query = query.where(LeaseRow.user == caller.user)
            return [self._lease_info(s, lr, now) for lr in s.scalars(query)]

    def renew(self, lease_id: str, caller: Principal, ttl_s: float | None, now: float) -> LeaseInfo:
        """Push the expiry to `now + ttl` (the lease's own TTL by default) and sign it again."""
        with self._write() as s:
            self._expire(s, now)
            lr = self._lease_row(s, lease_id, caller)
            if lr.state != "active":
                raise LeaseExpired(f"lease {lease_id} has ended ({_ended_words(lr.state)}): request a new one")
            ttl = lr.ttl_s if ttl_s is None else ttl_s
            claims = replace(leasing.decode_lease(lr.text), expires_at_ms=int((now + ttl) * 1000))
            lr.ttl_s, lr.expires_at = ttl, claims.expires_at
            lr.text = leasing.sign_lease(claims, self.signing_key())
            s.flush()
            return self._lease_info(s, lr, now)

    def release(self, lease_id: str, caller: Principal, now: float) -> LeaseInfo:
        """End a lease and hand its GPUs to the queue. Releasing an ended lease is an error that
        says how it ended (so a client learns its lease had expired)."""
        with self._write() as s:
            self._expire(s, now)
            lr = self._conn(s).execute(_Q_LEASE, {"id": lease_id}).first()
            if lr is None or (lr.user != caller.user and not caller.admin):
                raise _no_lease(lease_id)
            return self._end_now(s, lr, "released", now)

    def abandon(self, caller: Principal, server: str, lease_id: str, now: float) -> LeaseInfo:
        """A server reports that the holder of one of its leases went away (its hold connection
        closed while the lease was active: `gpupool run` was killed): end the lease ("abandoned")
        and hand its GPUs to the queue, without waiting for its expiry."""
        with self._write() as s:
            self._expire(s, now)
            row = self._server(s, server)
            if row.owner != caller.user and not caller.admin:
                raise ControllerError(f"server {server!r} is registered by another user", "forbidden", 403)
            lr = self._conn(s).execute(_Q_LEASE, {"id": lease_id}).first()
            if lr is None or lr.server_id != row.id:
                raise NotFound(f"no lease {lease_id!r} on server {row.name!r}", "not_found", 404)
            return self._end_now(s, lr, "abandoned", now)

    def _end_now(self, s: Session, lr: Any, state: str, now: float) -> LeaseInfo:
        """End the active lease of Core row `lr` as `state` and serve the queue with its GPUs."""
        if lr.state != "active":
            raise LeaseExpired(f"lease {lr.id} had already ended ({_ended_words(lr.state)})")
        c = self._conn(s)
        gpus = tuple(LeaseGpuInfo(*g) for g in _run(c, _Q_LEASE_GPU_INFO, {"id": lr.id}))
        _run(c, _Q_END_LEASE, {"lid": lr.id, "state": state, "ended_at": now})
        self._end_lease(s, lr, [(g.gpu_id, g.bytes) for g in gpus])
        self._schedule(s, now)
        names = _run(c, _Q_SERVER_NAME, {"id": lr.server_id})
        server = names[0][0] if names else ""
        return LeaseInfo(lr.id, lr.user, lr.server_id, server, lr.address, state, lr.exclusive, gpus,
                         lr.created_at, lr.expires_at, now, lr.text, lr.ttl_s)

    def counts(self, now: float) -> dict[str, int]:
        """Numbers for the status page."""
        with self._read() as s:
            active = select(LeaseRow.id).where(LeaseRow.state == "active", LeaseRow.expires_at > now)
            return {
                "leases_active": len(list(s.scalars(active))),
                "queue_waiting": len(list(s.scalars(select(QueueRow.id).where(QueueRow.state == "waiting")))),
            }


def _no_lease(lease_id: str) -> NotFound:
    return NotFound(f"no lease {lease_id!r} (yours are listed by `gpupool list --leases`)", "not_found", 404)


def _ended_words(state: str) -> str:
    return {"released": "released", "abandoned": "abandoned: its holder went away without releasing it",
            "expired": "expired: it was not renewed in time",
            "server_down": "its server stopped answering", "gpu_gone": "its GPU left the server"}.get(state, state)


def _token_info(r: TokenRow) -> TokenInfo:
    return TokenInfo(r.id, r.user, r.role, r.note, r.created_at, r.expires_at, r.revoked_at)


def _sqlite_transactions(engine: Engine, begin: str) -> None:
    """Let SQLAlchemy, not pysqlite, start transactions, so writers can take the write lock up
    front with BEGIN IMMEDIATE (Note [Write serialization])."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # Note: in WAL mode NORMAL syncs at checkpoints, not at every commit (~30 ms each on
        # these disks, and every grant and release is a commit). A crash of the controller loses
        # nothing; a power loss may lose the last commits — leases the clients then renew or
        # the servers' heartbeats report again. GPUPOOL_SQLITE_SYNC=FULL restores per-commit syncs.
        sync = os.environ.get("GPUPOOL_SQLITE_SYNC", "NORMAL").upper()
        cur.execute(f"PRAGMA synchronous={'FULL' if sync == 'FULL' else 'NORMAL'}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)
