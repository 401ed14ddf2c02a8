"""The testbed shell: runs the steps of ``nodes.testbed.plan`` as root, starts processes inside it.

``with Testbed(spec) as tb:`` builds namespaces, links, shaping, loss and cgroups, and removes
them on exit; ``teardown()`` removes whatever an instance (or every instance) left behind, also
after a crash, by finding objects by name. Also the ``mesh testbed ...`` commands
(:func:`add_testbed_commands`) and two measuring tools run inside the testbed:
``python -m nodes.testbed.bed probe`` (CPU probe: Gemma-3 prefill or a CPU loop) and
``python -m nodes.testbed.bed linkprobe`` (MQTT pings and transfers through the broker).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

from mesh.errors import ConfigError, MeshError, TransportError
from mesh.model import converted_dir
from mesh.uplink_stats import LinkStats, LinkStatsConfig
from nodes.settings import mesh_home
from nodes.testbed.plan import (
    BROKER_KINDS,
    CPU_CGROUP_ROOT,
    GATEWAY,
    MAX_INSTANCE,
    PROFILE_NAMES,
    Calibration,
    CpuQuota,
    Found,
    Layout,
    MakeDir,
    ProcessRecord,
    RemoveDir,
    Run,
    Step,
    TestbedSpec,
    TestbedState,
    Trial,
    WriteFile,
    broker_argv,
    calibration_cgroup,
    calibrations_from_json,
    calibrations_to_json,
    cgroup_path,
    closest_trial,
    device_profile,
    layout,
    make_spec,
    mosquitto_conf,
    netns_name,
    next_quota,
    node_argv,
    owned,
    parse_loss,
    plan_cleanup,
    plan_set_cpu,
    plan_set_loss,
    plan_set_rate,
    plan_unthrottle,
    plan_up,
    spawn_argv,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUN_DIR = Path("/run/mesh-testbed")
PROBE_INSTANCE = 99  # reserved for capability checks; user instances are 0..98
STEP_TIMEOUT_S = 30.0
LOOP_ITERS_PER_TOKEN = 100_000


class TestbedBusy(ConfigError):
    """The instance is up and owned by a live process or left running on purpose."""

    __test__ = False


# --------------------------------------------------------------------------- running steps


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise MeshError(f"testbed command {' '.join(argv)} failed: {e}") from e
        return subprocess.CompletedProcess(list(argv), 1, "", str(e))
    if check and res.returncode != 0:
        raise MeshError(f"testbed command {' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _rmdir(path: str, deadline_s: float = 3.0) -> bool:
    """rmdir a cgroup, retrying while its last tasks finish exiting (bounded)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > end:
                return False
            time.sleep(0.05)


def execute(steps: Sequence[Step]) -> None:
    """Run plan steps in order; the first failing checked step raises :class:`MeshError`."""
    for step in steps:
        if isinstance(step, Run):
            _run(step.argv, stdin=step.stdin, check=step.check)
        elif isinstance(step, MakeDir):
            os.makedirs(step.path, exist_ok=True)
        elif isinstance(step, WriteFile):
            try:
                with open(step.path, "w") as f:
                    f.write(step.text)
            except OSError as e:
                raise MeshError(f"cannot write {step.text!r} to {step.path}: {e}") from e
        elif isinstance(step, RemoveDir):
            _rmdir(step.path)
        else:  # pragma: no cover - the Step union is closed
            raise TypeError(step)


# --------------------------------------------------------------------------- scanning and cleanup


def scan() -> Found:
    """Every netns, root-namespace link and cpu cgroup on the machine (names only)."""
    netns = tuple(
        line.split()[0] for line in _run(("ip", "netns", "list"), check=False).stdout.splitlines() if line.strip()
    )
    links = []
    for line in _run(("ip", "-o", "link", "show"), check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            links.append(parts[1].strip().split("@")[0])
    try:
        cgroups = tuple(e.name for e in os.scandir(CPU_CGROUP_ROOT) if e.is_dir())
    except OSError:
        cgroups = ()
    return Found(netns=netns, links=tuple(links), cgroups=cgroups)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pids_of(mine: Found) -> set[int]:
    pids: set[int] = set()
    for group in mine.cgroups:
        with contextlib.suppress(OSError):
            pids |= {int(x) for x in Path(cgroup_path(group), "cgroup.procs").read_text().split()}
    for ns in mine.netns:
        pids |= {int(x) for x in _run(("ip", "netns", "pids", ns), check=False).stdout.split() if x.isdigit()}
    pids.discard(os.getpid())
    return pids


def _kill_all(mine: Found, term_s: float = 3.0, kill_s: float = 3.0) -> list[int]:
    """SIGTERM every process found in ``mine``'s cgroups and namespaces, then SIGKILL (bounded).

    Pids are read from the cgroups and namespaces themselves, never from a state file, so a
    recycled pid can never hit an unrelated process.
    """
    seen: set[int] = set()
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        pids = {p for p in _pids_of(mine) if _alive(p)}
        seen |= pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + wait_s
        while time.monotonic() < end and any(_alive(p) for p in pids):
            time.sleep(0.05)
    return sorted(seen)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _state_path(run_dir: Path, instance: int) -> Path:
    return run_dir / str(instance) / "state.json"


def read_state(run_dir: Path, instance: int) -> TestbedState | None:
    try:
        return TestbedState.from_json(_state_path(run_dir, instance).read_text())
    except FileNotFoundError:
        return None


def in_use(run_dir: Path, instance: int) -> TestbedState | None:
    """The state of ``instance`` if it is up: left running on purpose or its owner is alive."""
    st = read_state(run_dir, instance)
    if st is not None and (st.detached or (st.owner_pid != os.getpid() and _alive(st.owner_pid))):
        return st
    return None


def _write_state(run_dir: Path, state: TestbedState) -> None:
    path = _state_path(run_dir, state.instance)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def teardown(instance: int | None, run_dir: Path = DEFAULT_RUN_DIR) -> dict[str, Any]:
    """Remove every object of ``instance`` (None: of every instance) and kill its processes.

    Idempotent; works from the names alone, so it also cleans up after a crashed run. Raises
    :class:`MeshError` if anything is still there afterwards.
    """
    with _locked(run_dir):
        mine = owned(scan(), instance)
        for step in plan_unthrottle(mine):
            with contextlib.suppress(MeshError):  # a cgroup may vanish meanwhile
                execute([step])
        killed = _kill_all(mine)
        execute(plan_cleanup(mine))
        left = owned(scan(), instance)
        dirs = [run_dir / str(instance)] if instance is not None else [
            d for d in run_dir.iterdir() if d.is_dir() and d.name.isdigit()
        ]
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                _state_path(run_dir, int(d.name)).unlink()
    report = {
        "instance": instance,
        "killed": killed,
        "removed": {"netns": list(mine.netns), "links": list(mine.links), "cgroups": list(mine.cgroups)},
        "left": {"netns": list(left.netns), "links": list(left.links), "cgroups": list(left.cgroups)},
    }
    if left.netns or left.links or left.cgroups:
        raise MeshError(f"testbed teardown left objects behind: {report['left']}")
    return report


# --------------------------------------------------------------------------- capability check


def unavailable_reason() -> str | None:
    """Why this machine cannot run a testbed, or None when it can (tries every mechanism)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, iptables, cgroups)"
    for tool in ("ip", "tc", "iptables", "iptables-restore", "sh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2 / iptables)"
    if not Path(CPU_CGROUP_ROOT, "cpu.cfs_quota_us").exists():
        return f"cgroup v1 cpu controller not mounted at {CPU_CGROUP_ROOT}"
    ns = netns_name(PROBE_INSTANCE, f"p{os.getpid()}")
    group = cgroup_path(f"mesh-tb-{PROBE_INSTANCE}-p{os.getpid()}")
    try:
        if _run(("ip", "netns", "add", ns), check=False).returncode != 0:
            return "cannot create network namespaces (ip netns add failed)"
        _run(("ip", "-n", ns, "link", "set", "lo", "up"), check=False)
        if _run(("tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "21mbit",
                 "burst", "16384", "latency", "50ms"), check=False).returncode != 0:
            return "tc tbf is not available"
        rule = ("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-m", "statistic",
                "--mode", "random", "--probability", "0.05", "-j", "DROP")
        if _run(rule, check=False).returncode != 0:
            return "iptables -m statistic does not work inside a namespace"
        try:
            os.mkdir(group)
            Path(group, "cpu.cfs_quota_us").write_text("50000")
        except OSError as e:
            return f"cannot create a cgroup v1 cpu group with a quota: {e}"
    finally:
        _run(("ip", "netns", "del", ns), check=False)
        _rmdir(group)
    return None


# --------------------------------------------------------------------------- the Testbed


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
        self._state: TestbedState | None = None
        self._is_up = False

    # -- lifecycle

    def up(self) -> "Testbed":
        reason = unavailable_reason()
        if reason:
            raise ConfigError(f"testbed unavailable: {reason}")
        inst = self.spec.instance
        with _locked(self.run_dir):
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
            _write_state(self.run_dir, self._state)
        try:
            self._clean_objects()  # leftovers of a crashed run of this instance
            execute(plan_up(self.layout))
        except BaseException:
            self.down()
            raise
        self._is_up = True
        return self

    def _clean_objects(self) -> None:
        with _locked(self.run_dir):
            mine = owned(scan(), self.spec.instance)
            _kill_all(mine)
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

    def start_node(self, name: str, model: str, env: Mapping[str, str] | None = None,
                   extra: Sequence[str] = ()) -> subprocess.Popen[Any]:
        argv = (*node_argv(self.python, name, self.broker_url, model), *extra)
        return self.spawn(name, argv, env=env, role="node", log=self.log_path(f"node-{name}"))

    def start_nodes(self, model: str, names: Sequence[str] | None = None, extra: Sequence[str] = (),
                    timeout_s: float = 300.0) -> dict[str, subprocess.Popen[Any]]:
        """Start mesh nodes and return once all are online with ``model``.

        A quota'd device would need minutes to load a model (6 s of CPU at 1.9 % of a core), so
        nodes load unthrottled and get their quota back once online. Quota'd nodes run one torch
        thread: the calibration measured one thread, and the quota is per cgroup anyway.
        """
        from mesh.config import BrokerAddress
        from nodes.client import MeshClient

        names = list(names or self.spec.names)
        procs: dict[str, subprocess.Popen[Any]] = {}
        for n in names:
            quota = self.spec.node(n).cpu
            self.set_cpu(n, None)
            procs[n] = self.start_node(n, model, extra=[*extra, *(["--threads", "1"] if quota else [])])
        host, port = self.broker_address
        deadline = time.monotonic() + timeout_s
        with MeshClient(BrokerAddress(host, port), name=f"testbed-{self.spec.instance}") as client:
            while True:
                dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                if dead:
                    raise MeshError(f"testbed nodes exited while starting: {dead} (logs in {self.log_path('')})")
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
        _write_state(self.run_dir, self._current_state())


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


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll until ``host:port`` accepts TCP (bounded); fails early if ``proc`` exits."""
    end = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise TransportError(f"process {proc.args!r} exited with {proc.returncode} before {host}:{port} was up")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise TransportError(f"{host}:{port} did not accept connections within {timeout_s} s") from None
            time.sleep(0.05)


def status(run_dir: Path = DEFAULT_RUN_DIR) -> dict[str, Any]:
    """Every instance with a state file, the liveness of its processes, and stray objects."""
    instances = []
    found = scan()
    if run_dir.is_dir():
        for d in sorted(run_dir.iterdir()):
            if not (d.is_dir() and d.name.isdigit()):
                continue
            try:
                st = read_state(run_dir, int(d.name))
            except ConfigError as e:
                instances.append({"instance": int(d.name), "error": str(e)})
                continue
            if st is None:
                continue
            doc = json.loads(st.to_json())
            mine = owned(found, st.instance)
            live = _pids_of(mine)
            for p in doc["processes"]:
                p["alive"] = p["pid"] in live and _alive(p["pid"])
            doc["owner_alive"] = _alive(st.owner_pid)
            doc["present"] = {"netns": list(mine.netns), "links": list(mine.links), "cgroups": list(mine.cgroups)}
            instances.append(doc)
    known = {i.get("instance") for i in instances}
    every = owned(found, None)
    stray = {
        "netns": [n for n in every.netns if int(n.split("-")[1]) not in known],
        "links": [n for n in every.links if int(n.split("-")[1]) not in known],
        "cgroups": [g for g in every.cgroups if not g.split("-")[2].isdigit() or int(g.split("-")[2]) not in known],
    }
    return {"instances": instances, "stray": stray}


# --------------------------------------------------------------------------- probes


def _cpu_loop(iterations: int) -> int:
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) & 0xFFFF
    return acc


def _prompt_ids(tokenizer: Any, tokens: int) -> list[int]:
    """Exactly ``tokens`` ids of an MMLU-style 1-shot prompt (BOS included when the tokenizer adds one)."""
    text = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "A car accelerates uniformly from rest to 20 m/s in 5 s. What is its acceleration?\n"
        "A. 2 m/s^2\nB. 4 m/s^2\nC. 5 m/s^2\nD. 100 m/s^2\nAnswer: B\n\n"
        "Which quantity is conserved in every collision between two isolated bodies?\n"
        "A. kinetic energy\nB. momentum\nC. velocity\nD. temperature\nAnswer:"
    )
    ids: list[int] = tokenizer(text)["input_ids"]
    while len(ids) < tokens:
        ids = ids + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:tokens]


def _load_work(model: str, tokens: int, model_dir: Path, threads: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """The unit of work a probe times, plus facts about it."""
    if model == "loop":
        n = tokens * LOOP_ITERS_PER_TOKEN
        return (lambda: None if _cpu_loop(n) < 0 else None), {"iterations": n}
    path = model_dir
    if not path.is_dir():
        raise ConfigError(f"no model cache at {path}: run the project's model setup first")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path))
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_prompt_ids(tok, tokens)], dtype=torch.long)  # [1, tokens]

    def prefill() -> None:
        with torch.inference_mode():
            lm(input_ids=ids, logits_to_keep=1, use_cache=True)

    return prefill, {"load_s": round(load_s, 3), "torch": torch.__version__, "model_dir": str(path)}


def run_probe(model: str, tokens: int, *, model_dir: Path, threads: int, serve: bool, out: IO[str]) -> int:
    """Time the probe work (after one warm-up run).

    One-shot: print one JSON line with ``seconds`` (wall) and ``cpu_seconds`` (process CPU time).
    ``serve``: print ``{"ready": true, ...}``, then one ``{"seconds", "cpu_seconds"}`` line per
    ``run`` line read from stdin, until ``quit`` or EOF.
    """
    work, facts = _load_work(model, tokens, model_dir, threads)
    base = {"model": model, "tokens": tokens, "threads": threads, "pid": os.getpid()} | facts
    work()  # warm-up: first-call allocations are not part of the steady-state time

    def timed() -> dict[str, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        work()
        t1, c1 = time.perf_counter(), time.process_time()
        return {"seconds": round(t1 - t0, 4), "cpu_seconds": round(c1 - c0, 4)}

    if not serve:
        print(json.dumps(base | timed()), file=out, flush=True)
        return 0
    print(json.dumps(base | {"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "run":
            print(json.dumps(timed()), file=out, flush=True)
    return 0


def run_linkprobe(
    broker: str,
    *,
    name: str,
    count: int,
    interval_s: float,
    late_s: float,
    timeout_s: float,
    transfer_bytes: int,
    transfers: int,
    out: IO[str],
) -> int:
    """Ping the broker over MQTT (publish to an own topic, wait for the echo) and print the
    :class:`LinkStats` snapshot as JSON. Transfers are big messages echoed the same way; the
    broker stores and forwards, so the echo moves the bytes up then down: the recorded link
    bandwidth is ``2 * bytes / seconds`` (``echo_mbit`` is ``bytes / seconds``: a peer fetch
    through the broker over two such links).
    """
    import paho.mqtt.client as mqtt

    host, _, port = broker.rpartition(":")
    topic = f"mesh-tb/linkprobe/{name}/{os.getpid()}"
    stats = LinkStats(LinkStatsConfig(timeout_s=timeout_s, late_s=late_s, window=max(1, count)))
    lock = threading.Condition()
    subscribed = threading.Event()
    transfer_done: "queue.Queue[float]" = queue.Queue()

    def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        sock = client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(topic, qos=0)

    def on_subscribe(*_: object) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        kind, seq = msg.payload[:1], int.from_bytes(msg.payload[1:9], "big")
        if kind == b"P":
            with lock:
                stats.reply_received(seq, now)
                lock.notify_all()
        elif kind == b"T":
            transfer_done.put(now)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"linkprobe-{name}-{os.getpid()}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, int(port), keepalive=30)
    except OSError as e:
        raise TransportError(f"cannot reach broker {broker}: {e}") from e
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise TransportError(f"no SUBACK from {broker}")
        start = time.monotonic()
        for seq in range(count):
            tick = start + seq * interval_s
            delay = tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing of the measurement, not waiting for an event
            with lock:
                now = time.monotonic()
                stats.expire(now)
                stats.ping_sent(seq, now)
            client.publish(topic, b"P" + seq.to_bytes(8, "big") + bytes(32), qos=0)
        end = time.monotonic() + timeout_s
        with lock:
            while stats.snapshot()["outstanding"] and time.monotonic() < end:
                lock.wait(max(0.0, end - time.monotonic()))
            stats.expire(time.monotonic() + timeout_s)  # whatever is still out is lost
        echo: list[float] = []
        for k in range(transfers):
            t0 = time.monotonic()
            client.publish(topic, b"T" + k.to_bytes(8, "big") + bytes(transfer_bytes), qos=0)
            try:
                t1 = transfer_done.get(timeout=max(30.0, transfer_bytes * 8 / 1e6))
            except queue.Empty:
                raise TransportError(f"transfer {k} of {transfer_bytes} B did not come back") from None
            stats.record_transfer(2 * (transfer_bytes + 9), t1 - t0)
            echo.append(round((transfer_bytes + 9) * 8 / (t1 - t0) / 1e6, 3))
    finally:
        client.loop_stop()
        client.disconnect()
    doc = {"name": name, "broker": broker, "count": count, "interval_ms": interval_s * 1000}
    doc |= stats.snapshot() | {"transfer_bytes": transfer_bytes, "echo_mbit": echo}
    print(json.dumps(doc), file=out, flush=True)
    return 0


# --------------------------------------------------------------------------- calibration


class _ProbeProcess:
    """A ``probe --serve`` child: JSON lines in, JSON lines out, every read with a deadline."""

    def __init__(self, argv: Sequence[str], cwd: Path | None) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd, bufsize=1
        )
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="probe-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def receive(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise MeshError(f"probe gave no answer within {timeout_s:.0f} s") from None
        if line is None:
            raise MeshError(f"probe exited ({self.proc.wait()}) before answering")
        return json.loads(line)

    def run(self, timeout_s: float) -> tuple[float, float]:
        """One timed run: (wall seconds, CPU seconds)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        doc = self.receive(timeout_s)
        return float(doc["seconds"]), float(doc["cpu_seconds"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def machine_info() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def calibrate(
    *,
    profile: str = "pi-zero-2w",
    model: str = "gemma3-270m",
    tokens: int = 65,
    target_s: float = 12.6,
    period_us: int = 1_000_000,
    repeats: int = 3,
    max_trials: int = 8,
    tolerance: float = 0.05,
    accept: float = 0.10,
    model_dir: Path | None = None,
    python: str = sys.executable,
    cwd: Path | None = REPO_ROOT,
    date: str,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Calibration:
    """Find by measurement the quota (per ``period_us``) at which the probe takes ``target_s``.

    The probe loads and warms up unthrottled, then joins a calibration cgroup; the quota changes
    between trials, each trial is ``repeats`` runs (median). Raises :class:`MeshError` if no trial
    lands within ``accept`` of the target.
    """
    argv = [python, "-m", "nodes.testbed.bed", "probe", "--model", model, "--tokens", str(tokens), "--serve"]
    if model_dir is not None:
        argv += ["--model-dir", str(model_dir)]
    probe = _ProbeProcess(argv, cwd)
    group = cgroup_path(calibration_cgroup(probe.proc.pid))
    try:
        ready = probe.receive(timeout_s=600)
        native = [probe.run(timeout_s=600) for _ in range(repeats)]
        native_s = Trial(0, tuple(w for w, _ in native)).median
        native_cpu_s = Trial(0, tuple(c for _, c in native)).median
        log(f"calibrate: unthrottled {native_s:.3f} s wall, {native_cpu_s:.3f} s CPU")
        os.mkdir(group)
        Path(group, "cpu.cfs_period_us").write_text(str(period_us))
        Path(group, "cgroup.procs").write_text(str(probe.proc.pid))
        trials: list[Trial] = []
        run_timeout = max(60.0, 8 * target_s)
        for _ in range(max_trials):
            # CPU time, not wall time, predicts the quota'd time (other jobs may share the cores)
            q = next_quota(trials, target_s=target_s, period_us=period_us, native_s=native_cpu_s, tolerance=tolerance)
            if q is None:
                break
            Path(group, "cpu.cfs_quota_us").write_text(str(q))
            samples = tuple(probe.run(timeout_s=run_timeout)[0] for _ in range(repeats))
            trials.append(Trial(q, samples))
            log(f"calibrate: quota {q} us / {period_us} us -> {trials[-1].median:.3f} s {list(samples)}")
        best = closest_trial(trials, target_s)
        if abs(best.median - target_s) > accept * target_s:
            raise MeshError(f"calibration did not converge: best {best.quota_us} us gave {best.median:.2f} s")
    finally:
        with contextlib.suppress(OSError):  # let the probe exit at full speed
            Path(group, "cpu.cfs_quota_us").write_text("-1")
        probe.close()
        _rmdir(group)
    return Calibration(
        profile=profile,
        model=model,
        tokens=tokens,
        threads=1,
        period_us=period_us,
        quota_us=best.quota_us,
        target_s=target_s,
        measured_s=round(best.median, 4),
        samples=best.samples,
        native_s=round(native_s, 4),
        native_cpu_s=round(native_cpu_s, 4),
        date=date,
        machine=machine_info() | {k: ready[k] for k in ("torch",) if k in ready},
        trials=tuple(trials),
    )


def calibration_dir(home: Path) -> Path:
    """Where calibrations are kept: beside the models, under the mesh home (``MESH_HOME``)."""
    return home / "testbed"


def load_calibration(cache_dir: Path, profile: str) -> Calibration | None:
    path = cache_dir / "calibration.json"
    try:
        return calibrations_from_json(path.read_text()).get(profile)
    except FileNotFoundError:
        return None


def save_calibration(cache_dir: Path, cal: Calibration) -> Path:
    path = cache_dir / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = calibrations_from_json(path.read_text()) if path.exists() else {}
    entries[cal.profile] = cal
    tmp = path.with_suffix(".tmp")
    tmp.write_text(calibrations_to_json(entries))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- CLI


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else calibration_dir(mesh_home(args))


def cmd_up(args: argparse.Namespace) -> int:
    cal = load_calibration(_cache_dir(args), args.profile) if args.profile == "pi-zero-2w" else None
    prof = device_profile(args.profile, cal)
    if not prof.calibrated:
        print(f"warning: profile {prof.name} is not calibrated (run `mesh testbed calibrate --profile "
              f"{prof.name}`); using {prof.cpu}", file=sys.stderr)
    spec = make_spec(args.nodes, prof, link_mbit=args.link_mbit, loss=parse_loss(args.loss or []),
                     instance=args.instance)
    tb = Testbed(spec, run_dir=Path(args.run_dir), detached=True, calibration=cal)
    tb.up()
    try:
        tb.start_broker(args.broker)
        if not args.no_nodes:
            if args.load_unthrottled:
                for n in spec.names:
                    tb.set_cpu(n, None)
                    tb.start_node(n, args.model)
            else:
                tb.start_nodes(args.model)
    except BaseException:
        tb.down()
        raise
    print(json.dumps(tb.describe(), indent=2))
    if args.load_unthrottled and any(n.cpu for n in spec.nodes):
        print(f"nodes run unthrottled: `mesh testbed throttle --on --instance {spec.instance}` once they"
              " are ready", file=sys.stderr)
    return 0


def cmd_throttle(args: argparse.Namespace) -> int:
    names = throttle(args.instance, args.node, on=args.on, run_dir=Path(args.run_dir))
    print(f"cpu quota {'on' if args.on else 'off'} for {', '.join(names)}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    report = teardown(None if args.all else args.instance, Path(args.run_dir))
    print(json.dumps(report, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc = status(Path(args.run_dir))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["instances"]:
        print("no testbed is up")
    for inst in doc["instances"]:
        if "error" in inst:
            print(f"instance {inst['instance']}: {inst['error']}")
            continue
        broker = inst.get("broker") or {}
        print(f"instance {inst['instance']} (since {inst['created_at']}, broker {broker.get('kind', '-')} "
              f"{broker.get('host', '')}:{broker.get('port', '')})")
        for n in inst["spec"]["nodes"]:
            cpu = n["cpu"]
            share = f"{cpu['quota_us']}/{cpu['period_us']} us" if cpu else "no quota"
            print(f"  {n['name']:<12} {inst['addresses'][n['name']]:<15} {n['profile']:<11} "
                  f"link {n['link_mbit'] or '-'} Mbit/s  loss {n['loss_pct']} %  cpu {share}")
        for p in inst["processes"]:
            print(f"  pid {p['pid']:<8} {p['role']:<8} {p['node']:<12} {'up' if p['alive'] else 'DEAD'}  "
                  f"{' '.join(p['argv'])[:80]}")
    stray = doc["stray"]
    if any(stray.values()):
        print(f"stray objects (remove with `mesh testbed down --all`): {stray}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.profile != "pi-zero-2w":
        raise ConfigError(f"only pi-zero-2w has a CPU quota to calibrate, not {args.profile}")
    cal = calibrate(
        profile=args.profile,
        model=args.model,
        tokens=args.tokens,
        target_s=args.target_s,
        period_us=int(args.period_ms * 1000),
        repeats=args.repeats,
        max_trials=args.max_trials,
        model_dir=Path(args.model_dir) if args.model_dir else None,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    path = save_calibration(_cache_dir(args), cal)
    print(json.dumps(cal.to_dict() | {"file": str(path)}, indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    # the model where every mesh process looks for it: --model-dir, else under --home / MESH_HOME
    model_dir = Path(args.model_dir) if args.model_dir else converted_dir(mesh_home(args), args.model)
    return run_probe(args.model, args.tokens, model_dir=model_dir, threads=args.threads, serve=args.serve,
                     out=sys.stdout)


def cmd_linkprobe(args: argparse.Namespace) -> int:
    return run_linkprobe(args.broker, name=args.name, count=args.count, interval_s=args.interval_ms / 1000,
                         late_s=args.late_ms / 1000, timeout_s=args.timeout_ms / 1000,
                         transfer_bytes=args.transfer_bytes, transfers=args.transfers, out=sys.stdout)


def _add_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="state and logs (default %(default)s)")

    up = sub.add_parser("up", help="bring a testbed up: namespaces, links, broker and nodes")
    up.add_argument("--nodes", type=int, required=True, help="number of nodes (pi1..piK)")
    up.add_argument("--profile", choices=PROFILE_NAMES, default="native")
    up.add_argument("--link-mbit", type=float, default=None, help="override the profile's link rate")
    up.add_argument("--loss", action="append", metavar="NODE=PCT", help="random drop per direction, repeatable")
    up.add_argument("--broker", choices=BROKER_KINDS, default="amqtt")
    up.add_argument("--model", default="gemma3-270m")
    up.add_argument("--instance", type=int, default=0, choices=range(0, MAX_INSTANCE), metavar="0..98")
    up.add_argument("--no-nodes", action="store_true", help="only the network and the broker")
    up.add_argument("--cache-dir", default=None, help="calibration cache (default <mesh home>/testbed)")
    up.add_argument("--load-unthrottled", action="store_true",
                    help="start nodes without their CPU quota (model loading); apply it with `throttle --on`")
    common(up)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove a testbed (also after a crash); idempotent")
    down.add_argument("--instance", type=int, default=0)
    down.add_argument("--all", action="store_true", help="every instance and calibration leftover")
    common(down)
    down.set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="show what is up")
    st.add_argument("--json", action="store_true")
    common(st)
    st.set_defaults(func=cmd_status)

    thr = sub.add_parser("throttle", help="apply or lift the profile's CPU quota of running nodes")
    thr.add_argument("--instance", type=int, default=0)
    thr.add_argument("--node", action="append", help="a node (repeatable; default: all)")
    onoff = thr.add_mutually_exclusive_group(required=True)
    onoff.add_argument("--on", action="store_true")
    onoff.add_argument("--off", action="store_true")
    common(thr)
    thr.set_defaults(func=cmd_throttle)

    cal = sub.add_parser("calibrate", help="measure the CPU quota of a device profile")
    cal.add_argument("--profile", choices=PROFILE_NAMES, required=True)
    cal.add_argument("--model", default="gemma3-270m", help="gemma3-270m, or loop (a CPU loop, for tests)")
    cal.add_argument("--model-dir", default=None, help="default <mesh home>/models/<model>")
    cal.add_argument("--tokens", type=int, default=65)
    cal.add_argument("--target-s", type=float, default=12.6)
    cal.add_argument("--period-ms", type=float, default=1000.0)
    cal.add_argument("--repeats", type=int, default=3)
    cal.add_argument("--max-trials", type=int, default=8)
    cal.add_argument("--cache-dir", default=None, help="default <mesh home>/testbed")
    cal.set_defaults(func=cmd_calibrate)


def add_testbed_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``testbed up|down|status|calibrate`` on the CLI's subparsers.

    Each leaf sets ``func(args) -> int``; the CLI calls ``args.func(args)``.
    """
    tb = subparsers.add_parser("testbed", help="emulate a lossy Pi cluster on this machine (root)")
    _add_commands(tb.add_subparsers(dest="testbed_command", required=True))
    return tb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.testbed.bed")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub)
    probe = sub.add_parser("probe", help="time one CPU probe (model prefill or CPU loop), print JSON")
    probe.add_argument("--model", default="gemma3-270m")
    probe.add_argument("--model-dir", default=None, help="default <home>/models/<model>")
    probe.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    probe.add_argument("--tokens", type=int, default=65)
    probe.add_argument("--threads", type=int, default=1)
    probe.add_argument("--serve", action="store_true", help="answer `run` lines on stdin")
    probe.set_defaults(func=cmd_probe)
    lp = sub.add_parser("linkprobe", help="MQTT pings and transfers through the broker, print JSON")
    lp.add_argument("--broker", required=True, help="HOST:PORT")
    lp.add_argument("--name", default="probe")
    lp.add_argument("--count", type=int, default=200)
    lp.add_argument("--interval-ms", type=float, default=20.0)
    lp.add_argument("--late-ms", type=float, default=50.0)
    lp.add_argument("--timeout-ms", type=float, default=2000.0)
    lp.add_argument("--transfer-bytes", type=int, default=0)
    lp.add_argument("--transfers", type=int, default=0)
    lp.set_defaults(func=cmd_linkprobe)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MeshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
