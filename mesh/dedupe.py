"""Which asks a process has already taken: the dedupe that makes "one ask, one answer" hold.

A router that crashed mid-duty and its successor may both forward an ask (``mesh.routing``'s
hand-over argument relies on every target dropping the repeat), and a client may send again after
a broker reconnect with a fresh id. A repeat is recognised by :func:`ask_identity`; ids are
remembered for a window and up to a count, whichever ends first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import cbor2

from mesh import wire

SEEN_MAX = 10_000  # remembered ask ids, beyond the dedupe window's own expiry
Identity = tuple[str, str, str, bytes]

ROUTER_FIELDS = ("routed_by", "routed_reason")  # added by whichever router forwarded the ask


def ask_identity(env: wire.Envelope) -> Identity | None:
    """Who sent an ask, under which id, asking what: a repeat of the same four is the same ask.

    The id is the asker's ``ask_id`` (JSON asks) or the envelope's correlation id. Ids are scoped
    to their sender: the sender name and its reply topic are part of the identity, and so is a
    digest of the ask itself (every body field but what a router adds), so an id is burned only by
    the very same ask. Sender names are self-declared (MQTT 3.1.1 does not say who published), and
    Home Assistant's asks all come as ``json-client``: without the digest anyone could send
    tomorrow's ``briefing-YYYYMMDD`` first, to the victim's own reply topic, and the real briefing
    would be dropped. With it, the only id an attacker can burn is one whose ask is word for word
    the same, to the same topic, and that ask is answered there (its answer is the victim's).
    Two routers that overlap during a hand-over forward the same body, so the repeat still drops.
    """
    ask_id = env.body.get("ask_id") or env.corr
    if not ask_id:
        return None
    asked = {k: v for k, v in env.body.items() if k not in ROUTER_FIELDS}
    digest = hashlib.blake2b(cbor2.dumps(asked, canonical=True), digest_size=16).digest()
    return env.sender, env.reply_to or "", str(ask_id), digest


class SeenAsks:
    """The identities taken in the last ``window_s`` seconds (monotonic), at most ``max_ids``."""

    def __init__(self, window_s: float, max_ids: int = SEEN_MAX) -> None:
        self.window_s, self.max_ids = window_s, max_ids
        self._seen: OrderedDict[Identity, float] = OrderedDict()
        self._lock = threading.Lock()

    def seen_before(self, env: wire.Envelope, now: float) -> bool:
        """Whether this very ask was taken within the window; remembers it if not."""
        ident = ask_identity(env)
        if ident is None:
            return False
        with self._lock:
            if ident in self._seen:
                return True
            self._seen[ident] = now
            while self._seen and now - next(iter(self._seen.values())) > self.window_s:
                self._seen.popitem(last=False)
            while len(self._seen) > self.max_ids:
                self._seen.popitem(last=False)
        return False
