"""A mesh client: what `mesh ask`, `mesh status`, `mesh up` and the main job use to talk to nodes."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh import topics, wire
from mesh.bus import MqttBus, ReplyInbox
from mesh.config import BrokerAddress
from mesh.errors import MeshError, ProtocolError, TransportError
from mesh.routing import NodeView, PeerTable


class AskFailed(MeshError):
    """A node answered with an error (busy, rejected, shutting down...)."""

    def __init__(self, reason: str, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.node = node


@dataclass
class AskResult:
    answer: str
    node: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # measured by the client, from publish to first streamed piece
    ttlt_s: float  # measured by the client, from publish to the final answer
    node_figures: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        figures = self.node_figures
        return {
            "answer": self.answer, "node": self.node, "model": figures.get("model"),
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "ttft_s": round(self.ttft_s, 6), "ttlt_s": round(self.ttlt_s, 6),
            "node_ttft_s": figures.get("ttft_s"), "node_ttlt_s": figures.get("ttlt_s"),
            "queue_s": figures.get("queue_s"), "prefill_s": figures.get("prefill_s"),
            "decode_s": figures.get("decode_s"), "stop_reason": figures.get("stop_reason"),
            "cache": figures.get("cache", {"local_tokens": 0, "remote_tokens": 0, "peer": None}),
        }


class MeshClient:
    """Connects, watches node status and heartbeats, and asks."""

    def __init__(self, broker: BrokerAddress, name: str | None = None, connect_timeout: float = 10.0) -> None:
        self.name = name or f"cli-{uuid.uuid4().hex[:12]}"
        self.bus = MqttBus(self.name, broker)
        self.rejects = wire.RejectCounter()
        self.inbox = ReplyInbox(self.bus, self.name, self.rejects)
        self.peers = PeerTable()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connect_timeout = connect_timeout

    def __enter__(self) -> "MeshClient":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.bus.subscribe(topics.ALL_STATUS, self._on_status, qos=1)
        self.bus.subscribe(topics.ALL_HEARTBEATS, self._on_heartbeat, qos=0)
        self.bus.start(self._connect_timeout)
        self.inbox.start()
        self.inbox.ping()  # barrier: retained statuses and heartbeats are in

    def stop(self) -> None:
        self.bus.stop()

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is not None and payload == b"":
            with self._changed:
                self.peers.forget(parsed[0])
            return
        if parsed is None or payload not in (topics.ONLINE, topics.OFFLINE):
            self.rejects.add("bad-status")
            return
        with self._changed:
            self.peers.set_status(parsed[0], payload == topics.ONLINE)
            self._changed.notify_all()

    def _on_heartbeat(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None or not payload:
            return
        try:
            env = wire.decode(payload)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return
        if env.kind is wire.Kind.HEARTBEAT:
            with self._changed:
                self.peers.set_heartbeat(parsed[0], env.body, time.monotonic())
                self._changed.notify_all()

    def nodes(self) -> list[NodeView]:
        with self._lock:
            return [NodeView(**vars(v)) for v in self.peers.all()]

    def online(self) -> list[str]:
        with self._lock:
            return [v.name for v in self.peers.online()]

    def wait_online(self, names: Sequence[str], timeout: float, ready: Callable[[NodeView], bool] | None = None) -> None:
        """Block until every named node is online (and ``ready(view)`` holds for it)."""
        deadline = time.monotonic() + timeout

        def done() -> bool:
            for n in names:
                v = self.peers.get(n)
                if v is None or not v.online or (ready is not None and not ready(v)):
                    return False
            return True

        with self._changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in names if not (self.peers.get(n) and self.peers.get(n).online)]  # type: ignore[union-attr]
                    raise TransportError(f"nodes not online within {timeout:g} s: {', '.join(missing) or names}")
                self._changed.wait(min(left, 0.5))

    def ask(
        self,
        text: str,
        node: str | None = None,
        max_new_tokens: int = 64,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        timeout: float = 300.0,
        no_cache: bool = False,
        model: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AskResult:
        """Ask one node (or the router's pick) and stream the answer; raises on error/timeout."""
        online = self.online()
        if not online:
            raise AskFailed("no-node", "no mesh node is online (start one with `mesh node` or `mesh up`)")
        if node is not None and node not in online:
            raise AskFailed("no-node", f"node {node!r} is not online (online: {', '.join(online)})")
        corr, replies = self.inbox.open()
        body: dict[str, Any] = {"text": text, "max_new_tokens": max_new_tokens, "ask_id": corr}
        if stop:
            body["stop"] = list(stop)
        if no_cache:
            body["no_cache"] = True
        if model:
            body["model"] = model
        body.update(extra or {})  # e.g. {"halo_sync": "relaxed"} for the HALO coordinator
        env = wire.Envelope(wire.Kind.ASK, self.name, body, corr=corr, reply_to=self.inbox.topic)
        target = topics.node_ask(node) if node else topics.ROUTE
        t0 = time.monotonic()
        deadline = t0 + timeout
        first: float | None = None
        try:
            self.bus.publish(target, wire.encode(env), qos=1)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"no answer within {timeout:g} s"
                                         + (f" from node {node}" if node else ""))
                try:
                    reply = replies.get(timeout=left)
                except queue.Empty:
                    continue
                if reply.kind is wire.Kind.TOKEN:
                    if first is None:
                        first = time.monotonic()
                    if on_text is not None:
                        on_text(str(reply.body["text"]))
                elif reply.kind is wire.Kind.ANSWER:
                    end = time.monotonic()
                    b = reply.body
                    return AskResult(answer=str(b["text"]), node=str(b["node"]),
                                     prompt_tokens=int(b["prompt_tokens"]), new_tokens=int(b["new_tokens"]),
                                     ttft_s=(first or end) - t0, ttlt_s=end - t0, node_figures=dict(b))
                elif reply.kind is wire.Kind.ERROR:
                    raise AskFailed(str(reply.body["reason"]), str(reply.body["message"]), reply.sender)
        finally:
            self.inbox.close(corr)
