"""Identity files: the CA, each principal's keys and certificate, the revocation list.

One directory (``<MESH_HOME>/identity`` by default; on the gateway
``/etc/mesh/mosquitto/identity``, made by ``make-users.sh``)::

    ca.crt            the mesh CA's certificate: the trust anchor every process holds
    crl.pem           the CA-signed revocation list (may be absent: nothing revoked)
    <name>.crt        a principal's certificate
    <name>.key        its Ed25519 (signing) and X25519 (key agreement) private keys, two PEM blocks
    ca/ca.key         the CA's private key: only where identities are issued (the gateway, or the
                      one box of ``mesh up``)

Everything is written mode 0600 in directories of mode 0700 (like the broker passwords), through a
temporary file and a rename, so a crash never leaves half a key.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from mesh.auth.certs import DEFAULT_DAYS, CertificateAuthority, Identity, check_crl, crl_number, verify_peer
from mesh.auth.keyring import Keyring
from mesh.config import check_name
from mesh.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

_PEM, _PKCS8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
_END = b"-----END PRIVATE KEY-----"


def identity_dir(home: Path) -> Path:
    return Path(home) / "identity"


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _write(path: Path, data: bytes) -> None:
    """``data`` to ``path`` with mode 0600, atomically."""
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(_PEM, _PKCS8, serialization.NoEncryption())


def save_identity(directory: Path, ident: Identity) -> None:
    _write(directory / f"{ident.name}.key", _key_pem(ident.signing_key) + _key_pem(ident.exchange_key))
    _write(directory / f"{ident.name}.crt", ident.cert.public_bytes(_PEM))


def load_identity(directory: Path, name: str, ca: x509.Certificate) -> Identity:
    """``name``'s identity from ``directory``, checked against ``ca`` (ConfigError if unusable)."""
    check_name(name)
    try:
        blocks = [b + _END for b in (directory / f"{name}.key").read_bytes().split(_END) if b.strip()]
        keys = [serialization.load_pem_private_key(b, None) for b in blocks]
        cert_pem = (directory / f"{name}.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        peer = verify_peer(cert.public_bytes(serialization.Encoding.DER), ca, None, expect_name=name)
    except (OSError, ValueError, ProtocolError) as exc:
        raise ConfigError(f"identity {name!r} in {directory} is not usable: {exc}") from exc
    signing = next((k for k in keys if isinstance(k, ed25519.Ed25519PrivateKey)), None)
    exchange = next((k for k in keys if isinstance(k, x25519.X25519PrivateKey)), None)
    if signing is None or exchange is None or signing.public_key() != peer.verify_key \
            or exchange.public_key().public_bytes_raw() != peer.exchange_key:
        raise ConfigError(f"{directory / (name + '.key')} does not hold the keys of {name}.crt")
    return Identity(name, peer.role, signing, exchange, cert)


def load_ca_cert(directory: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no mesh CA certificate in {directory}: {exc}") from exc


def load_crl(directory: Path, ca: x509.Certificate) -> x509.CertificateRevocationList | None:
    path = directory / "crl.pem"
    if not path.exists():
        return None
    try:
        der = x509.load_pem_x509_crl(path.read_bytes()).public_bytes(serialization.Encoding.DER)
        return check_crl(der, ca)
    except (ValueError, ProtocolError) as exc:
        raise ConfigError(f"{path} is not a revocation list of this CA: {exc}") from exc


@contextmanager
def _issuing(directory: Path) -> Iterator[None]:
    """One issuer at a time per directory: processes of one box enrol at once (``mesh up``, a test
    suite), and a key written by one beside a certificate written by another would not load."""
    _private_dir(directory)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def has_ca_key(directory: Path) -> bool:
    return (directory / "ca" / "ca.key").exists()


def init_ca(directory: Path, days: int = 3650) -> CertificateAuthority:
    """The CA kept in ``directory`` (made on first use, reused afterwards)."""
    key_path = directory / "ca" / "ca.key"
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{key_path} is not an Ed25519 key")
        ca = CertificateAuthority(key, load_ca_cert(directory))
        if ca.cert.public_key() != key.public_key():
            raise ConfigError(f"{key_path} does not match {directory / 'ca.crt'}")
        return ca
    if (directory / "ca.crt").exists():
        raise ConfigError(f"{directory} holds a CA certificate without its key: its identities are issued "
                          "elsewhere (the gateway's make-users.sh), not here")
    ca = CertificateAuthority.create(days)
    _write(key_path, _key_pem(ca.key))
    _write(directory / "ca.crt", ca.cert.public_bytes(_PEM))
    log.info("made a new mesh CA in %s", directory)
    return ca


def issue(directory: Path, name: str, role: str, days: int = DEFAULT_DAYS, renew: bool = False) -> Identity:
    """``name``'s identity, issued by the CA in ``directory`` unless a usable one is there already
    (``renew``: always a new one; the old certificate stays valid until revoked)."""
    with _issuing(directory):
        ca = init_ca(directory)
        if not renew and (directory / f"{name}.crt").exists():
            ident = load_identity(directory, name, ca.cert)
            if ident.role == role:
                return ident
            log.info("identity %s has role %s, not %s: issuing a new one", name, ident.role, role)
        ident = ca.issue(name, role, days)
        save_identity(directory, ident)
        return ident


def revoke(directory: Path, name: str) -> x509.CertificateRevocationList:
    """Add ``name``'s current certificate to the CA's revocation list (``crl.pem``); returns it.
    Hand the new ``crl.pem`` to every device (``Keyring.update_crl`` takes it from anyone)."""
    with _issuing(directory):
        ca = init_ca(directory)
        try:
            cert = x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no certificate of {name!r} in {directory}") from exc
        old = load_crl(directory, ca.cert)
        revoked = {r.serial_number: r.revocation_date_utc for r in (old or [])}
        revoked.setdefault(cert.serial_number, datetime.datetime.now(datetime.timezone.utc))
        crl = ca.revocation_list(revoked, (crl_number(old) if old is not None else 0) + 1)
        _write(directory / "crl.pem", crl.public_bytes(_PEM))
        return crl


def load_keyring(directory: Path, name: str, role: str = "node", enrol: bool = True) -> Keyring | None:
    """The keyring of ``name`` from ``directory``: its own identity if there; else, with ``enrol``
    and the CA's key at hand (one box: ``mesh up``), a new identity issued on the spot; else None
    (no identity: this process runs unauthenticated, and every process that holds keys refuses
    what it sends)."""
    directory = Path(directory)
    ident = None
    if not (directory / f"{name}.crt").exists():
        if not (enrol and has_ca_key(directory)):
            return None
        ident = issue(directory, name, role)
    ca = load_ca_cert(directory)
    return Keyring(ident or load_identity(directory, name, ca), ca, load_crl(directory, ca))
