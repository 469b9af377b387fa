"""The pool's own certificate authority: a CA and the certificates it issues to servers.

`gpupool up` makes a CA in the pool's home directory (`ca.pem`, and `ca-key.pem` readable by
its owner only) and a certificate for each listener it starts; `gpupool cert` issues one for a
server on another host. Clients trust the CA (`GPUPOOL_CA`), not each leaf, so a certificate
can be reissued without touching a client (Note [Certificate rotation] in tls.py).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: A leaf's lifetime; `gpupool up` issues new ones at each start, `gpupool cert` on demand.
LEAF_DAYS = 90
CA_DAYS = 3650


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically (a reader never sees half a file), keys 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str = "gpupool pool CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Authority(cert, key)


def load_or_make_ca(directory: Path) -> Authority:
    """The CA kept in `directory` (ca.pem, ca-key.pem), made there on first use."""
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not the EC key gpupool makes")
        return Authority(cert, key)
    ca = make_ca()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # the pool's home: its owner's only
    _write(key_path, _key_pem(ca.key), private=True)
    _write(cert_path, ca.pem, private=False)
    return ca


def issue(ca: Authority, names: list[str], days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
    """A server certificate for `names` (host names and IP addresses): (cert PEM, key PEM)."""
    if not names:
        raise ValueError("a certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_leaf(ca: Authority, names: list[str], cert_path: Path, key_path: Path) -> None:
    """Issue a certificate for `names` into the two files: the key first, each file replaced
    atomically, so a server reloading them (Note [Certificate rotation]) never reads a torn pair
    for long (it keeps its old pair until both load)."""
    cert, key = issue(ca, names)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write(key_path, key, private=True)
    _write(cert_path, cert + ca.pem, private=False)
