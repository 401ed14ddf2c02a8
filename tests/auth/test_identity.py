"""The auth library on its own: certificates, revocation, sealed envelopes, pair keys, files."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from mesh import topics, wire
from mesh.auth import pairs, seal, store
from mesh.auth.certs import CertificateAuthority, verify_peer
from mesh.auth.keyring import Keyring
from tests.auth.kit import reason, ring
from mesh.errors import ConfigError, ProtocolError

UTC = datetime.timezone.utc
DER = Encoding.DER




def heartbeat(sender: str) -> wire.Envelope:
    return wire.Envelope(wire.Kind.HEARTBEAT, sender, {"seq": 1, "model": "m", "model_key": "k", "queue": 0,
                                                        "load": 0.0, "prefill_tps": 1.0})


def test_issue_and_verify_chain(ca: CertificateAuthority) -> None:
    ident = ca.issue("pi1", "node")
    peer = verify_peer(ident.cert_der, ca.cert, None)
    assert (peer.name, peer.role, peer.serial) == ("pi1", "node", ident.serial)
    assert peer.verify_key.public_bytes_raw() == ident.signing_key.public_key().public_bytes_raw()
    assert peer.exchange_key == ident.exchange_key.public_key().public_bytes_raw()
    assert 200 < len(ident.cert_der) <= 400  # small enough to travel attached to every sealed message
    with pytest.raises(ConfigError):
        ca.issue("pi1", "admin")
    with pytest.raises(ConfigError):
        ca.issue("pi/1", "node")


def test_expired_and_not_yet_valid(ca: CertificateAuthority) -> None:
    old = ca.issue("old", "node", days=1, not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC))
    assert reason(verify_peer, old.cert_der, ca.cert, None) == "cert-expired"
    future = ca.issue("later", "node", not_before=datetime.datetime.now(UTC) + datetime.timedelta(days=2))
    assert reason(verify_peer, future.cert_der, ca.cert, None) == "cert-not-yet-valid"


def test_wrong_ca_and_garbage(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    assert reason(verify_peer, other.issue("pi1", "node").cert_der, ca.cert, None) == "wrong-ca"
    assert reason(verify_peer, b"\x30\x03abc", ca.cert, None) == "bad-cert"
    assert reason(verify_peer, b"x" * 5000, ca.cert, None) == "bad-cert"
    der = bytearray(ca.issue("pi1", "node").cert_der)
    der[60] ^= 1  # inside the signed part (the serial/validity): the CA's signature no longer fits
    assert reason(verify_peer, bytes(der), ca.cert, None) in ("wrong-ca", "bad-cert")


def test_revoked_by_a_ca_signed_crl(ca: CertificateAuthority) -> None:
    thief, honest = ring(ca, "stolen"), ring(ca, "pi2")
    receiver = ring(ca, "pi3")
    topic = topics.reply("pi3")
    assert receiver.open(thief.seal(b"before", topic), topic).inner == b"before"
    crl = ca.revocation_list({thief.identity.serial: datetime.datetime.now(UTC)}, number=1)
    der = crl.public_bytes(DER)
    assert receiver.update_crl(der)
    assert reason(receiver.open, thief.seal(b"after", topic), topic) == "cert-revoked"
    assert receiver.open(honest.seal(b"fine", topic), topic).inner == b"fine"
    assert reason(receiver.pair_key, verify_peer(thief.identity.cert_der, ca.cert, None)) == "cert-revoked"
    # An older (or equal) list cannot replace it; a list from another CA is refused.
    empty = ca.revocation_list({}, number=1).public_bytes(
        DER)
    assert not receiver.update_crl(empty)
    assert reason(receiver.open, thief.seal(b"again", topic), topic) == "cert-revoked"
    forged = CertificateAuthority.create().revocation_list({}, number=99).public_bytes(
        DER)
    assert reason(receiver.update_crl, forged) == "bad-crl"


def test_seal_open_and_tampering(ca: CertificateAuthority) -> None:
    a, b = ring(ca, "pi1"), ring(ca, "pi2")
    topic = topics.node_heartbeat("pi1")
    sealed = a.seal_envelope(heartbeat("pi1"), topic)
    opened, env = b.open_envelope(sealed, topic)
    assert opened.sender.name == "pi1" and env.sender == "pi1" and env.body["seq"] == 1
    for i in (10, len(sealed) // 2, len(sealed) - 70, len(sealed) - 1):  # header, cert, inner, signature
        bad = bytearray(sealed)
        bad[i] ^= 0x40
        assert reason(b.open, bytes(bad), topic) in ("bad-signature", "bad-cert", "wrong-ca", "malformed")
    assert reason(b.open, sealed[:-1], topic) in ("bad-signature", "malformed")
    other = topics.reply("pi2")  # the same bytes re-posted on another topic
    assert reason(b.open, a.seal(b"x", topic), other) == "bad-signature"


def test_unauthenticated_and_strangers(ca: CertificateAuthority) -> None:
    b = ring(ca, "pi2")
    topic = topics.reply("pi2")
    plain = wire.encode(heartbeat("pi1"))  # a process holding no key sends plain CBOR
    assert reason(b.open, plain, topic) == "unauthenticated"
    stranger = Keyring(CertificateAuthority.create().issue("pi1", "node"), ca.cert)
    assert reason(b.open, stranger.seal(b"hi", topic), topic) == "wrong-ca"


def test_name_mismatch_between_certificate_and_sender_or_topic(ca: CertificateAuthority) -> None:
    a, b = ring(ca, "pi1"), ring(ca, "pi2")
    # pi1 publishing on pi3's own heartbeat topic
    topic = topics.node_heartbeat("pi3")
    assert reason(b.open, a.seal(wire.encode(heartbeat("pi1")), topic), topic) == "name-mismatch"
    # pi1 sealing an envelope that claims pi3 as its sender
    reply = topics.reply("pi2")
    assert reason(b.open_envelope, a.seal(wire.encode(heartbeat("pi3")), reply), reply) == "name-mismatch"
    with pytest.raises(ProtocolError):
        a.seal_envelope(heartbeat("pi3"), reply)
    assert reason(b.peer, a.identity.cert_der, expect_name="pi3") == "name-mismatch"
    # a plan only from a coordinator
    assert reason(b.open, a.seal(b"plan", topics.HALO_PLAN), topics.HALO_PLAN, True) == "wrong-role"
    coord = ring(ca, "coordinator", "coordinator")
    assert b.open(coord.seal(b"plan", topics.HALO_PLAN), topics.HALO_PLAN, True).inner == b"plan"


def test_replay_and_stale(ca: CertificateAuthority) -> None:
    a, b = ring(ca, "pi1"), ring(ca, "pi2")
    topic = topics.reply("pi2")
    sealed = a.seal(b"once", topic)
    b.open(sealed, topic)
    assert reason(b.open, sealed, topic) == "replayed"
    assert b.open(sealed, topic, retained=True).inner == b"once"  # a retained redelivery
    guard = seal.ReplayGuard(window_ms=1000, remembered=4)
    guard.check("x", 10_000, b"a")
    guard.check("x", 9_500, b"b")  # out of order within the window: fine
    with pytest.raises(ProtocolError, match="stale"):
        guard.check("x", 8_000, b"c")
    for i in range(6):
        guard.check("x", 10_001 + i, bytes([i]))
    with pytest.raises(ProtocolError, match="stale"):  # forgotten beyond the bound: refused, not re-accepted
        guard.check("x", 10_001, b"\x00")


def test_pair_keys_agree_per_pair(ca: CertificateAuthority) -> None:
    c, w1, w2 = ring(ca, "coordinator", "coordinator"), ring(ca, "w1"), ring(ca, "w2")
    k1 = c.pair_key(c.peer(w1.identity.cert_der))
    assert k1 == w1.pair_key(w1.peer(c.identity.cert_der)) and len(k1) == 32
    assert k1 != c.pair_key(c.peer(w2.identity.cert_der))
    t = pairs.tag(k1, b"frame", b"halo-partial")
    assert len(t) == pairs.TAG_BYTES and pairs.tag_ok(k1, b"frame", b"halo-partial", t)
    assert not pairs.tag_ok(k1, b"frame", b"halo-mlp", t)
    assert not pairs.tag_ok(k1, b"framf", b"halo-partial", t)
    with pytest.raises(ProtocolError):
        c.pair_key(c.peer(c.identity.cert_der))


def test_files_modes_reuse_revoke_and_enrol(tmp_path) -> None:
    d = store.identity_dir(tmp_path)
    ca = store.init_ca(d)
    assert store.init_ca(d).cert == ca.cert  # reused
    ident = store.issue(d, "pi1", "node")
    assert store.issue(d, "pi1", "node").serial == ident.serial  # kept unless renewed
    for path in [*d.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    keys = store.load_keyring(d, "pi1")
    assert keys is not None and keys.identity.serial == ident.serial
    other = store.load_keyring(d, "pi2")  # the CA key is here (one box): enrolled on the spot
    assert other is not None and other.open(keys.seal(b"x", "t/x"), "t/x").sender.name == "pi1"
    store.revoke(d, "pi1")
    assert reason(store.load_keyring(d, "pi3").open, keys.seal(b"y", "t/y"), "t/y") == "cert-revoked"
    (d / "ca" / "ca.key").unlink()
    assert store.load_keyring(d, "pi4") is None  # no identity, no CA key: unauthenticated
    (d / "pi2.key").write_bytes((d / "pi3.key").read_bytes())
    with pytest.raises(ConfigError):
        store.load_keyring(d, "pi2")
