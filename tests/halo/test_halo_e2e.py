"""End to end HALO: a real Mosquitto, a real coordinator and 3 real `mesh node --roles worker`
processes with SmolLM2-135M on loopback: w1 a full node (it slices its groups out of its loaded
model), w2 and w3 worker-only nodes (`--no-answer`: their groups read from the weight file)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.model import Decoder, load_model
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import CACHE_ROOT, ENV, Broker, asker_keys, require_model

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
WORKERS = ("w1", "w2", "w3")
WORKER_ONLY = ("w2", "w3")


def halo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodes.cli", *args]


class Proc:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def coordinator_view(client: MeshClient) -> dict[str, Any]:
    v = client.peers.get("coordinator")
    return (v.heartbeat.get("halo") or {}) if v is not None else {}


def wait_plan(client: MeshClient, workers: set[str], timeout: float = 120.0) -> dict[str, Any]:
    """Until the coordinator's active plan uses exactly ``workers`` (and nothing is pending)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        halo = coordinator_view(client)
        if set(halo.get("workers", [])) == workers and halo.get("pending") is None:
            return halo
        time.sleep(0.1)
    raise AssertionError(f"plan never covered {workers}: {coordinator_view(client)}")


@pytest.fixture(scope="module")
def halo_mesh(mosquitto_broker: Broker, log_dir: Path) -> Iterator[dict[str, Proc]]:
    require_model(MODEL)
    addr = f"127.0.0.1:{mosquitto_broker.port}"
    procs: dict[str, Proc] = {}
    try:
        for w in WORKERS:
            log = log_dir / f"halo-{w}.log"
            only = ("--no-answer",) if w in WORKER_ONLY else ()
            procs[w] = Proc(w, spawn(halo_argv("node", "--name", w, "--broker", addr, "--model", MODEL, "--roles",
                                               "worker", *only, "--threads", "1", "--heartbeat", "0.5", "--home",
                                               str(CACHE_ROOT)), open(log, "wb"), env=ENV), log)
        log = log_dir / "halo-coordinator.log"
        procs["coordinator"] = Proc("coordinator", spawn(halo_argv(
            "coordinator", "--broker", addr, "--model", MODEL, "--threads", "1", "--heartbeat", "0.5",
            "--home", str(CACHE_ROOT), "--replan-interval", "3600", "--sync", "strict"), open(log, "wb"), env=ENV), log)
        with MeshClient(mosquitto_broker.address, keyring=asker_keys()) as client:
            client.wait_online([*WORKERS, "coordinator"], 240, ready=lambda v: v.model == MODEL)
            wait_plan(client, set(WORKERS))
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_strict_generation_is_token_identical_to_the_plain_model(mosquitto_broker: Broker, halo_mesh: dict) -> None:
    prompt = "The capital of France is"
    loaded = load_model(CACHE_ROOT, MODEL)
    ref = Decoder(loaded).generate(Decoder(loaded).encode(prompt), 24)
    with MeshClient(mosquitto_broker.address, keyring=asker_keys()) as client:
        r = client.ask(prompt, node="coordinator", max_new_tokens=24, timeout=120, no_cache=True)
        halo = coordinator_view(client)
    figs = r.node_figures
    assert figs["token_ids"] == ref.token_ids, (r.answer, ref.text)
    assert figs["halo"]["sync"] == "strict"  # the coordinator's default (--sync strict)
    assert set(halo["workers"]) == set(WORKERS) and sum(halo["groups"].values()) == 30 * 24
    assert figs["halo"]["partials_on_time"] > 0 and len(figs["token_times_s"]) == len(ref.token_ids)


def test_strict_sync_sums_every_partial(mosquitto_broker: Broker, halo_mesh: dict) -> None:
    from nodes.bench.halo import _ask_raw

    loaded = load_model(CACHE_ROOT, MODEL)
    dec = Decoder(loaded)
    prompt = "def fibonacci(n):\n"
    ref = dec.generate(dec.encode(prompt), 16)
    with MeshClient(mosquitto_broker.address, keyring=asker_keys()) as client:
        body = _ask_raw(client, {"text": prompt, "max_new_tokens": 16, "halo_sync": "strict", "no_cache": True})
    assert body["token_ids"] == ref.token_ids
    halo = body["halo"]
    assert halo["sync"] == "strict" and halo["zeroed_groups"] == 0 and halo["local_fallback_groups"] == 0
    assert halo["partials_on_time"] == halo["steps"] * len(WORKERS)
    assert halo["link_steps"] == halo["steps"]  # every frame over the coordinator's direct link
    assert body["tpot_s"] > 0
    # An old ask that still asks for the bus and the HF decode step (comparison switches, gone):
    # answered alike, over the direct link, the fields ignored and counted in the heartbeat.
    with MeshClient(mosquitto_broker.address, keyring=asker_keys()) as client:
        old = _ask_raw(client, {"text": prompt, "max_new_tokens": 16, "halo_sync": "strict", "no_cache": True,
                                "halo_link": False, "halo_lean": False})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rejects = client.peers.get("coordinator").heartbeat.get("rejects") or {}
            if rejects.get("ignored-field.halo-link") and rejects.get("ignored-field.halo-lean"):
                break
            time.sleep(0.2)
    assert old["token_ids"] == ref.token_ids and old["halo"]["link_steps"] == old["halo"]["steps"]
    assert rejects.get("ignored-field.halo-link", 0) >= 1 and rejects.get("ignored-field.halo-lean", 0) >= 1


# Worker faults (killed, frozen) mid-generation, relaxed and strict: tests/halo/test_halo_faults.py


def test_strict_stays_exact_while_the_workers_links_keep_breaking(mosquitto_broker: Broker, halo_mesh: dict) -> None:
    """Each worker reads and answers the MLP inputs on its own connection (``mesh.mqtt.direct.DirectLink``).
    Another client taking that connection's client id makes the broker drop it, again and again
    while a strict generation runs: the worker falls back to the bus, reconnects, and not a token
    changes."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from nodes.bench.halo import _ask_raw

    loaded = load_model(CACHE_ROOT, MODEL)
    dec = Decoder(loaded)
    prompt = "A short history of the printing press:"
    ref = dec.generate(dec.encode(prompt), 20)
    kicks = 0
    stop = threading.Event()

    def kick() -> None:
        nonlocal kicks
        while not stop.wait(0.15):
            for w in WORKERS:  # one connect each, no reconnect: the worker takes its id back
                c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"mesh-{w}-halo", protocol=mqtt.MQTTv311)
                c.connect("127.0.0.1", mosquitto_broker.port, 10)
                c.loop(0.05)
                c.disconnect()
                kicks += 1

    t = threading.Thread(target=kick, daemon=True)
    with MeshClient(mosquitto_broker.address, keyring=asker_keys()) as client:
        t.start()
        try:
            body = _ask_raw(client, {"text": prompt, "max_new_tokens": 20, "halo_sync": "strict", "no_cache": True})
        finally:
            stop.set()
            t.join(10)
        assert body["token_ids"] == ref.token_ids
        assert kicks >= 3
        # A frame the broken link lost is sent again: no step waits out the strict timeout (10 s)
        assert body["halo"]["stops"].get("strict-timeout", 0) == 0, body["halo"]["stops"]
        after = _ask_raw(client, {"text": prompt, "max_new_tokens": 20, "halo_sync": "strict", "no_cache": True})
    assert after["token_ids"] == ref.token_ids
    logs = {w: halo_mesh[w].log.read_text(errors="replace") for w in WORKERS}
    assert all("direct link to" in text and "broke" in text for text in logs.values()), logs
