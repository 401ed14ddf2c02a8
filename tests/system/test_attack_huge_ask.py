"""E7 (review H5): the work of one ask is bounded in tokens and in time, and stops for nobody.

Before the fix an ask was capped in characters (32,000) only: 32,000 digits are ~32,000 tokens
(no tokenizer has multi-digit tokens), gigabytes of KV and minutes of CPU, and nothing stopped it
when its asker gave up. Now a node refuses an ask whose prompt and answer exceed its maximum
context (``too-long``), an ask carries a deadline as a relative budget (``deadline_s``, measured
on the node's monotonic clock) and the work stops when it passes (``deadline``) or when the
asker's last will says it is gone (``asker-gone``).

Real processes on a real amqtt broker: one SmolLM2 node with a maximum context of 256 tokens
(``MESH_MAX_CONTEXT``, the environment form of ``--max-context``), raw MQTT askers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import CACHE_ROOT, ENV, Broker, NodeProcess, asker_keys, mesh_argv, require_model
from tests.system.rogue import Rogue, rejects_of, wait_json

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
NAME = "hnode"
MAX_CONTEXT = 256
COUNTING = "Count to one hundred: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # goes on for many tokens
LONG_ANSWER = 200  # new tokens: tens of seconds at one thread, far beyond the budgets below


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    require_model(MODEL)
    log = log_dir / f"{NAME}-{amqtt_broker.port}.log"
    proc = spawn(mesh_argv("node", "--name", NAME, "--broker", f"127.0.0.1:{amqtt_broker.port}", "--model", MODEL,
                           "--heartbeat", "0.5", "--home", str(CACHE_ROOT), "--threads", "1", "--no-cache"),
                 open(log, "wb"), env={**ENV, "MESH_MAX_CONTEXT": str(MAX_CONTEXT)})
    handle = NodeProcess(NAME, proc, log)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online([NAME], 240, ready=lambda v: v.model == MODEL)
        yield handle
    finally:
        handle.stop()


def replies(rogue: Rogue, topic: str, corr: str, timeout: float) -> list[wire.Envelope]:
    """Envelopes for ``corr`` on ``topic`` until an ANSWER or ERROR (or the timeout)."""
    out: list[wire.Envelope] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = rogue.next(left)
        if got is None or got[0] != topic:
            continue
        env = wire.decode(got[1])
        if env.corr == corr:
            out.append(env)
            if env.kind in (wire.Kind.ANSWER, wire.Kind.ERROR):
                break
    return out


def test_an_ask_of_too_many_tokens_is_refused(amqtt_broker: Broker, node: NodeProcess) -> None:
    home = Rogue(amqtt_broker, "huge-home")
    try:
        home.subscribe("homeassistant-mesh/big")
        home.json_ask("1" * 2000, "homeassistant-mesh/big", max_new_tokens=1)  # 2,000 characters: far under 32,000
        answer = wait_json(home, "homeassistant-mesh/big", 120)
    finally:
        home.close()
    assert answer is not None and answer.get("error") == "too-long", answer


def test_work_stops_when_the_deadline_passes(amqtt_broker: Broker, node: NodeProcess) -> None:
    asker = Rogue(amqtt_broker, "deadline-asker")
    topic, corr = topics.reply("deadline-asker"), f"dl-{time.monotonic_ns()}"
    try:
        asker.subscribe(topic)
        t0 = time.monotonic()
        asker.envelope(topics.node_ask(NAME), wire.Kind.ASK, "deadline-asker",
                       {"text": COUNTING, "max_new_tokens": LONG_ANSWER, "deadline_s": 1.0}, corr=corr, reply_to=topic)
        got = replies(asker, topic, corr, 180)
        took = time.monotonic() - t0
    finally:
        asker.close()
    assert got and got[-1].kind is wire.Kind.ERROR and got[-1].body["reason"] == "deadline", \
        [(e.kind, dict(e.body)) for e in got[-2:]]
    tokens = sum(e.kind is wire.Kind.TOKEN for e in got)
    assert tokens < LONG_ANSWER // 2, f"{tokens} tokens streamed in {took:.1f} s on a 1 s budget"


def test_a_home_assistant_ask_keeps_its_deadline(amqtt_broker: Broker, node: NodeProcess) -> None:
    """A JSON ask's ``deadline_s`` reaches the node (the JSON decoder dropped it before)."""
    home = Rogue(amqtt_broker, "deadline-home")
    try:
        home.subscribe("homeassistant-mesh/slow")
        t0 = time.monotonic()
        home.json_ask(COUNTING, "homeassistant-mesh/slow", max_new_tokens=LONG_ANSWER, deadline_s=1.0)
        answer = wait_json(home, "homeassistant-mesh/slow", 180)
        took = time.monotonic() - t0
    finally:
        home.close()
    assert answer is not None and answer.get("error") == "deadline", (answer, f"{took:.1f} s")


def test_work_stops_when_the_asker_is_gone(amqtt_broker: Broker, node: NodeProcess) -> None:
    name = "gone-asker"
    asker = Rogue(amqtt_broker, name, will=(topics.asker_status(name), topics.OFFLINE, False))
    topic, corr = topics.reply(name), f"gone-{time.monotonic_ns()}"
    asker.subscribe(topic)
    asker.envelope(topics.node_ask(NAME), wire.Kind.ASK, name,
                   {"text": COUNTING, "max_new_tokens": LONG_ANSWER, "deadline_s": 600.0}, corr=corr, reply_to=topic)
    first = replies_until_token(asker, topic, corr, 120)
    assert first, "the node never started answering"
    asker.client.loop_stop()
    asker.client.socket().close()  # the connection drops without DISCONNECT: the broker sends the will
    assert rejects_of(amqtt_broker, NAME, "asker-gone", timeout=60) >= 1
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:  # and the node is free for the next ask
        assert client.ask("The capital of France is", node=NAME, max_new_tokens=2, timeout=60).new_tokens >= 1


def replies_until_token(rogue: Rogue, topic: str, corr: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = rogue.next(left)
        if got is not None and got[0] == topic and wire.decode(got[1]).kind is wire.Kind.TOKEN:
            return True
    return False
