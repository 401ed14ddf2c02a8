"""Home Assistant on a node: MQTT discovery as a node extension, and decommissioning.

:class:`HomeAssistantExtension` rides on a node agent (``mesh.member.AgentExtension``):

- on start (the node is online) it publishes its own device (retained, ``mesh.ha.discovery``),
  and nothing else: the shared assistant device belongs to the operator's account
  (:func:`publish_assistant`); and it subscribes to Home Assistant's birth topic;
- when Home Assistant announces ``online`` there (it restarted) or the node reconnects to the
  broker, it publishes discovery again, once per ``debounce_s`` however many announcements came
  (a restart storm of several HA instances, or HA plus a reconnect, costs one republish);
- the state the sensors read is the node's retained JSON state topic, which the agent publishes
  with each heartbeat, so nothing else is needed per heartbeat.

:func:`decommission` is what ``mesh node --name N --decommission`` runs (``nodes/ha_cli.py``) (the node must be
stopped): empty retained payloads on the node's discovery config and on every retained topic
under ``mesh/v1/node/N/``, so neither Home Assistant nor the mesh remembers the node.
"""

from __future__ import annotations

import logging
import threading
from importlib import metadata
from typing import Any

from mesh import topics, wire
from mesh.ha import discovery as ha
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from mesh.config import check_name
from mesh.errors import MeshError
from mesh.member import AgentExtension

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return metadata.version("mesh")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class HomeAssistantExtension(AgentExtension):
    """Publishes a node's Home Assistant discovery and re-publishes it when HA comes back."""

    def __init__(self, prefix: str = ha.DEFAULT_PREFIX, debounce_s: float = 1.0,
                 sw_version: str | None = None) -> None:
        self.prefix = ha.check_prefix(prefix)
        self.debounce_s = debounce_s
        self.sw_version = sw_version or package_version()
        self.published = 0  # how many times discovery went out (read it with wait_published)
        self._published_cond = threading.Condition()
        self._bus: Any = None
        self._node = ""
        self._model: str | None = None
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rejects = wire.RejectCounter()  # the node's own counter once started on an agent

    # -- AgentExtension ------------------------------------------------------------------------
    def start(self, agent: Any) -> None:
        self.rejects = agent.rejects  # counted where the heartbeat shows them
        self.attach(agent.bus, agent.name, agent.loaded.key if agent.loaded is not None else None)

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    # -- the shell ----------------------------------------------------------------------------
    def attach(self, bus: Any, node: str, model: str | None) -> None:
        """Start on a connected bus (``MqttBus`` or anything with publish/subscribe/on_connected)."""
        self._bus, self._node, self._model = bus, node, model
        self._thread = threading.Thread(target=self._republish_loop, name=f"{node}-ha", daemon=True)
        self._thread.start()
        self.publish_discovery()
        bus.subscribe(ha.birth_topic(self.prefix), self._on_birth, qos=1)
        bus.on_connected(self.request_republish)

    def publish_discovery(self) -> None:
        for msg in ha.discovery_messages(self._node, self.prefix, sw_version=self.sw_version, model=self._model):
            self._bus.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        with self._published_cond:
            self.published += 1
            self._published_cond.notify_all()
        log.info("published Home Assistant discovery for %s under %s/", self._node, self.prefix)

    def wait_published(self, count: int, timeout: float) -> bool:
        """Block until discovery went out ``count`` times in all (tests, diagnostics)."""
        with self._published_cond:
            return self._published_cond.wait_for(lambda: self.published >= count, timeout)

    def request_republish(self) -> None:
        """Ask for a republish after the debounce period (any thread; never blocks)."""
        self._wanted.set()

    def _on_birth(self, topic: str, payload: bytes, retained: bool) -> None:
        # A retained "online" is history (we published on start anyway); only a live one means
        # Home Assistant has just (re)started and forgotten its non-retained state.
        word = payload.strip()
        if word not in (ha.BIRTH_ONLINE, ha.BIRTH_OFFLINE):
            self.rejects.add("bad-ha-birth")
        elif not retained and word == ha.BIRTH_ONLINE:
            self.request_republish()

    def _republish_loop(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            # Collect every request that arrives within the debounce period into one publish.
            if self._stop.wait(self.debounce_s):
                return
            self._wanted.clear()
            try:
                self.publish_discovery()
            except MeshError as exc:
                log.warning("Home Assistant discovery not republished: %s", exc)


def publish_assistant(bus: MqttBus, prefix: str, nodes: list[str], *, remove: bool = False,
                      sw_version: str | None = None, timeout: float = 10.0) -> str:
    """Publish (retained) the shared assistant device, available while any of ``nodes`` is
    online, or remove it; ``bus`` is connected as :data:`mesh.ha.discovery.ASSISTANT_OWNER`, the
    one account the gateway ACL lets write it (Mosquitto acknowledges a publish its ACL refuses,
    then drops it, so the account matters, not the answer). Returns the topic; raises
    ``TransportError`` if the broker does not acknowledge it."""
    (msg,) = ha.assistant_messages(ha.check_prefix(prefix), nodes, sw_version=sw_version or package_version(),
                                   remove=remove)
    bus.publish_wait(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, timeout=timeout)
    log.info("%s the Home Assistant assistant device on %s", "removed" if remove else "published", msg.topic)
    return msg.topic


def decommission(bus: MqttBus, node: str, prefix: str = ha.DEFAULT_PREFIX, *, settle_s: float = 5.0) -> list[str]:
    """Remove node ``node`` from Home Assistant and from the broker's retained state.

    ``bus`` is connected with the node's own credentials (its ACL covers exactly these topics)
    under a client id other than the running node's. Retained topics under the node's subtree are
    discovered by subscribing and waiting for a ping round trip on the node's own reply topic (the
    broker delivers retained messages before the echo), so topics added later (a catalog) are
    cleared too. Returns the topics cleared; raises ``TransportError`` if the broker does not
    acknowledge them.
    """
    found: list[str] = []
    lock = threading.Lock()

    def collect(topic: str, payload: bytes, retained: bool) -> None:
        if retained and payload:
            with lock:
                found.append(topic)

    subtree = f"{topics.ROOT}/node/{check_name(node)}/#"  # the node's own subtree (ACL: readwrite)
    bus.subscribe(subtree, collect, qos=1)
    inbox = ReplyInbox(bus, f"node-{node}")
    inbox.start()
    inbox.ping(timeout=settle_s)
    with lock:
        retained = tuple(found)
    cleared = []
    for msg in ha.removal_messages(node, prefix, retained_topics=retained):
        bus.publish_wait(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, timeout=settle_s)
        cleared.append(msg.topic)
    log.info("decommissioned %s: cleared %s", node, ", ".join(cleared))
    return cleared
