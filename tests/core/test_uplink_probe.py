"""mesh.uplink_probe: an echo counts only with the random tag of the ping it answers (review L4:
the node's reply topic is writable by others; a forged early echo would shrink its round trip
and inflate its bandwidth)."""

from __future__ import annotations

import threading
import time
from typing import Any

from mesh import wire
from mesh.uplink_probe import LinkProbe


class Bus:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[wire.Envelope] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.sent.append(wire.decode(payload))


class Inbox:
    topic = "mesh/v1/reply/node-me"
    keys = None  # keyless: plain envelopes (mesh.auth.senders)
    ping_handler: Any = None


def test_only_the_real_echo_counts() -> None:
    bus = Bus()
    probe = LinkProbe(bus, Inbox(), "me", interval_s=0.01, bandwidth_every_s=1e9)  # type: ignore[arg-type]
    probe.start()
    deadline = time.monotonic() + 10
    while not bus.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    probe.stop()
    real = bus.sent[0]
    seq = real.corr.split(".")[0]  # "lp1"
    assert seq.startswith("lp") and len(real.corr) > len(seq) + 8
    # ... and a tag that is not ASCII (secrets.compare_digest raised TypeError on the network
    # thread: found by tests/fuzz/test_fuzz_handlers.py[inbox+link], seed 63127)
    for forged in (seq, f"{seq}.0000000000000000", f"bw{seq[2:]}", f"{seq}.", f"{seq}.b\u00e9\x00\u20ac"):
        env = wire.Envelope(wire.Kind.PING, "me", {"t": 0.0}, corr=forged)
        assert probe._on_echo(env) is False  # not ours: the inbox drops and counts it
    assert probe.snapshot()["replies"] == 0
    assert probe._on_echo(real) is True
    assert probe.snapshot()["replies"] == 1
