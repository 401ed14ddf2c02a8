"""The mesh's own certificate authority: X.509 certificates and a revocation list, Ed25519 throughout.

The gateway's tooling (``mesh identity``, ``deploy/mosquitto/make-users.sh``) is the CA; it issues
one identity per broker account (each node, ``coordinator``, ``asker``) and a CA-signed CRL that
lists stolen or retired ones. Every receiver checks a sender's certificate with
:func:`verify_peer` against the CA certificate and the CRL it holds.

A certificate (X.509 v3, DER, built and checked by ``cryptography``, never by hand)::

    subject      CN = the principal's name (its broker username and its ``sender`` on the wire),
                 OU = its role (ROLES)
    public key   Ed25519: it signs sealed envelopes (``mesh.auth.seal``)
    extension    KX_OID (non-critical): the principal's X25519 public key, raw 32 bytes; pairs
                 agree their hot-path MAC key from it (``mesh.auth.pairs``)
    basicConstraints CA:FALSE, keyUsage digitalSignature + keyAgreement

Why X.509 rather than a small CBOR certificate: ``cryptography`` parses, checks issuer, signature,
validity and CRLs in audited code, operators inspect the files with ``openssl x509 -text`` and
``openssl crl -text``, and the ~290-byte DER is small enough to travel attached to every sealed
message. A CBOR certificate would save ~100 bytes at the price of a format and a revocation
scheme of our own.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.x509.oid import NameOID

from mesh.config import check_name
from mesh.errors import ConfigError, ProtocolError

ROLES = ("node", "coordinator", "asker")
# 2.25.<uuid>: an OID minted from a UUID (ITU-T X.667), no registration needed.
KX_OID = x509.ObjectIdentifier("2.25.197302381744627129618318263839418866921")
CA_NAME = "mesh CA"
DEFAULT_DAYS = 1825
MAX_CERT_BYTES = 1024  # ours are ~290 bytes; anything far larger is not ours


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Peer:
    """A sender whose certificate checked out: what a receiver may rely on."""

    name: str
    role: str
    serial: int
    verify_key: ed25519.Ed25519PublicKey
    exchange_key: bytes  # raw X25519 public key
    not_after: datetime.datetime
    fingerprint: bytes  # BLAKE2b-256 of the DER: the cache key of verified certificates


@dataclass(frozen=True)
class Identity:
    """A principal's own keys and certificate (what a process signs and agrees keys with)."""

    name: str
    role: str
    signing_key: ed25519.Ed25519PrivateKey
    exchange_key: x25519.X25519PrivateKey
    cert: x509.Certificate

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def _name(cn: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name(attrs)


@dataclass(frozen=True)
class CertificateAuthority:
    """The gateway's CA key and certificate; issues identities and signs revocation lists."""

    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, days: int = 3650) -> "CertificateAuthority":
        key = ed25519.Ed25519PrivateKey.generate()
        now = _now()
        name = _name(CA_NAME)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, None))
        return cls(key, cert)

    def issue(self, name: str, role: str, days: int = DEFAULT_DAYS,
              not_before: datetime.datetime | None = None) -> Identity:
        """A new identity (fresh keys) for ``name`` in ``role``; ``not_before`` for tests of expiry."""
        check_name(name)
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        signing, exchange = ed25519.Ed25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        start = not_before or _now() - datetime.timedelta(hours=1)
        cert = (x509.CertificateBuilder().subject_name(_name(name, role)).issuer_name(self.cert.subject)
                .public_key(signing.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.UnrecognizedExtension(KX_OID, exchange.public_key().public_bytes_raw()),
                               critical=False)
                .sign(self.key, None))
        return Identity(name, role, signing, exchange, cert)

    def revocation_list(self, revoked: dict[int, datetime.datetime], number: int,
                        days: int = 3650) -> x509.CertificateRevocationList:
        """A CRL of ``revoked`` (serial -> revocation time), numbered ``number`` (receivers keep the
        highest number they saw, so an old list cannot be replayed over a newer one)."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - datetime.timedelta(minutes=5)).next_update(now + datetime.timedelta(days=days))
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        return builder.sign(self.key, None)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def check_crl(crl_der: bytes, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """Untrusted CRL bytes -> the CRL, if the CA signed it; ProtocolError otherwise."""
    try:
        crl = x509.load_der_x509_crl(crl_der)
    except ValueError as exc:
        raise ProtocolError("bad-crl", "not a DER CRL") from exc
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise ProtocolError("bad-crl", "CRL not signed by the mesh CA")
    return crl


def fingerprint(der: bytes) -> bytes:
    return hashlib.blake2b(der, digest_size=32).digest()


def verify_peer(der: bytes, ca: x509.Certificate, crl: x509.CertificateRevocationList | None,
                now: datetime.datetime | None = None, expect_name: str | None = None) -> Peer:
    """Untrusted certificate bytes -> the Peer they certify, or ProtocolError with a counted reason:
    ``bad-cert`` (not ours), ``wrong-ca``, ``cert-expired``, ``cert-not-yet-valid``,
    ``cert-revoked``, ``name-mismatch``."""
    if len(der) > MAX_CERT_BYTES:
        raise ProtocolError("bad-cert", f"certificate of {len(der)} bytes")
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise ProtocolError("bad-cert", "not a DER certificate") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProtocolError("wrong-ca", "certificate not issued by the mesh CA") from exc
    at = now or _now()
    if at > cert.not_valid_after_utc:
        raise ProtocolError("cert-expired", f"expired {cert.not_valid_after_utc.isoformat()}")
    if at < cert.not_valid_before_utc:
        raise ProtocolError("cert-not-yet-valid", f"valid from {cert.not_valid_before_utc.isoformat()}")
    if crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise ProtocolError("cert-revoked", f"serial {cert.serial_number:x}")
    try:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        name, role = check_name(str(cn[0].value)), str(ou[0].value)
        kx = cert.extensions.get_extension_for_oid(KX_OID).value.value  # type: ignore[attr-defined]
        key = cert.public_key()
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (IndexError, ConfigError, x509.ExtensionNotFound) as exc:
        raise ProtocolError("bad-cert", "certificate lacks a name, role or exchange key") from exc
    if role not in ROLES or basic.ca or not isinstance(key, ed25519.Ed25519PublicKey) or len(kx) != 32:
        raise ProtocolError("bad-cert", "certificate role, key type or exchange key")
    if expect_name is not None and name != expect_name:
        raise ProtocolError("name-mismatch", f"certificate of {name!r}, claimed {expect_name!r}")
    return Peer(name, role, cert.serial_number, key, bytes(kx), cert.not_valid_after_utc, fingerprint(der))
