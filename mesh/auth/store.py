"""Identity files: the CA, each principal's keys and certificate, the revocation list.

One directory (``<MESH_HOME>/identity`` by default; on the gateway
``/etc/mesh/mosquitto/identity``, made by ``make-users.sh``)::

    ca.crt            the mesh CA's certificate: the trust anchor every process holds
    crl.pem           the CA-signed revocation list (may be absent: nothing revoked)
    <name>.crt        a principal's certificate
    <name>.key        its Ed25519 (signing) and X25519 (key agreement) private keys, two PEM blocks
    <name>.catalog-key  a node's copy of the mesh's catalog key (below); nodes only
    ca/ca.key         the CA's private key: only where identities are issued (the gateway, or the
                      one box of ``mesh up``)
    ca/catalog.key    the mesh's catalog key, beside the CA's

Everything is written mode 0600 in directories of mode 0700 (like the broker passwords), through a
temporary file and a rename, so a crash never leaves half a key.

The catalog key (review finding M1, ``mesh.cache.catalog``): 32 random bytes, one per mesh, that
key the Bloom filters of cache catalogs, so that only its holders can test a candidate prompt
against a catalog. The CA makes it and hands it with every identity of role ``node`` (they
publish and read catalogs) and to no other: the ``asker`` and ``coordinator`` identities never
get it, Home Assistant has no identity. It is a secret every node shares, so a node that is
stolen knows it: :func:`revoke` of an identity that held it makes a new one and hands it to every
other node identity in the directory (the old one then tests nothing the mesh publishes once the
nodes hold the new one). Text form: a ``MESH CATALOG KEY`` block of base64.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fcntl
import logging
import os
import secrets
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
CATALOG_KEY_BYTES = 32
CATALOG_KEY_ROLES = frozenset({"node"})  # who reads and publishes catalogs: the only holders of the key
_CK_BEGIN, _CK_END = b"-----BEGIN MESH CATALOG KEY-----", b"-----END MESH CATALOG KEY-----"


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


def catalog_key_path(directory: Path, name: str | None = None) -> Path:
    """The CA's catalog key (``name`` None) or ``name``'s copy of it."""
    return directory / "ca" / "catalog.key" if name is None else directory / f"{name}.catalog-key"


def read_catalog_key(path: Path) -> bytes | None:
    """A catalog key file's 32 bytes; None if there is none; ConfigError if it is damaged."""
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path} is not readable: {exc}") from exc
    if not (text.startswith(_CK_BEGIN) and text.endswith(_CK_END)):
        raise ConfigError(f"{path} is not a mesh catalog key")
    try:
        secret = base64.b64decode(text[len(_CK_BEGIN):-len(_CK_END)].strip(), validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"{path} is not a mesh catalog key: {exc}") from exc
    if len(secret) != CATALOG_KEY_BYTES:
        raise ConfigError(f"{path} holds {len(secret)} bytes, not a {CATALOG_KEY_BYTES}-byte catalog key")
    return secret


def _write_catalog_key(path: Path, secret: bytes) -> None:
    _write(path, _CK_BEGIN + b"\n" + base64.b64encode(secret) + b"\n" + _CK_END + b"\n")


def _mesh_catalog_key(directory: Path, new: bool = False) -> bytes:
    """The CA's catalog key, made on first use (``new``: a new one in any case). Holding the issuer
    lock, where the CA's key is."""
    path = catalog_key_path(directory)
    secret = None if new else read_catalog_key(path)
    if secret is None:
        secret = secrets.token_bytes(CATALOG_KEY_BYTES)
        _write_catalog_key(path, secret)
        log.info("made a new mesh catalog key in %s", path)
    return secret


def _hand_catalog_key(directory: Path, ident: Identity, crl: x509.CertificateRevocationList | None) -> bool:
    """Give ``ident`` the CA's current catalog key if its role takes one and it is not revoked;
    remove a copy it must not hold. Holding the issuer lock. Returns whether it holds one."""
    path = catalog_key_path(directory, ident.name)
    revoked = crl is not None and crl.get_revoked_certificate_by_serial_number(ident.serial) is not None
    if ident.role not in CATALOG_KEY_ROLES or revoked:
        path.unlink(missing_ok=True)
        return False
    secret = _mesh_catalog_key(directory)
    try:
        held = read_catalog_key(path)
    except ConfigError:
        held = None  # damaged: written anew
    if held != secret:
        _write_catalog_key(path, secret)
    return True


def catalog_key_holders(directory: Path) -> list[str]:
    """The identities in ``directory`` that hold a copy of the catalog key (a node's files to copy)."""
    return sorted(p.name.removesuffix(".catalog-key") for p in Path(directory).glob("*.catalog-key"))


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
    _write_catalog_key(catalog_key_path(directory), secrets.token_bytes(CATALOG_KEY_BYTES))
    log.info("made a new mesh CA and catalog key in %s", directory)
    return ca


def issue(directory: Path, name: str, role: str, days: int = DEFAULT_DAYS, renew: bool = False) -> Identity:
    """``name``'s identity, issued by the CA in ``directory`` unless a usable one is there already
    (``renew``: always a new one; the old certificate stays valid until revoked). A node identity
    gets the current catalog key too, an old one included (that is how a re-run of
    ``make-users.sh`` hands out a key made since)."""
    with _issuing(directory):
        ca = init_ca(directory)
        ident = None
        if not renew and (directory / f"{name}.crt").exists():
            ident = load_identity(directory, name, ca.cert)
            if ident.role != role:
                log.info("identity %s has role %s, not %s: issuing a new one", name, ident.role, role)
                ident = None
        if ident is None:
            ident = ca.issue(name, role, days)
            save_identity(directory, ident)
        _hand_catalog_key(directory, ident, load_crl(directory, ca.cert))
        return ident


def _rotate_catalog_key(directory: Path, crl: x509.CertificateRevocationList | None) -> list[str]:
    """A new catalog key, handed to every unrevoked node identity that held the old one; returns them."""
    ca_cert = load_ca_cert(directory)
    _mesh_catalog_key(directory, new=True)
    rekeyed = []
    for name in catalog_key_holders(directory):
        try:
            ident = load_identity(directory, name, ca_cert)
        except ConfigError:
            catalog_key_path(directory, name).unlink(missing_ok=True)  # no usable identity beside it
            continue
        if _hand_catalog_key(directory, ident, crl):
            rekeyed.append(name)
    return rekeyed


def rotate_catalog_key(directory: Path) -> list[str]:
    """A new catalog key for the mesh (:func:`revoke` does it when it revokes a holder); returns
    the node identities that got it: copy each one's ``NAME.catalog-key`` to that node."""
    with _issuing(directory):
        ca = init_ca(directory)
        return _rotate_catalog_key(directory, load_crl(directory, ca.cert))


def revoke(directory: Path, name: str) -> x509.CertificateRevocationList:
    """Add ``name``'s current certificate to the CA's revocation list (``crl.pem``); returns it.
    Hand the new ``crl.pem`` to every device (``Keyring.update_crl`` takes it from anyone).

    If ``name`` held the catalog key (a node: a stolen Pi knows it), the catalog key is rotated
    too: a new one for every other node identity here (:func:`catalog_key_holders`: copy each
    one's ``NAME.catalog-key`` with the CRL); until a node holds it, it shares no KV with those
    that do (its catalog and theirs are keyed apart), and nothing it holds answers the thief."""
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
        if catalog_key_path(directory, name).exists():
            rekeyed = _rotate_catalog_key(directory, crl)
            log.warning("%s held the catalog key: a new one is made; copy NAME.catalog-key to %s",
                        name, ", ".join(rekeyed) or "no other node")
        return crl


def load_keyring(directory: Path, name: str, role: str = "node", enrol: bool = True) -> Keyring | None:
    """The keyring of ``name`` from ``directory``: its own identity if there; else, with ``enrol``
    and the CA's key at hand (one box: ``mesh up``), a new identity issued on the spot; else None
    (no identity: this process runs unauthenticated, and every process that holds keys refuses
    what it sends). A node's keyring holds its copy of the catalog key, if it has one (on one box,
    the CA's current one is handed to it first)."""
    directory = Path(directory)
    one_box = enrol and has_ca_key(directory)
    if not (directory / f"{name}.crt").exists():
        if not one_box:
            return None
        issue(directory, name, role)
    ca = load_ca_cert(directory)
    ident = load_identity(directory, name, ca)
    crl = load_crl(directory, ca)
    catalog = None
    if ident.role in CATALOG_KEY_ROLES:
        if one_box:  # an identity issued before catalog keys, or before a rotation: the current one
            with _issuing(directory):
                _hand_catalog_key(directory, ident, load_crl(directory, ca))
        catalog = read_catalog_key(catalog_key_path(directory, name))
    return Keyring(ident, ca, crl, catalog_key=catalog)
