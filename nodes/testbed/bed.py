"""The Testbed: ``with Testbed(spec) as tb:`` runs the steps of ``nodes.testbed.plan`` as root to
build namespaces, links, shaping, loss and cgroups, starts processes inside them, and removes
everything on exit (:func:`nodes.testbed.state.teardown` also after a crash).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

from mesh.errors import ConfigError, MeshError
from mesh.sysmem import CgroupMemory, ProcessMemory, process_memory

from nodes.testbed.plan import (
    broker_argv,
    mosquitto_conf,
    node_argv,
    owned,
    plan_cleanup,
    plan_set_cpu,
    plan_set_loss,
    plan_set_mem,
    plan_set_rate,
    plan_up,
    spawn_argv,
)
from nodes.testbed.profiles import Calibration, CpuQuota
from nodes.testbed.record import ProcessRecord, TestbedState
from nodes.testbed.shell import (
    PROBE_INSTANCE,
    REPO_ROOT,
    execute,
    group_memory,
    kill_all,
    pids_in,
    locked,
    reset_peak,
    scan,
    unavailable_reason,
    wait_for_port,
)
from nodes.testbed.spec import GATEWAY, Layout, TestbedSpec, layout
from nodes.testbed.state import (
    DEFAULT_RUN_DIR,
    in_use,
    read_state,
    teardown,
    write_state,
)


def identity_parts(home: Path, name: str, role: str = "node") -> list[str]:
    """What a node's private home needs of ``home``'s identities to be the keyed member ``name``
    (issued now where the CA key lies), or nothing in a keyless home (nodes and client alike)."""
    from mesh.auth.store import identity_dir, load_keyring

    directory = identity_dir(home)
    if load_keyring(directory, name, role) is None:
        return []
    parts = [f"identity/{name}.crt", f"identity/{name}.key", "identity/ca.crt"]
    return parts + (["identity/crl.pem"] if (directory / "crl.pem").exists() else [])


def drop_page_cache(root: Path) -> None:
    """Evict ``root``, or every file under it, from the page cache (clean pages: uncharged from
    their cgroup)."""
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class TestbedBusy(ConfigError):
    """The instance is up and owned by a live process or left running on purpose."""

    __test__ = False


class Testbed:
    """A running testbed instance. Use as a context manager, or ``up()`` / ``down()``.

    ``detached=True`` marks the state as intentionally left running (``mesh testbed up``);
    otherwise a later ``up`` of the same instance treats it as crashed once this process is gone.
    """

    __test__ = False

    def __init__(
        self,
        spec: TestbedSpec,
        *,
        run_dir: Path = DEFAULT_RUN_DIR,
        detached: bool = False,
        calibration: Calibration | None = None,
        python: str = sys.executable,
        cwd: Path | None = REPO_ROOT,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        if spec.instance == PROBE_INSTANCE:
            raise ConfigError(f"instance {PROBE_INSTANCE} is reserved")
        self.spec = spec
        self.layout: Layout = layout(spec)
        self.run_dir = Path(run_dir)
        self.detached = detached
        self.calibration = calibration
        self.python = python
        self.cwd = cwd
        self._now = now
        self._children: list[subprocess.Popen[Any]] = []
        self._records: list[ProcessRecord] = []
        self._broker: dict[str, object] | None = None
        self._homes: list[Path] = []
        self._state: TestbedState | None = None
        self._is_up = False

    # -- lifecycle

    def up(self) -> "Testbed":
        reason = unavailable_reason()
        if reason:
            raise ConfigError(f"testbed unavailable: {reason}")
        inst = self.spec.instance
        with locked(self.run_dir):
            old = in_use(self.run_dir, inst)
            if old is not None:
                raise TestbedBusy(
                    f"testbed instance {inst} is up (owner pid {old.owner_pid}, detached={old.detached});"
                    f" run `mesh testbed down --instance {inst}` first"
                )
            # claim it before building anything, so a crash mid-way leaves a state to clean
            self._state = TestbedState(
                instance=inst,
                created_at=self._now().isoformat(timespec="seconds"),
                owner_pid=os.getpid(),
                detached=self.detached,
                spec=self.spec,
                calibration=self.calibration.to_dict() if self.calibration else None,
            )
            write_state(self.run_dir, self._state)
        try:
            self._clean_objects()  # leftovers of a crashed run of this instance
            execute(plan_up(self.layout))
        except BaseException:
            self.down()
            raise
        self._is_up = True
        return self

    def _clean_objects(self) -> None:
        with locked(self.run_dir):
            mine = owned(scan(), self.spec.instance)
            kill_all(mine)
            execute(plan_cleanup(mine))

    def down(self) -> dict[str, Any]:
        """Stop every process and remove every object of this instance. Idempotent."""
        for p in self._children:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        report = teardown(self.spec.instance, self.run_dir)
        for p in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)
        for home in self._homes:
            shutil.rmtree(home, ignore_errors=True)
        self._is_up = False
        return report

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- addresses

    @property
    def broker_address(self) -> tuple[str, int]:
        """(host, port) where nodes reach the broker (the gateway namespace's bridge address)."""
        return self.layout.broker_host, self.layout.broker_port

    @property
    def broker_url(self) -> str:
        host, port = self.broker_address
        return f"{host}:{port}"

    def address(self, node: str) -> str:
        return self.layout.gw_address if node == GATEWAY else self.layout.node(node).address

    def netns(self, node: str) -> str:
        return self.layout.gw_netns if node == GATEWAY else self.layout.node(node).netns

    def cgroup(self, node: str) -> str:
        return self.layout.gw_cgroup if node == GATEWAY else self.layout.node(node).cgroup

    # -- processes

    def spawn(
        self,
        node: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        role: str = "process",
        log: Path | None = None,
        **popen: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``'s namespace and cgroup (``"gw"``: the gateway's).

        ``env`` is added to this process's environment. ``log`` sends stdout and stderr to a
        file; otherwise ``popen`` keywords (``stdout=``, ``stdin=``, ``text=``...) pass through.
        The child gets its own session, so it outlives a crash of this process until
        :func:`teardown` finds it in the cgroup or namespace.
        """
        if not self._is_up:
            raise ConfigError("testbed is not up")
        full_env = dict(os.environ)
        full_env.update(env or {})
        wrapped = spawn_argv(self.cgroup(node), self.netns(node), argv)
        logf: IO[bytes] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            logf = open(log, "ab")
            popen.setdefault("stdout", logf)
            popen.setdefault("stderr", subprocess.STDOUT)
        popen.setdefault("cwd", self.cwd)
        try:
            proc = subprocess.Popen(wrapped, env=full_env, start_new_session=True, **popen)
        finally:
            if logf is not None:
                logf.close()
        self._children.append(proc)
        self._records.append(ProcessRecord(role, node, proc.pid, tuple(argv), str(log) if log else None))
        self._save()
        return proc

    def log_path(self, name: str) -> Path:
        return self.run_dir / str(self.spec.instance) / "logs" / f"{name}.log"

    def start_broker(self, kind: str = "mosquitto", timeout_s: float = 15.0) -> subprocess.Popen[Any]:
        """Start the broker in the gateway namespace and wait until its port accepts."""
        host, port = self.broker_address
        conf = self.run_dir / str(self.spec.instance) / "mosquitto.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(mosquitto_conf(host, port))
        argv = broker_argv(kind, self.python, host, port, str(conf))
        proc = self.spawn(GATEWAY, argv, role="broker", log=self.log_path(f"broker-{kind}"))
        self._broker = {"kind": kind, "host": host, "port": port, "pid": proc.pid}
        self._save()
        wait_for_port(host, port, timeout_s, proc)
        return proc

    def private_home(self, node: str, home: Path, parts: Sequence[str], timeout_s: float = 900.0) -> Path:
        """A mesh home for ``node`` with its own copy of ``parts`` of ``home`` (such as
        ``models/smollm2-135m``), written by a process in the node's cgroups; removed on down.

        Why: a file's page cache is charged to the memory cgroup that first reads it. A node
        that memory-maps weights another process has already read is not charged for them, so
        its cap does not count them and its mapped and major-fault figures stay at zero. Pages
        of its own copy are charged to it: under its cap the kernel evicts them and the node
        reads them back (major faults), as a Pi re-reads its SD card.
        """
        dst = Path(home) / "testbed" / "nodes" / f"{self.spec.instance}-{node}"
        shutil.rmtree(dst, ignore_errors=True)
        self._homes.append(dst)
        for part in parts:
            (dst / part).parent.mkdir(parents=True, exist_ok=True)
            proc = self.spawn(node, ["cp", "-r", "--", str(Path(home) / part), str(dst / part)], role="copy")
            if proc.wait(timeout=timeout_s) != 0:
                raise MeshError(f"could not copy {part} into {node}'s home {dst} (exit {proc.returncode})")
            # the source's pages it read were charged to the node too, where nothing had them cached
            drop_page_cache(Path(home) / part)
        drop_page_cache(dst)  # the copy's pages were charged to the node: what it maps is read anew
        self.reset_peak(node)  # and its peak starts after the copy
        return dst

    def start_node(self, name: str, model: str, env: Mapping[str, str] | None = None,
                   extra: Sequence[str] = ()) -> subprocess.Popen[Any]:
        argv = (*node_argv(self.python, name, self.broker_url, model), *extra)
        return self.spawn(name, argv, env=env, role="node", log=self.log_path(f"node-{name}"))

    def start_nodes(self, model: str, names: Sequence[str] | None = None, extra: Sequence[str] = (),
                    timeout_s: float = 300.0, private_from: Path | None = None) -> dict[str, subprocess.Popen[Any]]:
        """Start mesh nodes and return once all are online with ``model``.

        At a Pi Zero's share of a core, loading a model would take minutes, so nodes load
        unthrottled and get their quota back once online. Quota'd nodes run one torch
        thread: the calibration measured one thread, and the quota is per cgroup anyway.
        ``private_from`` (a mesh home): each node loads its own copy of the model
        (:meth:`private_home`), so its memory cap and figures count the weights' page cache;
        None: nodes share the files of this machine's mesh home, and the page cache of the
        weights is charged to whichever process read them first.
        """
        from mesh.config import BrokerAddress
        from nodes.client import MeshClient

        names = list(names or self.spec.names)
        procs: dict[str, subprocess.Popen[Any]] = {}
        for n in names:
            quota = self.spec.node(n).cpu
            self.set_cpu(n, None)
            home = [] if private_from is None else ["--home", str(self.private_home(
                n, private_from, [f"models/{model}", *identity_parts(private_from, n)]))]
            procs[n] = self.start_node(n, model, extra=[*extra, *home, *(["--threads", "1"] if quota else [])])
        host, port = self.broker_address
        deadline = time.monotonic() + timeout_s
        with MeshClient(BrokerAddress(host, port), name=f"testbed-{self.spec.instance}") as client:
            while True:
                dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                if dead:
                    oom = {n: f"OOM-killed under its {self.spec.node(n).mem_cap_mib} MiB cap"
                           for n in dead if self.oom_kills(n)}
                    raise MeshError(f"testbed nodes exited while starting: {dead} {oom or ''}"
                                    f" (logs in {self.log_path('')})")
                try:
                    client.wait_online(names, 1.0, ready=lambda v: v.model == model)
                    break
                except MeshError:
                    if time.monotonic() > deadline:
                        raise
        for n in names:
            self.restore_cpu(n)
        return procs

    # -- live changes

    def set_loss(self, node: str, pct: float) -> None:
        """Change ``node``'s random drop (each direction) to ``pct`` percent, atomically."""
        execute(plan_set_loss(self.layout, node, pct))

    def set_rate(self, node: str, mbit: float | None) -> None:
        """Change both directions of ``node``'s link to ``mbit`` Mbit/s (None: unshaped)."""
        execute(plan_set_rate(self.layout, node, mbit))

    def set_cpu(self, node: str, cpu: CpuQuota | None) -> None:
        """Change ``node``'s CPU quota live (None: unlimited), e.g. lift it while a model loads."""
        execute(plan_set_cpu(self.layout, node, cpu))

    def restore_cpu(self, node: str) -> None:
        """Put back the quota the spec gives ``node``."""
        self.set_cpu(node, None if node == GATEWAY else self.spec.node(node).cpu)

    def set_mem(self, node: str, mem_cap_mib: int | None) -> None:
        """Change ``node``'s memory cap live (None: uncapped); swap stays off."""
        execute(plan_set_mem(self.layout, node, mem_cap_mib))

    # -- memory, as the node's cgroup counts it (what a benchmark records)

    def memory(self, node: str) -> CgroupMemory:
        """``node``'s memory cgroup now: usage, peak, anonymous vs page cache vs mapped, major
        faults and OOM kills (``"gw"``: the broker's)."""
        mem = group_memory(self.cgroup(node))
        if mem is None:
            raise ConfigError(f"no memory cgroup for {node!r} in testbed {self.spec.instance}")
        return mem

    def process_memory(self, node: str) -> dict[int, ProcessMemory]:
        """RSS, peak RSS and major faults of each process now in ``node``'s cgroup. RSS counts
        pages shared with other processes (libraries, weights read by others) that the cgroup
        does not; the two side by side show how much a node leans on this machine's page cache."""
        out: dict[int, ProcessMemory] = {}
        for pid in pids_in(self.cgroup(node)):
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[pid] = process_memory(pid)
        return out

    def oom_kills(self, node: str) -> int:
        """How many processes the kernel killed in ``node``'s cgroup for going over its cap."""
        mem = group_memory(self.cgroup(node))
        return 0 if mem is None else mem.oom_kills

    def reset_peak(self, node: str) -> None:
        """Restart ``node``'s peak from its current usage (e.g. once it has loaded and warmed up)."""
        reset_peak(self.cgroup(node))

    def describe(self) -> dict[str, Any]:
        """The state document (what benchmark results record about the testbed)."""
        return json.loads(self._current_state().to_json())

    def _current_state(self) -> TestbedState:
        if self._state is None:
            raise ConfigError("testbed was never brought up")
        return TestbedState(
            instance=self._state.instance,
            created_at=self._state.created_at,
            owner_pid=self._state.owner_pid,
            detached=self.detached,
            spec=self.spec,
            broker=self._broker,
            processes=tuple(self._records),
            calibration=self._state.calibration,
        )

    def _save(self) -> None:
        write_state(self.run_dir, self._current_state())


def throttle(instance: int, nodes: Sequence[str] | None, on: bool, run_dir: Path = DEFAULT_RUN_DIR) -> list[str]:
    """Apply (``on``) or lift the spec's CPU quotas of a running instance's nodes (None: all)."""
    st = read_state(run_dir, instance)
    if st is None:
        raise ConfigError(f"testbed instance {instance} is not up")
    lay = layout(st.spec)
    names = list(nodes) if nodes else [str(n) for n in st.spec.names]
    for name in names:
        execute(plan_set_cpu(lay, name, st.spec.node(name).cpu if on else None))
    return names
