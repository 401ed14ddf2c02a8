"""What a node's cache knows of its peers: the catalogs it publishes and hears, and the link
estimates its cost model starts from before a real fetch has measured a peer.

:class:`CatalogSync` publishes this node's catalog (retained, debounced, from a thread of its
own) whenever the store changed, and hands every peer catalog it hears to the node cache. The
link functions are pure: the agent hands in its own figures and the peers' heartbeats.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.cache.lookup import LinkEstimate
from mesh.cache.node_cache import NodeCache
from mesh.errors import MeshError, ProtocolError
from mesh.loops import guarded

log = logging.getLogger(__name__)

DEFAULT_LINK = LinkEstimate(bytes_per_s=2.5e6, rtt_s=0.01)  # a Wi-Fi guess, until the node measures its link


def default_link(link_bw: float | None, rtt_ms: float | None) -> LinkEstimate:
    """This node's link through the broker (bytes/s from large self-pings, broker round trip in
    ms); a fetch crosses it twice, so the round trip doubles. DEFAULT_LINK until measured."""
    if link_bw is None:
        return DEFAULT_LINK
    return LinkEstimate(bytes_per_s=link_bw, rtt_s=2 * (rtt_ms or 1.0) / 1000.0)


def peer_links(mine: LinkEstimate, heartbeats: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, LinkEstimate]:
    """Per peer (name, heartbeat body): the slower of our link and theirs; the round trip through
    both. Peers whose heartbeat gives no bandwidth are left to the default link."""
    out: dict[str, LinkEstimate] = {}
    for name, beat in heartbeats:
        bw, rtt = beat.get("link_bw_Bps"), beat.get("rtt_ms")
        if isinstance(bw, (int, float)) and bw > 0:
            peer_rtt = float(rtt) / 1000.0 if isinstance(rtt, (int, float)) else mine.rtt_s / 2
            out[name] = LinkEstimate(min(mine.bytes_per_s, float(bw)), mine.rtt_s / 2 + peer_rtt)
    return out


class CatalogSync:
    """Publishes ``cache``'s catalog on ``topics.node_catalog(name)`` and feeds it the peers'.

    Runs until ``stop`` (the owner's stop event) is set. A failed publish marks the cache dirty
    again, so the next round retries; a restarted broker needs ``cache.dirty.set()`` (the agent's
    on-connect does it) since it lost the retained catalog.
    """

    def __init__(self, bus: Any, cache: NodeCache, name: str, *, stop: threading.Event,
                 rejects: wire.RejectCounter, max_message_bytes: int, debounce_s: float = 0.2,
                 keyring: Keyring | None = None) -> None:
        """``keyring``: this node's identity; with one, its catalog is sealed and a peer's is taken
        only sealed by that peer (``Keyring.open``: the topic names its owner)."""
        self.bus, self.cache, self.name, self.stop, self.rejects = bus, cache, name, stop, rejects
        self.keys = keyring
        self.max_message_bytes, self.debounce_s = max_message_bytes, debounce_s
        self.thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        """Subscribe to every node's catalog and start the publishing thread (returned, for joining)."""
        self.bus.subscribe(topics.ALL_CATALOGS, self.handle, qos=1)
        self.thread = threading.Thread(target=guarded(f"{self.name}-catalog", self._loop, self.stop, self.rejects),
                                       name=f"{self.name}-catalog", daemon=True)
        self.thread.start()
        return self.thread

    def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        """A catalog heard (network thread); an empty payload clears that peer's."""
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if parsed[0] == self.name:
            return  # our own retained catalog: our store is the truth
        if not payload:
            self.cache.set_peer_catalog(parsed[0], None)
            return
        env = senders.decode_kind(self.keys, payload, topic, wire.Kind.CATALOG, self.rejects,
                                  self.max_message_bytes, retained)
        if env is None:
            return
        try:
            self.cache.set_peer_catalog(parsed[0], dict(env.body))
        except ProtocolError as exc:
            self.rejects.add(exc.reason)

    def publish(self) -> None:
        """Publish the catalog of what the store holds now (retained)."""
        env = wire.Envelope(wire.Kind.CATALOG, self.name, self.cache.catalog().to_dict())
        topic = topics.node_catalog(self.name)
        self.bus.publish(topic, senders.encode(self.keys, env, topic, self.max_message_bytes),
                         qos=topics.CATALOG.qos, retain=topics.CATALOG.retain)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.cache.dirty.wait(0.5):
                continue
            self.stop.wait(self.debounce_s)  # one catalog for a burst of changes
            try:
                self.publish()
            except MeshError as exc:
                log.warning("catalog not published: %s", exc)
                self.cache.dirty.set()
