"""E9 of REVIEW-SECURITY.md as a regression test: forged HALO partials in strict mode.

`mesh up --halo --nodes 2` as real processes (the embedded amqtt broker, two SmolLM2 workers, the
coordinator); a forger with no credentials (any local client of amqtt) reads every MLP input and
answers it first, in the name of every worker, with NaN partials. Before authentication the
coordinator took the first partial per worker, the forger's, and the strict answer changed; with
identities (made by `mesh up` under MESH_HOME) the forged partials carry no valid tag and are
refused, so strict tokens stay identical to the plain model's."""

from __future__ import annotations

import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics
from mesh.halo import frame as halo_wire
from mesh.model import Decoder, load_model
from nodes.client import MeshClient, asker_keyring
from nodes.up import MeshProcesses, free_port
from tests.conftest import CACHE_ROOT, require_model

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
WORKERS = ["worker1", "worker2"]
PROMPT = "The three primary colours are"
TOKENS = 12


class Forger:
    """The review's halo_forge.py: every MLP input answered at once, in every worker's name, NaN."""

    def __init__(self, port: int, workers: list[str]) -> None:
        self.workers, self.sent = workers, 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="halo-forger")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topics.node_mlp("coordinator"), 0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        f = halo_wire.decode(m.payload, 1 << 24)
        y = torch.full(tuple(f.tensor.shape), float("nan"), dtype=torch.float16)
        for w in self.workers:  # the first partial per worker and step wins; the honest one arrives second
            client.publish(f.reply_to, halo_wire.encode(halo_wire.PARTIAL, w, f.epoch, f.step, f.layer, y), qos=0)
            self.sent += 1

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def halo_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcesses]:
    """`mesh up --halo --nodes 2` with a MESH_HOME of its own (the converted models linked in), so
    the identities it makes on first run are this test's."""
    require_model(MODEL)
    home = tmp_path_factory.mktemp("home")
    for entry in CACHE_ROOT.iterdir():
        if entry.name != "identity":
            (home / entry.name).symlink_to(entry)
    procs = MeshProcesses(WORKERS, MODEL, free_port(), home=home, log_dir=tmp_path_factory.mktemp("logs"),
                          node_args=["--roles", "worker", "--threads", "1", "--heartbeat", "0.5"], coordinator=True)
    procs.start(timeout=300)
    try:
        yield procs
    finally:
        procs.stop()


def strict_ids(client: MeshClient) -> list[int]:
    r = client.ask(PROMPT, node="coordinator", max_new_tokens=TOKENS, timeout=240, no_cache=True,
                   extra={"halo_sync": "strict"})
    assert r.node_figures["halo"]["sync"] == "strict"
    return list(r.node_figures["token_ids"])


def test_forged_nan_partials_do_not_change_a_strict_answer(halo_up: MeshProcesses) -> None:
    loaded = load_model(CACHE_ROOT, MODEL)
    ref = Decoder(loaded).generate(Decoder(loaded).encode(PROMPT), TOKENS).token_ids
    with MeshClient(halo_up.address, keyring=asker_keyring(halo_up.home)) as client:  # this mesh's identities
        assert strict_ids(client) == ref
        forger = Forger(halo_up.port, WORKERS)
        try:
            forged = strict_ids(client)
        finally:
            forger.stop()
        assert forger.sent >= 2 * len(ref)  # the attack ran: NaN partials for every step it saw
        assert forged == ref, "forged partials changed the strict answer"
        deadline = time.monotonic() + 10  # the refusals are counted in the coordinator's heartbeat
        while time.monotonic() < deadline:
            rejects = client.peers.get("coordinator").heartbeat.get("rejects") or {}
            if rejects.get("unauthenticated", 0) >= forger.sent // 2:
                break
            time.sleep(0.2)
        assert rejects.get("unauthenticated", 0) >= forger.sent // 2, rejects
