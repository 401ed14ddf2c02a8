"""`mesh node --roles worker --no-answer`: a HALO worker node that holds only its neuron groups.

A full node (``nodes.agent.NodeAgent``) loads the whole model to answer asks, and its HALO worker
slices its groups out of it. This process answers no asks: it loads no model at all (no
embedding, attention, LM head or tokenizer, and never imports transformers); its
:class:`mesh.halo.worker.HaloWorker` reads the groups each plan gives it from the node's weight
file, layer by layer (:class:`mesh.halo.shard.FileGroups`), so its memory is the runtime plus its
share of the MLP. How large a share its memory limit allows is worked out before it starts
(``nodes.memory.fit_worker``: its *capacity* in groups), announced in its ``halo`` heartbeat block
(``capacity_groups``) and never exceeded: the coordinator plans no more on it, and a plan that does
is refused (``mesh.halo.worker``).

It is still a member of the mesh (``mesh.member.Member``): retained status with the last will,
heartbeats (roles ``["worker"]``, the model key a full node of the same model and format has, the
link probe's figures the coordinator's scheduler reads, the worker's ``halo`` block) and router
duty when its name is the smallest live one (it forwards asks to answering nodes; none to itself).
An ask that reaches it anyway (by name, or from a router that did not know) is refused at once
with ``not-answering``.

Threads (all stopped by :meth:`WorkerNode.stop`): paho's network thread, the heartbeat thread, the
link probe's, and the HALO worker's own (``mesh.halo.worker``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from mesh import topics, wire
from mesh.auth.keyring import Keyring
from mesh.config import NodeConfig
from mesh.errors import MeshError
from mesh.loops import guarded
from mesh.member import AgentExtension, Member, with_extension_fields
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from mesh.uplink_probe import LinkProbe

log = logging.getLogger(__name__)


class WorkerNode:
    """A node whose only work is serving HALO partials; ``worker`` is its
    :class:`mesh.halo.worker.HaloWorker` (with a :class:`mesh.halo.shard.FileGroups` source),
    ``extensions`` anything else riding on it (Home Assistant discovery)."""

    loaded = None  # no model: what extensions look at (mesh.ha.extension names no model then)

    def __init__(self, config: NodeConfig, worker: Any, model: str, extensions: list[AgentExtension] | None = None,
                 keyring: Keyring | None = None) -> None:
        self.config = config
        self.worker = worker
        self.model = model  # the model key ("smollm2-135m"), what routers and `mesh up` match on
        self.extensions: list[AgentExtension] = [worker, *(extensions or [])]
        self.roles = [r for e in self.extensions for r in getattr(e, "roles", ())]
        self.name = config.name
        self.limits = config.limits
        self.timing = config.timing
        self.rejects = wire.RejectCounter()
        self._started = time.time()
        self._threads: list[threading.Thread] = []
        self.bus = MqttBus(f"mesh-node-{self.name}", config.broker,
                           will=(topics.node_status(self.name), topics.OFFLINE, topics.STATUS.qos, True),
                           keepalive=self.timing.keepalive_s)
        self.member = Member(self.name, self.bus, self.limits, self.rejects,
                             dedupe_window_s=self.timing.dedupe_window_s, label=f"worker node {self.name}",
                             ask_timeout_s=self.timing.ask_timeout_s, keyring=keyring, takes_asks=False)
        self._stop = self.member.stop_event
        self.inbox = ReplyInbox(self.bus, f"node-{self.name}", self.rejects, self.limits.max_message_bytes,
                                keyring=keyring)
        self.link = LinkProbe(self.bus, self.inbox, self.name, interval_s=self.timing.link_ping_s,
                              late_s=self.timing.link_late_s, timeout_s=self.timing.link_timeout_s)

    @property
    def model_key(self) -> str:
        return self.worker.source.model_key

    def start(self) -> None:
        self.bus.on_connected(self.member.announce)
        self.member.subscribe_presence(self.bus)
        self.bus.start(self.timing.connect_timeout_s)
        self.inbox.start()
        self.member.go_online(self._full_heartbeat)
        t = threading.Thread(target=guarded(f"{self.name}-heartbeat", self._heartbeat_loop, self._stop, self.rejects),
                             name=f"{self.name}-heartbeat", daemon=True)
        t.start()
        self._threads.append(t)
        self.link.start()
        for ext in self.extensions:
            self._call(ext, "start", self)
        log.info("worker node %s online with %s (%s): HALO partials only, no asks", self.name, self.model,
                 self.model_key)

    def stop(self, timeout: float = 10.0) -> None:
        self.member.go_offline()
        self.link.stop()
        for t in self._threads:
            t.join(timeout)
        for ext in self.extensions:
            self._call(ext, "stop")
        self.bus.stop()

    def _call(self, ext: AgentExtension, method: str, *args: Any) -> None:
        try:
            getattr(ext, method)(*args)
        except Exception:
            log.exception("extension %s.%s failed", type(ext).__name__, method)

    def heartbeat_body(self) -> dict[str, Any]:
        return {
            "seq": self.member.seq, "time": time.time(), "uptime_s": round(time.time() - self._started, 1),
            "model": self.model, "model_key": self.model_key, "queue": 0, "queue_max": 0, "load": 0.0, "prefill_tps": 0.0,
            "served": 0, "failed": 0, "roles": list(self.roles), "pid": os.getpid(),
            "rejects": self.rejects.snapshot(), "cpu_load1": round(os.getloadavg()[0], 2),
            "heartbeat_s": self.timing.heartbeat_s,
        }

    def _full_heartbeat(self) -> dict[str, Any]:
        body = self.heartbeat_body()
        body["link"] = self.link.snapshot()
        return with_extension_fields(body, self.extensions)

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                env = self.member.publish_heartbeat(self._full_heartbeat())
                self.bus.publish(topics.node_state(self.name), json.dumps(env.body).encode(),
                                 qos=topics.NODE_STATE.qos, retain=topics.NODE_STATE.retain)
                for ext in self.extensions:
                    self._call(ext, "on_heartbeat", dict(env.body))
            except MeshError as exc:
                log.warning("heartbeat not sent: %s", exc)
            self._stop.wait(self.timing.heartbeat_s)
