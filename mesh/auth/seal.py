"""The sealed envelope: any message's bytes, signed by its sender, with the sender's certificate.

Layout (little-endian, version 1)::

    magic    4s  b"MSIG" (a CBOR envelope starts with a map byte, a HALO frame with b"HALO")
    version  B   SEAL_VERSION; anything else is rejected ("bad-version")
    flags    B   0 (reserved)
    cert     H   length of the certificate (1..MAX_CERT_BYTES)
    ts       Q   the sender's wall clock in milliseconds when it sealed
    nonce    8s  random per message
    certificate (X.509 DER, ``mesh.auth.certs``), inner bytes (usually a ``mesh.wire`` envelope)
    signature 64 bytes: Ed25519 over DOMAIN, the MQTT topic, NUL, and every byte above

The certificate travels attached (about 290 bytes) rather than on a retained per-principal topic:
a receiver needs no subscription, no ordering between a sender's first message and its
certificate, and no ACL line per principal (askers and the coordinator have no node subtree);
verified certificates are cached by fingerprint, so a known sender costs one hash and one
signature check per message. The topic is signed, so a message cannot be re-posted elsewhere (a
forwarder re-seals in its own name).

Replays: receivers never compare a sender's clock with their own (a Pi has no real-time clock
before NTP); :class:`ReplayGuard` compares it with the same sender's newest message seen: older
than ``window`` behind it is ``stale``, the same (ts, nonce) twice is ``replayed``. Retained
messages skip the guard (a broker hands the same retained message to every new subscription);
the broker ACL keeps their topics writable only by their owner.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from dataclasses import dataclass

from mesh.auth.certs import MAX_CERT_BYTES
from mesh.errors import ProtocolError

MAGIC = b"MSIG"
SEAL_VERSION = 1
DOMAIN = b"mesh seal v1\0"
SIG_BYTES = 64
_HEADER = struct.Struct("<4sBBHQ8s")
REPLAY_WINDOW_MS = 60_000
MAX_REMEMBERED = 1 << 16  # per sender; the oldest beyond it raise the sender's floor


@dataclass(frozen=True)
class Parsed:
    """A sealed payload split into its parts (nothing verified yet)."""

    ts_ms: int
    nonce: bytes
    cert: bytes
    inner: bytes
    signed: bytes  # what the signature covers, minus DOMAIN and topic
    signature: bytes


def is_sealed(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def signed_bytes(topic: str, body: bytes) -> bytes:
    return b"".join((DOMAIN, topic.encode(), b"\0", body))


def pack(cert: bytes, inner: bytes, ts_ms: int, nonce: bytes | None = None) -> bytes:
    """Everything but the signature (the caller signs ``signed_bytes(topic, this)`` and appends it)."""
    if not 0 < len(cert) <= MAX_CERT_BYTES:
        raise ProtocolError("bad-cert", "certificate length")
    head = _HEADER.pack(MAGIC, SEAL_VERSION, 0, len(cert), ts_ms, nonce or os.urandom(8))
    return b"".join((head, cert, inner))


def parse(payload: bytes, max_bytes: int) -> Parsed:
    """Untrusted bytes -> Parsed, or ProtocolError with a counted reason."""
    if len(payload) > max_bytes:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {max_bytes}")
    if len(payload) < _HEADER.size + SIG_BYTES + 1 or not is_sealed(payload):
        raise ProtocolError("unauthenticated", "not a sealed envelope")
    _, version, flags, n_cert, ts_ms, nonce = _HEADER.unpack_from(payload)
    if version != SEAL_VERSION or flags:
        raise ProtocolError("bad-version", f"seal version {version}, flags {flags}")
    end_cert = _HEADER.size + n_cert
    if not 0 < n_cert <= MAX_CERT_BYTES or end_cert > len(payload) - SIG_BYTES:
        raise ProtocolError("malformed", "certificate length out of range")
    body = payload[:-SIG_BYTES]
    return Parsed(ts_ms, nonce, payload[_HEADER.size:end_cert], payload[end_cert:-SIG_BYTES], body,
                  payload[-SIG_BYTES:])


class ReplayGuard:
    """Per sender: the newest timestamp seen and the (ts, nonce) pairs within the window."""

    def __init__(self, window_ms: int = REPLAY_WINDOW_MS, remembered: int = MAX_REMEMBERED) -> None:
        self.window_ms, self.remembered = window_ms, remembered
        self._lock = threading.Lock()
        self._newest: dict[str, int] = {}
        self._floor: dict[str, int] = {}
        self._seen: dict[str, set[tuple[int, bytes]]] = {}
        self._order: dict[str, deque[tuple[int, bytes]]] = {}

    def check(self, sender: str, ts_ms: int, nonce: bytes) -> None:
        """Accept (and remember) or raise ``stale`` / ``replayed``."""
        with self._lock:
            newest = self._newest.get(sender)
            if newest is not None and (ts_ms < newest - self.window_ms or ts_ms <= self._floor.get(sender, -1)):
                raise ProtocolError("stale", f"{sender}: {newest - ts_ms} ms behind its newest message")
            seen = self._seen.setdefault(sender, set())
            order = self._order.setdefault(sender, deque())
            if (ts_ms, nonce) in seen:
                raise ProtocolError("replayed", f"{sender}: a message seen before")
            seen.add((ts_ms, nonce))
            order.append((ts_ms, nonce))
            newest = self._newest[sender] = max(ts_ms, newest if newest is not None else ts_ms)
            while order and (len(order) > self.remembered or order[0][0] < newest - self.window_ms):
                old = order.popleft()
                seen.discard(old)
                if len(order) >= self.remembered:
                    self._floor[sender] = max(self._floor.get(sender, -1), old[0])
