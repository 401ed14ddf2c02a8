"""E6 (review M6): an ask id cannot be burned in advance by someone else.

The documented automations use ids like ``briefing-YYYYMMDD``. Before the fix, anyone who may
publish on ``mesh/v1/ask`` (Home Assistant's own account included) could send tomorrow's id first,
to the victim's reply topic, and the real briefing was dropped as a repeat for ten minutes, with
no error. Now a repeat must be the very same ask (``mesh.dedupe.ask_identity``), so the real one
is answered, and a true repeat is still answered once.

Real processes on a real amqtt broker: one SmolLM2 node, raw MQTT clients for the attacker and the
home automation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker, NodeProcess, start_node
from tests.system.rogue import Rogue, wait_json

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
VICTIM = "Good morning! Here is your briefing for today, the seventh of December:"


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    proc = start_node(amqtt_broker, "bnode", MODEL, log_dir, "--threads", "1", "--no-cache")
    yield proc
    proc.stop()


@pytest.fixture()
def home(amqtt_broker: Broker) -> Iterator[Rogue]:
    rogue = Rogue(amqtt_broker, f"burn-home-{time.monotonic_ns()}")
    rogue.subscribe("homeassistant-mesh/victim")
    yield rogue
    rogue.close()


def test_an_id_burned_in_advance_does_not_drop_the_real_ask(amqtt_broker: Broker, node: NodeProcess,
                                                            home: Rogue) -> None:
    ask_id = f"briefing-{time.monotonic_ns()}"
    attacker = Rogue(amqtt_broker, "burn-attacker")
    try:
        attacker.json_ask("Say hello", "homeassistant-mesh/victim", max_new_tokens=2, ask_id=ask_id)
        burned = wait_json(home, "homeassistant-mesh/victim", 60)
        assert burned is not None and burned.get("id") == ask_id
        home.json_ask(VICTIM, "homeassistant-mesh/victim", max_new_tokens=2, ask_id=ask_id)
        real = wait_json(home, "homeassistant-mesh/victim", 60)
    finally:
        attacker.close()
    assert real is not None, "the real briefing was dropped as a repeat of the attacker's"
    assert real.get("id") == ask_id and real["prompt_tokens"] > burned["prompt_tokens"]


def test_the_very_same_ask_is_still_answered_once(amqtt_broker: Broker, node: NodeProcess, home: Rogue) -> None:
    ask_id = f"voice-{time.monotonic_ns()}"
    home.json_ask(VICTIM, "homeassistant-mesh/victim", max_new_tokens=2, ask_id=ask_id)
    home.json_ask(VICTIM, "homeassistant-mesh/victim", max_new_tokens=2, ask_id=ask_id)
    first = wait_json(home, "homeassistant-mesh/victim", 60)
    assert first is not None and first.get("id") == ask_id
    assert wait_json(home, "homeassistant-mesh/victim", 5) is None  # the repeat was dropped
