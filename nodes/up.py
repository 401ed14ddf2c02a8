"""`mesh up`: the embedded broker plus K node processes on this machine, started and stopped as one.

Children run in their own sessions (a terminal's Ctrl-C reaches only the supervisor, which
stops nodes first, so they can publish ``offline``, then the broker) and get SIGTERM if the
supervisor dies (``PR_SET_PDEATHSIG``), so no child outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from mesh.config import BrokerAddress
from mesh.errors import TransportError
from nodes.client import MeshClient
from mesh.routing import NodeView


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransportError(f"broker process exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TransportError(f"nothing listens on {host}:{port} after {timeout:g} s")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(argv: list[str], log: IO[bytes] | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # Without a log file children write to our stderr: our stdout belongs to our caller.
    out = log if log is not None else sys.stderr
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)


@dataclass
class MeshProcesses:
    """A broker and named nodes as child processes."""

    node_names: list[str]
    model: str
    port: int
    host: str = "127.0.0.1"
    home: Path | None = None  # converted models and data
    log_dir: Path | None = None  # None: children write to our stderr
    node_args: list[str] = field(default_factory=list)
    coordinator: bool = False  # also run the HALO coordinator over the nodes (workers)
    broker: subprocess.Popen[bytes] | None = None
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port)

    def pids(self) -> list[int]:
        procs = ([self.broker] if self.broker else []) + list(self.nodes.values())
        return [p.pid for p in procs]

    def _log(self, name: str) -> IO[bytes] | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(f)
        return f

    def make_identities(self) -> None:
        """A throwaway CA and one identity per process under ``<home>/identity`` (``mesh.auth``):
        made on the first run, reused afterwards, so one box needs no configuration. A directory
        whose identities came from a gateway (its CA key is elsewhere) is left as it is."""
        if self.home is None:
            return
        from mesh.auth import store

        d = store.identity_dir(self.home)
        if (d / "ca.crt").exists() and not store.has_ca_key(d):
            return
        for name in self.node_names:
            store.issue(d, name, "node")
        if self.coordinator:
            store.issue(d, "coordinator", "coordinator")
        store.issue(d, "asker", "asker")

    def start(self, timeout: float = 300.0) -> None:
        """Start everything and wait until every node is online; on failure stop what started."""
        try:
            self.make_identities()
            self.broker = spawn([sys.executable, "-m", "nodes.cli", "broker", "--host", self.host,
                                 "--port", str(self.port)], self._log("broker"))
            wait_port(self.host, self.port, 30.0, self.broker)
            for name in self.node_names:
                argv = [sys.executable, "-m", "nodes.cli", "node", "--name", name,
                        "--broker", f"{self.host}:{self.port}", "--model", self.model, *self.node_args]
                if self.home is not None:
                    argv += ["--home", str(self.home)]
                self.nodes[name] = spawn(argv, self._log(name))
            self.wait_online(timeout)
            if self.coordinator:
                argv = [sys.executable, "-m", "nodes.cli", "coordinator", "--broker", f"{self.host}:{self.port}",
                        "--model", self.model]
                if self.home is not None:
                    argv += ["--home", str(self.home)]
                self.nodes["coordinator"] = spawn(argv, self._log("coordinator"))
                self.wait_online(timeout, ["coordinator"], ready=self._plan_active)
        except BaseException:
            self.stop()
            raise

    def _plan_active(self, view: NodeView) -> bool:
        """The coordinator's plan covers every worker and no epoch switch is pending."""
        halo = view.heartbeat.get("halo") or {}
        return set(self.node_names) <= set(halo.get("workers") or ()) and halo.get("pending") is None

    def wait_online(self, timeout: float, names: list[str] | None = None,
                    ready: Callable[[NodeView], bool] | None = None) -> None:
        names = names or self.node_names
        ready = ready or (lambda v: v.model == self.model)
        deadline = time.monotonic() + timeout
        with MeshClient(self.address, name=f"up-{os.getpid()}") as client:
            while True:
                dead = {n: p.returncode for n, p in self.nodes.items() if p.poll() is not None}
                if dead:
                    raise TransportError(f"node process(es) exited during start: {dead}"
                                         + (f"; logs in {self.log_dir}" if self.log_dir else ""))
                # A heartbeat, not only the status: its model must be the one asked for.
                try:
                    client.wait_online(names, min(2.0, max(deadline - time.monotonic(), 0.01)), ready=ready)
                    return
                except TransportError:
                    if time.monotonic() >= deadline:
                        raise

    def stop(self, timeout: float = 20.0) -> None:
        """Nodes first (SIGTERM, so they go offline cleanly), then the broker; kill what lingers."""
        for group in (list(self.nodes.values()), [self.broker] if self.broker else []):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "MeshProcesses":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
