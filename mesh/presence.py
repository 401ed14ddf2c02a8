"""Who is online and what each node last reported: the retained status and heartbeat topics.

Every process that watches the mesh keeps one :class:`Presence`: the node agent and the
coordinator (through :class:`mesh.member.Member`) and the client (``mesh ask``, ``mesh status``,
the benchmarks). Its handlers run on paho's network thread; :attr:`Presence.changed` is both the
lock over :attr:`Presence.peers` and the condition waiters sleep on until a status or heartbeat
lands. With a keyring, a heartbeat must be sealed by the node whose topic it is on
(``mesh.auth.keyring.Keyring.open``: ``unauthenticated``, ``name-mismatch``...); the retained
``online``/``offline`` status stays plain text (the broker publishes the last will, which no node
can sign): only a heartbeat makes a node live for routing (``mesh.routing.live``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.mqtt.bus import MqttBus
from mesh.plausible import heartbeat_problem
from mesh.routing import PeerTable

log = logging.getLogger(__name__)


class Presence:
    """A peer table fed by ``mesh/v1/node/+/status`` and ``.../heartbeat``; garbage is counted,
    and so is a heartbeat whose figures no honest node can report (``mesh.plausible``): it is
    refused whole, so the peer table only ever holds plausible figures.

    Subclasses hear of changes through :meth:`status_changed` (``online`` is None when a
    decommission cleared the status) and :meth:`heard` (``fresh`` is False for a heartbeat older
    than the one held).
    """

    def __init__(self, rejects: wire.RejectCounter, max_message_bytes: int = wire.DEFAULT_MAX_BYTES,
                 keyring: Keyring | None = None) -> None:
        self.keys = keyring
        self.rejects = rejects
        self.max_message_bytes = max_message_bytes
        self.peers = PeerTable()
        self.changed = threading.Condition()

    def subscribe_presence(self, bus: MqttBus) -> None:
        bus.on_connected(self._listening)
        bus.subscribe(topics.ALL_STATUS, self.on_status, qos=1)
        bus.subscribe(topics.ALL_HEARTBEATS, self.on_heartbeat, qos=0)

    def _listening(self) -> None:
        """Our connection came (back) up: a peer's silence while we were away is not its own."""
        with self.changed:
            self.peers.listening_since = time.monotonic()

    def on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if payload not in (b"", topics.ONLINE, topics.OFFLINE):
            self.rejects.add("bad-status")  # garbage must not mark a node gone
            return
        name = parsed[0]
        online = None if payload == b"" else payload == topics.ONLINE  # b"": cleared by a decommission
        with self.changed:
            if online is None:
                self.peers.forget(name)
            else:
                self.peers.set_status(name, online)
            self.changed.notify_all()
        self.status_changed(name, online)

    def on_heartbeat(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if not payload:
            return  # an empty retained message clears a decommissioned node's heartbeat
        env = senders.decode_kind(self.keys, payload, topic, wire.Kind.HEARTBEAT, self.rejects,
                                  self.max_message_bytes, retained)
        if env is None:
            return
        problem = heartbeat_problem(env.body)
        if problem is not None:  # a lying or broken heartbeat is never routed on (mesh.plausible)
            self.rejects.add("implausible-heartbeat")
            log.info("refused heartbeat of %s: %s out of range", parsed[0], problem)
            return
        with self.changed:
            fresh = self.peers.set_heartbeat(parsed[0], env.body, time.monotonic())
            if fresh and not retained:
                # A heartbeat sent now, sealed by the node (with keys), outweighs a status anyone
                # without an ACL can write: a forged retained ``offline`` hides a live node for at
                # most one heartbeat period. A retained one proves nothing about now.
                self.peers.set_status(parsed[0], True)
            self.changed.notify_all()
        self.heard(parsed[0], env.body, retained, fresh)

    def status_changed(self, name: str, online: bool | None) -> None:
        """A node's status arrived (network thread)."""

    def heard(self, name: str, body: dict[str, Any], retained: bool, fresh: bool) -> None:
        """A node's heartbeat arrived (network thread)."""

    def peer_online(self, peer: str) -> bool:
        """Unknown counts as online: only a seen ``offline`` ends a wait on a peer."""
        with self.changed:
            view = self.peers.get(peer)
            return view is None or view.online
