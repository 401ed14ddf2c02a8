"""A mesh client: what `mesh ask`, `mesh status`, `mesh up` and the main job use to talk to nodes."""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import budget, topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from mesh.config import BrokerAddress
from mesh.errors import MeshError, TransportError
from mesh.presence import Presence
from mesh.routing import NodeView, router_of

log = logging.getLogger(__name__)
HELD_MAX = 4096  # token pieces held back past a gap in one stream (a bound against a flood)


def asker_keyring(home: Path | None) -> Keyring | None:
    """The account's identity under ``<home>/identity`` (role ``asker``; ``mesh up`` and the
    gateway's make-users.sh make it; a box holding the CA key enrols it), or None: no keys. A
    client holds keys exactly when the nodes of that home do."""
    if home is None:
        return None
    from mesh.auth.store import identity_dir, load_keyring

    return load_keyring(identity_dir(home), "asker", "asker")


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
            # only when asked for (``ask(cache_figures=True)``, mesh.member.shows_cache)
            **({"cache": figures["cache"]} if "cache" in figures else {}),
        }


class MeshClient(Presence):
    """Connects, watches node status and heartbeats, and asks.

    ``name`` names this run (its reply inbox and last will); ``keyring``: the account's identity
    (``mesh.auth``, role ``asker``), which seals every ask in its own name and takes an answer only
    from the node the ask went to (``mesh.auth.senders.ReplyGate``). Without one, asks go plain
    (nodes with keys refuse them) and any reply is taken, as before identities.
    """

    def __init__(self, broker: BrokerAddress, name: str | None = None, connect_timeout: float = 10.0,
                 keyring: Keyring | None = None) -> None:
        self.name = name or f"cli-{uuid.uuid4().hex[:12]}"
        self.keys = keyring
        self.sender = keyring.name if keyring is not None else self.name
        # Our last will tells nodes we are gone: they stop working on our asks (mesh.askers).
        self.bus = MqttBus(self.name, broker, will=(topics.asker_status(self.name), topics.OFFLINE,
                                                    topics.ASKER_STATUS.qos, topics.ASKER_STATUS.retain))
        super().__init__(wire.RejectCounter(), keyring=keyring)
        self.inbox = ReplyInbox(self.bus, self.name, self.rejects, keyring=keyring)
        self._connect_timeout = connect_timeout
        self._status_at: dict[str, tuple[float, bool]] = {}  # node -> (when its last status came, online)
        self._connected_at = 0.0  # when our latest connection to the broker was made

    def __enter__(self) -> "MeshClient":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.bus.on_connected(self._note_connected)
        self.subscribe_presence(self.bus)
        self.bus.start(self._connect_timeout)
        self.inbox.start()
        self.inbox.ping()  # barrier: retained statuses and heartbeats are in

    def stop(self) -> None:
        """Disconnect; nodes hear we are gone first (a clean disconnect sends no last will)."""
        if self.bus.connected.is_set():
            try:
                self.bus.publish_wait(topics.asker_status(self.name), topics.OFFLINE, qos=topics.ASKER_STATUS.qos,
                                      retain=topics.ASKER_STATUS.retain, timeout=2.0)
            except MeshError as exc:
                log.info("could not say we are gone: %s", exc)
        self.bus.stop()

    def _note_connected(self) -> None:
        with self.changed:
            self._connected_at = time.monotonic()
        # back: a node that heard our last will (a dropped connection) works on our asks again
        self.bus.publish(topics.asker_status(self.name), topics.ONLINE, qos=topics.ASKER_STATUS.qos,
                         retain=topics.ASKER_STATUS.retain)

    def status_changed(self, name: str, online: bool | None) -> None:
        if online is not None:
            with self.changed:
                self._status_at[name] = (time.monotonic(), online)

    def nodes(self) -> list[NodeView]:
        with self.changed:
            return [NodeView(**vars(v)) for v in self.peers.all()]

    def online(self) -> list[str]:
        with self.changed:
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

        with self.changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in names if not (self.peers.get(n) and self.peers.get(n).online)]  # type: ignore[union-attr]
                    raise TransportError(f"nodes not online within {timeout:g} s: {', '.join(missing) or names}")
                self.changed.wait(min(left, 0.5))

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
        resend_s: float = 5.0,
        max_sends: int = 4,
        cache_figures: bool = False,
    ) -> AskResult:
        """Ask one node (or the router's pick) and stream the answer; raises on error/timeout.

        Nothing is silently lost: if the broker connection drops while the ask is pending (a
        restarted broker forgets our subscription and anything in flight), the ask is sent again
        once we are back and the target has re-announced itself (or every ``resend_s`` without a
        reply), at most ``max_sends`` times in all; a routed ask is also sent again when a node
        goes offline before anyone replied. Tokens are de-duplicated by index, so the stream reads
        once. Otherwise the ask ends with AskFailed or TransportError saying what happened.

        ``cache_figures``: the answer's ``node_figures`` carry the prompt cache's ``cache`` block
        (benches and tests; ``mesh.member.shows_cache`` says who may have it).
        """
        online = self.online()
        if not online:
            raise AskFailed("no-node", "no mesh node is online (start one with `mesh node` or `mesh up`)")
        if node is not None and node not in online:
            raise AskFailed("no-node", f"node {node!r} is not online (online: {', '.join(online)})")
        corr, replies = self.inbox.open()
        body: dict[str, Any] = {"text": text, "max_new_tokens": max_new_tokens}
        if stop:
            body["stop"] = list(stop)
        if no_cache:
            body["no_cache"] = True
        if cache_figures:
            body[wire.CACHE_FIGURES] = True
        if model:
            body["model"] = model
        body.update(extra or {})  # e.g. {"halo_sync": "relaxed"} for the HALO coordinator
        target = topics.node_ask(node) if node else topics.ROUTE
        t0 = time.monotonic()
        deadline = t0 + timeout
        first: float | None = None
        next_token = 0  # index of the next token piece to pass on
        sends: list[float] = []
        replied = False
        serving: str | None = None  # the node that replied to the latest send
        disconnects = self.bus.disconnects  # a drop during the ask is the reason it went unanswered
        held: dict[int, str] = {}  # pieces that arrived past a gap
        streamed = ""  # what on_text has been given so far
        gate = senders.ReplyGate(node, self.keys is not None, self.router)

        def pass_on(piece: str) -> None:
            nonlocal streamed
            streamed += piece
            if on_text is not None:
                on_text(piece)

        def send() -> int:
            if not self.bus.wait_connected(deadline - time.monotonic()):
                raise TransportError(f"lost the broker connection ({self.bus.broker}) and it was not back "
                                     f"within the ask's {timeout:g} s timeout; the ask was not answered")
            if self.bus.connects > 1:
                # After a reconnect the broker may be a restarted one that knows no subscription
                # yet: wait (bounded) until the node that will take the ask has announced itself.
                self._wait_announced(node, min(resend_s, max(deadline - time.monotonic(), 0.0)))
            # A fresh ask_id per send: a node that saw an earlier send (and whose reply was lost
            # with the broker) must not drop this one as a duplicate.
            attempt = dict(body, ask_id=corr if not sends else f"{corr}-{len(sends)}",
                           deadline_s=min(max(deadline - time.monotonic(), 0.001), budget.MAX_DEADLINE_S))
            env = wire.Envelope(wire.Kind.ASK, self.sender, attempt, corr=corr, reply_to=self.inbox.topic)
            generation = self.bus.connects
            self.bus.publish(target, senders.encode(self.keys, env, target), qos=1)
            sends.append(time.monotonic())
            return generation

        try:
            sent_on = send()
            while True:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    if self.bus.disconnects > disconnects or not self.bus.wait_connected(0):
                        # paho may notice a dead broker only after we sent: say why, not just "no answer"
                        raise TransportError(f"lost the broker connection ({self.bus.broker}) during the ask and "
                                             f"no answer came within its {timeout:g} s timeout")
                    extra_info = f"; sent {len(sends)} times across broker reconnects" if len(sends) > 1 else ""
                    raise TransportError(f"no answer within {timeout:g} s"
                                         + (f" from node {node}" if node else "") + extra_info)
                try:
                    admitted = gate.take(replies.get(timeout=min(left, 0.2)))
                except queue.Empty:
                    admitted = gate.recheck()  # a notice held while our view of the router lagged
                    if not admitted and self._should_resend(sent_on, sends[-1], node, serving, replied, now,
                                                            resend_s):
                        if len(sends) >= max_sends:
                            raise TransportError(
                                f"no answer after sending the ask {len(sends)} times (broker connection lost "
                                f"{self.bus.disconnects} times, or nodes went offline); giving up") from None
                        log.info("ask %s: sending again (attempt %d)", corr, len(sends) + 1)
                        sent_on, serving = send(), None
                for reply in admitted:  # only what the node the ask went to sent (with keys)
                    replied = True
                    serving = serving or reply.sender
                    if reply.kind is wire.Kind.TOKEN:
                        if first is None:
                            first = time.monotonic()
                        i = reply.body.get("i")
                        if not isinstance(i, int):
                            pass_on(str(reply.body["text"]))
                            continue
                        if i < next_token:
                            continue  # a piece we already passed on (the stream of an earlier send)
                        # Pieces go on in order: one past a gap (pieces lost with the broker) waits
                        # until an earlier send's stream fills the gap, or the answer does.
                        if len(held) < HELD_MAX:
                            held[i] = str(reply.body["text"])
                        while next_token in held:
                            pass_on(held.pop(next_token))
                            next_token += 1
                    elif reply.kind is wire.Kind.ANSWER:
                        end = time.monotonic()
                        b = reply.body
                        rest = str(b["text"])
                        if on_text is not None and rest.startswith(streamed) and len(rest) > len(streamed):
                            on_text(rest[len(streamed):])  # what lost pieces left out
                        return AskResult(answer=str(b["text"]), node=str(b["node"]),
                                         prompt_tokens=int(b["prompt_tokens"]), new_tokens=int(b["new_tokens"]),
                                         ttft_s=(first or end) - t0, ttlt_s=end - t0,
                                         node_figures=dict(b, sends=len(sends)))
                    elif reply.kind is wire.Kind.ERROR:
                        raise AskFailed(str(reply.body["reason"]), str(reply.body["message"]), reply.sender)
        finally:
            self.inbox.close(corr)
            for _ in range(gate.unvouched()):
                self.rejects.add("wrong-sender")

    def router(self) -> str | None:
        """Who routes now, in our view: the smallest live name (``mesh.routing``)."""
        with self.changed:
            return router_of(v.name for v in self.peers.live(time.monotonic()))

    def _wait_announced(self, node: str | None, timeout: float) -> None:
        """Until ``node`` (or, for a routed ask, the router) sent "online" since our last connect."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while time.monotonic() < deadline:
                name = node or router_of(v.name for v in self.peers.live(time.monotonic()))
                t, up = self._status_at.get(name or "", (0.0, False))
                if up and t >= self._connected_at:
                    return
                self.changed.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))

    def _should_resend(self, sent_on: int, sent_at: float, node: str | None, serving: str | None,
                       replied: bool, now: float, resend_s: float) -> bool:
        """Whether a pending ask must go out again (see ``ask``)."""
        if not self.bus.connected.is_set():
            return False  # wait for the reconnect first
        if self.bus.connects != sent_on:
            return True  # the session was rebuilt: the ask or its replies may be gone
        with self.changed:
            if not replied and sent_at - self._connected_at < resend_s and self.bus.connects > 1 \
                    and now - sent_at > resend_s:
                return True  # sent just after a reconnect and unheard since: the node may not have been back
            who = serving or node
            if who is not None:
                t, up = self._status_at.get(who, (0.0, True))
                # A status since the send: offline (a routed ask goes to another node), or online,
                # which a node only says when its session was rebuilt (restarted or reconnected:
                # the ask or its replies may be gone).
                return t > sent_at and (up or node is None)
            # Routed, nobody replied yet, and a node went offline since: the router picks another.
            return any(t > sent_at and not up for t, up in self._status_at.values())
