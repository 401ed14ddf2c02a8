"""Shared fixtures: real brokers on free loopback ports, and real node processes."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mesh.auth.keyring import Keyring
from mesh.config import BrokerAddress
from mesh.model import converted_dir
from nodes.client import MeshClient, asker_keyring
from nodes.up import free_port, spawn, wait_port

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("MESH_HOME", Path.home() / ".cache" / "mesh"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@functools.cache
def asker_keys() -> Keyring | None:
    """The test clients' identity (``mesh.auth``, role ``asker``) under CACHE_ROOT, where the nodes
    of ``start_node`` enrol theirs. Like ``mesh up``, the first call makes a throwaway CA there if
    none is (a directory whose identities a gateway issued is left as it is): nodes and clients
    then both hold keys; with a gateway's CA and no asker identity, neither side of a test does."""
    from mesh.auth import store

    directory = store.identity_dir(CACHE_ROOT)
    if not (directory / "ca.crt").exists():
        store.issue(directory, "asker", "asker")
    return asker_keyring(CACHE_ROOT)


@functools.cache
def peer_keys(name: str) -> Keyring | None:
    """A node identity for a test's stand-in peer (a raw client playing node ``name``): issued
    beside the nodes' when the tests hold identities (``asker_keys``), else None."""
    from mesh.auth.store import identity_dir, load_keyring

    return load_keyring(identity_dir(CACHE_ROOT), name, "node") if asker_keys() is not None else None


def mesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodes.cli", *args]


def require_model(key: str) -> Path:
    path = converted_dir(CACHE_ROOT, key)
    if not (path / "mesh-meta.json").exists():
        pytest.fail(f"model {key} is not converted under {path}: run `make test` (it runs `mesh setup` first)")
    return path


class Broker:
    def __init__(self, kind: str, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.kind, self.proc, self.port, self.log = kind, proc, port, log
        self.address = BrokerAddress("127.0.0.1", port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_amqtt(log_dir: Path) -> Broker:
    port = free_port()
    log = log_dir / f"amqtt-{port}.log"
    proc = spawn(mesh_argv("broker", "--port", str(port)), open(log, "wb"), env=ENV)
    wait_port("127.0.0.1", port, 30, proc)
    return Broker("amqtt", proc, port, log)


def mosquitto_conf(port: int, directory: Path) -> Path:
    conf = directory / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        f"message_size_limit {16 * 1024 * 1024 + 4096}\n"
        "log_dest stderr\n"
    )
    return conf


def start_mosquitto(log_dir: Path) -> Broker:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        pytest.fail("mosquitto is not installed: `make test` installs it (deploy/system-deps.sh)")
    port = free_port()
    log = log_dir / f"mosquitto-{port}.log"
    proc = spawn([exe, "-c", str(mosquitto_conf(port, log_dir))], open(log, "wb"))
    wait_port("127.0.0.1", port, 15, proc)
    return Broker("mosquitto", proc, port, log)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def amqtt_broker(log_dir: Path) -> Iterator[Broker]:
    broker = start_amqtt(log_dir)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mosquitto_broker(log_dir: Path) -> Iterator[Broker]:
    broker = start_mosquitto(log_dir)
    yield broker
    broker.stop()


class NodeProcess:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_node(broker: Broker, name: str, model: str, log_dir: Path, *extra: str,
               timeout: float = 240.0) -> NodeProcess:
    """A real `mesh node` process; returns once its status and heartbeat say it serves ``model``."""
    require_model(model)
    asker_keys()  # the CA first: the node enrols itself under CACHE_ROOT (mesh.auth.store.load_keyring)
    log = log_dir / f"{name}-{broker.port}.log"
    proc = spawn(mesh_argv("node", "--name", name, "--broker", f"127.0.0.1:{broker.port}", "--model", model,
                           "--heartbeat", "0.5", "--home", str(CACHE_ROOT), *extra), open(log, "wb"), env=ENV)
    node = NodeProcess(name, proc, log)
    deadline = time.monotonic() + timeout
    with MeshClient(broker.address, keyring=asker_keys()) as client:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"node {name} exited ({proc.returncode}): {log.read_text()[-3000:]}")
            try:
                client.wait_online([name], 1.0, ready=lambda v: v.model == model)
                return node
            except Exception:
                if time.monotonic() > deadline:
                    node.stop()
                    raise


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """The coordinator's setting (--threads 1), under which its two-thread LM head and lean decode
    step are bitwise the plain HF products."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
