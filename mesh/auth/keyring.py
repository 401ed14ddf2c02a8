"""A process's keys and trust: seal what it sends, open what it receives, agree pair keys.

One :class:`Keyring` per process (node, coordinator, CLI), built at the edge from the identity
files (``mesh.auth.store.load_keyring``) and handed to whatever sends or receives. Every method is
thread-safe (the network thread opens, other threads seal). See ``mesh/auth/README.md`` for how
each sender and receiver calls it.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh import topics, wire
from mesh.auth import pairs, seal
from mesh.auth.certs import Identity, Peer, check_crl, crl_number, fingerprint, verify_peer
from mesh.errors import ProtocolError

MAX_PEERS = 1024  # verified certificates kept (by fingerprint)
# Per-node topics only their node may publish (the ACL says so on Mosquitto; the signature says
# so everywhere, amqtt included). Inboxes (ask, kv) are written by others.
_OWNED = {topics.STATUS.name, topics.HEARTBEAT.name, topics.CATALOG.name, topics.NODE_STATE.name,
          topics.NODE_MLP.name}
# Topics only a principal of one role may publish.
_ROLE_OF_TOPIC = {topics.HALO_PLAN: "coordinator"}


def topic_owner(topic: str) -> str | None:
    """The node a per-node topic belongs to, if only that node may publish on it."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:3]) == f"{topics.ROOT}/node" and parts[4] in _OWNED:
        return parts[3]
    return None


@dataclass(frozen=True)
class Opened:
    """A sealed message whose signature, certificate and freshness checked out."""

    sender: Peer
    inner: bytes
    ts_ms: int


class Keyring:
    def __init__(self, identity: Identity, ca: x509.Certificate, crl: x509.CertificateRevocationList | None = None,
                 window_ms: int = seal.REPLAY_WINDOW_MS, max_bytes: int = wire.DEFAULT_MAX_BYTES + 4096,
                 catalog_key: bytes | None = None) -> None:
        """``catalog_key``: the mesh-wide secret that keys cache catalogs (``mesh.cache.catalog``);
        the CA hands it to node identities only (``mesh.auth.store``), None elsewhere."""
        self.identity, self.ca, self.max_bytes = identity, ca, max_bytes
        self.catalog_key = catalog_key
        self._crl = crl
        self._lock = threading.Lock()
        self._peers: OrderedDict[bytes, Peer] = OrderedDict()
        self._pair_keys: dict[tuple[str, int], bytes] = {}
        self.guard = seal.ReplayGuard(window_ms)

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def crl(self) -> x509.CertificateRevocationList | None:
        return self._crl

    # -- sending ----------------------------------------------------------------------------------
    def seal(self, inner: bytes, topic: str) -> bytes:
        """``inner`` signed for publication on ``topic``, with this process's certificate."""
        body = seal.pack(self.identity.cert_der, inner, time.time_ns() // 1_000_000)
        return body + self.identity.signing_key.sign(seal.signed_bytes(topic, body))

    def seal_envelope(self, env: wire.Envelope, topic: str, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> bytes:
        """``wire.encode(env)`` sealed; the envelope's sender must be this identity's name."""
        if env.sender != self.name:
            raise ProtocolError("name-mismatch", f"sealing {env.sender!r}'s envelope as {self.name!r}")
        return self.seal(wire.encode(env, max_bytes), topic)

    # -- receiving --------------------------------------------------------------------------------
    def open(self, payload: bytes, topic: str, retained: bool = False) -> Opened:
        """Untrusted sealed bytes received on ``topic`` -> Opened, or ProtocolError with a counted
        reason: ``unauthenticated`` (not sealed: a process without a key), ``malformed``,
        ``bad-version``, ``oversized``, the certificate's reasons (``mesh.auth.certs.verify_peer``),
        ``bad-signature``, ``name-mismatch`` (a per-node topic of another node), ``wrong-role``,
        ``stale`` or ``replayed``."""
        parsed = seal.parse(payload, self.max_bytes)
        peer = self.peer(parsed.cert)
        try:
            peer.verify_key.verify(parsed.signature, seal.signed_bytes(topic, parsed.signed))
        except InvalidSignature:
            raise ProtocolError("bad-signature", f"from {peer.name!r} on {topic[:80]}") from None
        owner = topic_owner(topic)
        if owner is not None and owner != peer.name:
            raise ProtocolError("name-mismatch", f"{peer.name!r} on {owner!r}'s topic")
        role = _ROLE_OF_TOPIC.get(topic)
        if role is not None and peer.role != role:
            raise ProtocolError("wrong-role", f"{peer.name!r} ({peer.role}) on {topic}")
        if not retained:
            self.guard.check(peer.name, parsed.ts_ms, parsed.nonce)
        return Opened(peer, parsed.inner, parsed.ts_ms)

    def open_envelope(self, payload: bytes, topic: str, max_bytes: int = wire.DEFAULT_MAX_BYTES,
                      retained: bool = False) -> tuple[Opened, wire.Envelope]:
        """:meth:`open`, then ``wire.decode`` of the inner bytes, whose ``sender`` must be the
        certificate's name (``name-mismatch``)."""
        opened = self.open(payload, topic, retained)
        env = wire.decode(opened.inner, max_bytes)
        if env.sender != opened.sender.name:
            raise ProtocolError("name-mismatch", f"envelope of {env.sender!r} sealed by {opened.sender.name!r}")
        return opened, env

    def peer(self, cert_der: bytes, expect_name: str | None = None) -> Peer:
        """A certificate -> its Peer (cached once verified; the cache is emptied by a new CRL)."""
        fp = fingerprint(cert_der)
        with self._lock:
            cached = self._peers.get(fp)
            if cached is not None:
                self._peers.move_to_end(fp)
        if cached is not None:
            if datetime.datetime.now(datetime.timezone.utc) > cached.not_after:
                raise ProtocolError("cert-expired", cached.name)
            if expect_name is not None and cached.name != expect_name:
                raise ProtocolError("name-mismatch", f"certificate of {cached.name!r}, claimed {expect_name!r}")
            return cached
        peer = verify_peer(cert_der, self.ca, self._crl, expect_name=expect_name)
        with self._lock:
            self._peers[fp] = peer
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
        return peer

    def update_crl(self, crl_der: bytes) -> bool:
        """A revocation list from anyone (it is self-authenticating): adopted if the CA signed it and
        its number is higher than the one held. Every cached certificate and pair key is then
        checked again on next use. Returns whether it was adopted."""
        crl = check_crl(crl_der, self.ca)
        with self._lock:
            if self._crl is not None and crl_number(crl) <= crl_number(self._crl):
                return False
            self._crl = crl
            self._peers.clear()
            self._pair_keys.clear()
        return True

    def revoked(self, peer: Peer) -> bool:
        crl = self._crl
        return crl is not None and crl.get_revoked_certificate_by_serial_number(peer.serial) is not None

    # -- pairs ------------------------------------------------------------------------------------
    def pair_key(self, peer: Peer) -> bytes:
        """The MAC key shared with ``peer`` (``mesh.auth.pairs``), derived once per certificate."""
        if self.revoked(peer):
            raise ProtocolError("cert-revoked", peer.name)
        with self._lock:
            key = self._pair_keys.get((peer.name, peer.serial))
        if key is None:
            key = pairs.pair_key(self.identity, peer)
            with self._lock:
                self._pair_keys[(peer.name, peer.serial)] = key
        return key

    def describe(self) -> dict[str, Any]:
        crl = self._crl
        return {"name": self.name, "role": self.identity.role, "serial": f"{self.identity.serial:x}",
                "crl": crl_number(crl) if crl is not None else None}
