"""HALO's authentication: signed plans and acks, pairwise MACs on every frame (``mesh.auth``).

How a coordinator and a worker come to share a key, with no extra message:

1. The coordinator seals its plan (signature + certificate, ``Keyring.seal``; only a principal of
   role ``coordinator`` may publish on the plan topic). A worker opens it, so it knows the
   coordinator's certificate, derives their pair key and its own tag index (its place among the
   plan's sorted worker names).
2. The worker seals its ``HALO_ACK``; the coordinator opens it and derives the same pair key.
   Nothing is routed to a worker before it acknowledged, so every frame finds its key.
3. Each MLP input carries a tag per worker of the plan; each partial one tag
   (``mesh.halo.frame``). A frame without a valid tag is refused and counted: ``unauthenticated``
   (no tags), ``bad-mac`` (a wrong tag), ``unknown-peer`` (no key for its sender); a worker
   counts an input of a plan it is not in (``not-in-plan``) as skipped, as before.

One :class:`HaloKeys` per HALO process. Built with ``keyring=None`` it is the old, unauthenticated
mesh (plain CBOR, frames without tags, everything accepted): a process with no identity, and the
in-memory test rigs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from mesh import wire
from mesh.auth.certs import Peer
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError
from mesh.halo.frame import PARTIAL, Frame

log = logging.getLogger(__name__)

EPOCHS_KEPT = 8  # a worker's tag index per (coordinator, epoch), for the newest plans


class HaloKeys:
    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring
        if keyring is None:
            log.warning("no identity: HALO plans, acks and frames are unauthenticated, and every process "
                        "that holds keys refuses them (mesh identity issue, or mesh up)")
        else:
            log.info("HALO plans, acks and frames authenticated as %s", keyring.describe())
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[Peer, bytes]] = {}  # peer name -> (its certificate, pair key)
        self._index: dict[tuple[str, int], int] = {}  # worker: (coordinator, epoch) -> its tag index
        self._plan_keys: dict[int, tuple[tuple[str, ...], list[bytes | None]]] = {}  # coordinator: epoch -> keys
        self._crl: Any = keyring.crl if keyring is not None else None  # the CRL the keys were checked against

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    # -- CBOR: plans and acks ---------------------------------------------------------------------
    def seal(self, env: wire.Envelope, topic: str) -> bytes:
        return self.keyring.seal_envelope(env, topic) if self.keyring is not None else wire.encode(env)

    def open(self, payload: bytes, topic: str, max_bytes: int, retained: bool = False) -> wire.Envelope:
        """A plan or an ack -> its envelope, remembering the sender's pair key; ProtocolError if
        the signature, certificate or names do not check out."""
        if self.keyring is None:
            return wire.decode(payload, max_bytes)
        opened, env = self.keyring.open_envelope(payload, topic, max_bytes, retained)
        key = self.keyring.pair_key(opened.sender)
        with self._lock:
            old = self._keys.get(opened.sender.name)
            if old is None or old[1] != key:  # a new or re-issued identity: the cached tag keys are stale
                self._keys[opened.sender.name] = (opened.sender, key)
                self._plan_keys.clear()
        return env

    def _revise(self) -> None:
        """Drop the keys of peers a newer CRL revoked (``Keyring.update_crl``); one identity
        comparison per call while the CRL stays the same. Holds ``_lock``."""
        keyring = self.keyring
        if keyring is None or keyring.crl is self._crl:
            return
        self._crl = keyring.crl
        for name in [n for n, (peer, _) in self._keys.items() if keyring.revoked(peer)]:
            del self._keys[name]
        self._plan_keys.clear()

    def joined(self, coordinator: str, epoch: int, workers: Sequence[str], name: str) -> None:
        """Worker side: this node's tag index in ``coordinator``'s plan ``epoch``."""
        ordered = sorted(workers)
        if name not in ordered:
            return
        with self._lock:
            self._index[(coordinator, epoch)] = ordered.index(name)
            for old in sorted(self._index, key=lambda k: k[1])[:-EPOCHS_KEPT]:
                del self._index[old]

    def _key(self, name: str) -> bytes | None:
        entry = self._keys.get(name)
        return entry[1] if entry is not None else None

    # -- frames -----------------------------------------------------------------------------------
    def mlp_keys(self, epoch: int, workers: Sequence[str]) -> list[bytes | None]:
        """Coordinator side: one key per worker of plan ``epoch``, in sorted name order (cached
        per epoch; a worker with no key yet gets a tag nobody passes)."""
        if self.keyring is None:
            return []
        ordered = tuple(sorted(workers))
        with self._lock:
            self._revise()
            cached = self._plan_keys.get(epoch)
            if cached is not None and cached[0] == ordered and None not in cached[1]:
                return cached[1]
            keys = [self._key(w) for w in ordered]
            self._plan_keys = {e: v for e, v in self._plan_keys.items() if e > epoch - EPOCHS_KEPT}
            self._plan_keys[epoch] = (ordered, keys)
        return keys

    def partial_keys(self, coordinator: str) -> list[bytes | None]:
        """Worker side: the key its partials to ``coordinator`` are tagged with."""
        if self.keyring is None:
            return []
        with self._lock:
            self._revise()
            return [self._key(coordinator)]

    def check(self, frame: Frame) -> None:
        """Raise ProtocolError unless ``frame`` is tagged by its sender (any frame passes without
        a keyring). A worker checks the tag of its own index, a coordinator a partial's only tag."""
        if self.keyring is None:
            return
        if not frame.tags:
            raise ProtocolError("unauthenticated", f"untagged HALO frame from {frame.sender!r}")
        with self._lock:
            self._revise()
            key = self._key(frame.sender)
            index = 0 if frame.kind == PARTIAL else self._index.get((frame.sender, frame.epoch))
        if key is None:
            raise ProtocolError("unknown-peer", f"no key for {frame.sender!r}")
        if index is None:  # a shared input of a plan this worker is not (or no longer) in
            raise ProtocolError("not-in-plan", f"{frame.sender!r} epoch {frame.epoch}")
        if not frame.tag_ok(key, index):
            raise ProtocolError("bad-mac", f"HALO frame from {frame.sender!r}")
