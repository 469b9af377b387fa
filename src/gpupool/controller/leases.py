"""Signed leases: the controller signs, the GPU server verifies on its own.

A lease travels as text `gpl1.<payload>.<signature>`, both parts base64url without padding. The
payload is the canonical JSON of `LeaseClaims` (sorted keys, no spaces, ASCII, integers only);
the signature is Ed25519 over exactly those payload bytes. A server holding the controller's
public key checks a lease without asking the controller, so sessions keep working while the
controller restarts.

Everything here is pure: no clock, no files, no network. The caller passes `now`.

Note [Lease expiry]: a lease is valid while `now < expires_at_ms / 1000`. Renewal issues a new
lease text with the same id, the same `issued_at_ms` and a later expiry; the server keeps the
latest expiry it has seen for an id (from the client or from its heartbeat answer). Ending a lease
early (release, abandon, server down) cannot be expressed in a signed text, so a server does not
trust a text alone: its agent (`ServerAgent.verify` in client.py) accepts a lease only if the last
heartbeat answer listed it as active, or it was issued after that answer's snapshot (a grant the
server has not heard of yet, compared in the controller's clock), and never once it has seen the
lease end. A released lease is thus refused from the next heartbeat on, and at once after a
server restart (the agent heartbeats before the server accepts connections).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpupool.controller.errors import LeaseExpired, LeaseForged, LeaseInvalid, LeaseWrongServer

PREFIX = "gpl1"
VERSION = 1
MAX_LEASE_TEXT = 16 * 1024  # bytes; a lease names at most a few dozen GPUs

_FIELDS = {"v", "id", "user", "server", "server_id", "gpus", "exclusive", "issued_at_ms", "expires_at_ms", "kid"}
_GPU_FIELDS = {"index", "uuid", "bytes"}


@dataclass(frozen=True)
class LeaseGpu:
    """One GPU of a lease: its index and uuid on the server, and the memory bytes leased on it."""

    index: int
    uuid: str
    bytes: int


@dataclass(frozen=True)
class LeaseClaims:
    """What a lease grants. `server_id` (and each GPU's uuid) is what binds it to a server;
    `server`, the data-plane address HOST:PORT, only tells the client where to connect."""

    id: str
    user: str
    server: str
    server_id: str
    gpus: tuple[LeaseGpu, ...]
    exclusive: bool
    issued_at_ms: int
    expires_at_ms: int
    kid: str = ""

    @property
    def expires_at(self) -> float:
        return self.expires_at_ms / 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "id": self.id,
            "user": self.user,
            "server": self.server,
            "server_id": self.server_id,
            "gpus": [{"index": g.index, "uuid": g.uuid, "bytes": g.bytes} for g in self.gpus],
            "exclusive": self.exclusive,
            "issued_at_ms": self.issued_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "kid": self.kid,
        }

    @classmethod
    def from_dict(cls, d: object) -> LeaseClaims:
        """Strict decoding: exactly the known fields, each of its type; anything else is LeaseInvalid."""
        if not isinstance(d, dict) or set(d) != _FIELDS:
            raise LeaseInvalid("lease payload does not have the lease fields")
        if d["v"] != VERSION:
            raise LeaseInvalid(f"lease version {d['v']!r} is not supported (this gpupool reads version {VERSION})")
        for name in ("id", "user", "server", "server_id", "kid"):
            if not isinstance(d[name], str) or (not d[name] and name != "kid"):
                raise LeaseInvalid(f"lease field {name!r} must be a non-empty string")
        for name in ("issued_at_ms", "expires_at_ms"):
            if not _is_int(d[name]) or d[name] < 0:
                raise LeaseInvalid(f"lease field {name!r} must be a non-negative integer")
        if not isinstance(d["exclusive"], bool):
            raise LeaseInvalid("lease field 'exclusive' must be a boolean")
        gpus = d["gpus"]
        if not isinstance(gpus, list) or not gpus:
            raise LeaseInvalid("lease field 'gpus' must be a non-empty list")
        out = []
        for g in gpus:
            if not isinstance(g, dict) or set(g) != _GPU_FIELDS:
                raise LeaseInvalid("each GPU of a lease needs exactly index, uuid and bytes")
            if not _is_int(g["index"]) or g["index"] < 0 or not _is_int(g["bytes"]) or g["bytes"] <= 0:
                raise LeaseInvalid("a leased GPU's index must be >= 0 and its bytes > 0")
            if not isinstance(g["uuid"], str):
                raise LeaseInvalid("a leased GPU's uuid must be a string")
            out.append(LeaseGpu(g["index"], g["uuid"], g["bytes"]))
        return cls(d["id"], d["user"], d["server"], d["server_id"], tuple(out), d["exclusive"],
                   d["issued_at_ms"], d["expires_at_ms"], d["kid"])


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def canonical(claims: LeaseClaims) -> bytes:
    """The one byte encoding of a lease's claims that is signed and verified."""
    return json.dumps(claims.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _b64d(s: str) -> bytes:
    if not s or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in s):
        raise LeaseInvalid("lease is not valid base64url text")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError) as e:
        raise LeaseInvalid("lease is not valid base64url text") from e


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def private_key_from_pem(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the controller's signing key is not an Ed25519 key")
    return key


def public_key_to_text(key: Ed25519PublicKey) -> str:
    """The public key as base64url of its 32 raw bytes: short enough for a flag or an env var."""
    return _b64e(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        raw = _b64d(text.strip())
        return Ed25519PublicKey.from_public_bytes(raw)
    except (LeaseInvalid, ValueError) as e:
        raise ValueError("not a gpupool controller public key (expected base64url of 32 bytes)") from e


def key_id(key: Ed25519PublicKey) -> str:
    """A short name for a public key, carried in each lease so a key mismatch reads clearly."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_lease(claims: LeaseClaims, key: Ed25519PrivateKey) -> str:
    """Sign `claims` (its `kid` is set to this key's id) and return the lease text."""
    claims = replace(claims, kid=key_id(key.public_key()))
    payload = canonical(claims)
    return f"{PREFIX}.{_b64e(payload)}.{_b64e(key.sign(payload))}"


def decode_lease(text: str) -> LeaseClaims:
    """Read a lease's claims WITHOUT checking its signature (for display only: never to grant access)."""
    claims, _, _ = _split(text)
    return claims


def _split(text: str) -> tuple[LeaseClaims, bytes, bytes]:
    if not isinstance(text, str) or len(text) > MAX_LEASE_TEXT:
        raise LeaseInvalid("lease is not text of at most 16 KiB")
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise LeaseInvalid(f"not a gpupool lease (expected '{PREFIX}.<payload>.<signature>')")
    payload, sig = _b64d(parts[1]), _b64d(parts[2])
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise LeaseInvalid("lease payload is not JSON") from e
    claims = LeaseClaims.from_dict(obj)
    return claims, payload, sig


def verify_lease(text: str, public_key: Ed25519PublicKey, now: float, server_id: str | None = None,
                 leeway_s: float = 0.0) -> LeaseClaims:
    """Check a lease text and return its claims.

    Raises LeaseInvalid (malformed), LeaseForged (bad signature, other key, non-canonical payload),
    LeaseExpired (`now` at or past expiry + `leeway_s`), LeaseWrongServer (`server_id` given and
    not the lease's). The signature is checked before anything in the payload is trusted. Whether
    the lease has ended early is not in the text: Note [Lease expiry].
    """
    claims, payload, sig = _split(text)
    try:
        public_key.verify(sig, payload)
    except InvalidSignature:
        kid = key_id(public_key)
        if claims.kid != kid:
            raise LeaseForged(f"lease {claims.id!r} was not signed by this controller "
                              f"(signed with key {claims.kid!r}, expected {kid!r})") from None
        raise LeaseForged(f"lease {claims.id!r} has an invalid signature: it was forged or altered") from None
    # Note: the payload must be the canonical encoding, so one set of claims has one signed text
    # (no re-ordered or re-spaced variants of a lease a filter might miss).
    if canonical(claims) != payload:
        raise LeaseForged(f"lease {claims.id!r} is not in canonical form")
    if now * 1000 >= claims.expires_at_ms + leeway_s * 1000:
        raise LeaseExpired(f"lease {claims.id!r} expired at {claims.expires_at:.3f} (now {now:.3f}): "
                           "it was not renewed in time; request a new one")
    if server_id is not None and claims.server_id != server_id:
        raise LeaseWrongServer(f"lease {claims.id!r} is for server {claims.server_id} (at {claims.server}), "
                               f"not for this one ({server_id}): connect to the server the lease names")
    return claims
