"""A node's measurement of its own link to the broker (what the heartbeat's ``link`` reports).

Small pings go out at a steady pace to the node's own reply topic and come back through the
broker; each is resolved once as ok, late or lost (``mesh.uplink_stats``). Now and then a large
ping measures bandwidth: it crosses the node's link twice (up to the broker, back down), so
the rate is ``2 * bytes / seconds``. Pings are asynchronous: a lost one never stalls the next.

Each ping's id ends in a random tag of its own (``lp<seq>.<tag>``): the node's reply topic is
writable by other clients, and an echo forged ahead of the real one would shrink the measured
round trip and inflate the bandwidth, steering this node's fetch decisions (review L4).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

from mesh import wire
from mesh.auth import senders
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from mesh.errors import MeshError
from mesh.loops import guarded
from mesh.uplink_stats import LinkStats, LinkStatsConfig

log = logging.getLogger(__name__)

BANDWIDTH_PROBE_BYTES = 256 * 1024
TAGS_KEPT = 256  # pings whose echo may still count (far more than the timeout spans)


class LinkProbe:
    def __init__(self, bus: MqttBus, inbox: ReplyInbox, name: str, interval_s: float = 0.5,
                 late_s: float = 0.1, timeout_s: float = 2.0, bandwidth_every_s: float = 30.0) -> None:
        self.bus, self.inbox, self.name = bus, inbox, name
        self.interval_s = interval_s
        self.bandwidth_every_s = bandwidth_every_s
        self.stats = LinkStats(LinkStatsConfig(timeout_s=timeout_s, late_s=late_s))
        self._lock = threading.Lock()
        self._big_sent: dict[int, float] = {}
        self._tags: dict[int, str] = {}  # seq -> the random tag of its pings (the newest TAGS_KEPT)
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=guarded(f"{name}-link", self._loop, self._stop), name=f"{name}-link",
                                        daemon=True)
        inbox.ping_handler = self._on_echo

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.stats.snapshot()

    def rtt_s(self) -> float | None:
        ms = self.snapshot().get("rtt_ewma_ms")
        return None if ms is None else float(ms) / 1000.0

    def bandwidth_Bps(self) -> float | None:
        mbit = self.snapshot().get("bw_ewma_mbit")
        return None if mbit is None else float(mbit) * 1e6 / 8

    def _send(self, corr: str, pad: int = 0) -> None:
        body: dict[str, Any] = {"t": time.time()}
        if pad:
            body["pad"] = bytes(pad)
        env = wire.Envelope(wire.Kind.PING, self.name, body, corr=corr)
        # sealed when the inbox holds keys: it opens everything on its topic (mesh.mqtt.inbox)
        self.bus.publish(self.inbox.topic, senders.encode(self.inbox.keys, env, self.inbox.topic), qos=0)

    def _loop(self) -> None:
        next_bw = time.monotonic() + min(2.0, self.bandwidth_every_s)
        while not self._stop.wait(self.interval_s):
            if not self.bus.connected.is_set():
                continue
            now = time.monotonic()
            self._seq += 1
            tag = secrets.token_hex(8)
            try:
                with self._lock:
                    self.stats.expire(now)
                    self.stats.ping_sent(self._seq, now)
                    self._tags[self._seq] = tag
                    self._tags.pop(self._seq - TAGS_KEPT, None)
                self._send(f"lp{self._seq}.{tag}")
                if now >= next_bw:
                    next_bw = now + self.bandwidth_every_s
                    with self._lock:
                        self._big_sent = {self._seq: now}
                    self._send(f"bw{self._seq}.{tag}", BANDWIDTH_PROBE_BYTES)
            except MeshError as exc:
                log.info("link ping not sent: %s", exc)

    def _on_echo(self, env: wire.Envelope) -> bool:
        """Called by the inbox (network thread) for pings it does not wait for itself."""
        corr = env.corr or ""
        now = time.monotonic()
        number, _, tag = corr[2:].partition(".")
        try:
            seq = int(number)
        except ValueError:
            return False
        with self._lock:
            if not tag or not tag.isascii() or not secrets.compare_digest(tag, self._tags.get(seq, "")):
                return False  # forged or too old: the inbox drops and counts it (unexpected-reply)
            if corr.startswith("lp"):
                self.stats.reply_received(seq, now)
                return True
            if corr.startswith("bw") and seq in self._big_sent:
                self.stats.record_transfer(2 * BANDWIDTH_PROBE_BYTES, max(now - self._big_sent.pop(seq), 1e-6))
                return True
        return False
