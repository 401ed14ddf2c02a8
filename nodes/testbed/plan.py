"""The testbed as data: names, addresses, device profiles and the commands that build it.

Pure: nothing here runs a command, reads a clock or touches a file. ``nodes/testbed/bed.py`` executes
the :class:`Step` lists built here, and tests read them.

Topology of instance ``I`` (0..99; several instances can be up at once)::

    root ns          mt-I-host 10.213.I.1   (one veth end: lets host tools reach the mesh)
                        |
    ns mt-I-gw       host --+
                            br0 10.213.I.2  (bridge = the access point; the broker binds here)
                     v-pi1 -+  v-pi2 ...    (tbf on each v-<node>: the node's downlink)
                        |
    ns mt-I-pi1      eth0 10.213.I.10       (tbf on eth0: uplink; iptables chain mesh-loss)

Every namespace is ``mt-I-<name>`` (the gateway is ``mt-I-gw``), the one root-namespace link is
``mt-I-host``, every cgroup is ``/sys/fs/cgroup/cpu/mesh-tb-I-<name>``; calibration runs use
``mesh-tb-cal-<pid>``. Cleanup finds leftovers of a crashed run by these patterns alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NewType, Sequence, Union

from mesh.errors import ConfigError

NodeName = NewType("NodeName", str)

CPU_CGROUP_ROOT = "/sys/fs/cgroup/cpu"
NETNS_PREFIX = "mt-"
CGROUP_PREFIX = "mesh-tb-"
GATEWAY = NodeName("gw")
SUBNET_FIRST_OCTETS = "10.213"
BROKER_PORT = 1883
NODE_HOST_BASE = 10  # node i gets 10.213.I.(10 + i)
MAX_NODES = 200
MAX_INSTANCE = 99
LOSS_CHAIN = "mesh-loss"
NODE_IF = "eth0"
BRIDGE_IF = "br0"
HOST_PEER_IF = "host"
STATE_VERSION = 1
CALIBRATION_VERSION = 1
MTU_BYTES = 1514

_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_RESERVED = {"gw", "host", "br", "br0", "cal"}


def check_node_name(name: str) -> NodeName:
    """A node name: lowercase letter then up to 11 letters/digits (it ends up in link names)."""
    if not _NODE_NAME.match(name) or name in _RESERVED:
        raise ConfigError(f"bad node name {name!r}: want [a-z][a-z0-9]{{0,11}}, not {sorted(_RESERVED)}")
    return NodeName(name)


def check_instance(instance: int) -> int:
    if not 0 <= instance <= MAX_INSTANCE:
        raise ConfigError(f"testbed instance must be 0..{MAX_INSTANCE}, got {instance}")
    return instance


def netns_name(instance: int, name: str) -> str:
    return f"{NETNS_PREFIX}{instance}-{name}"


def host_link_name(instance: int) -> str:
    return f"{NETNS_PREFIX}{instance}-host"


def cgroup_name(instance: int, name: str) -> str:
    return f"{CGROUP_PREFIX}{instance}-{name}"


def cgroup_path(group: str) -> str:
    return f"{CPU_CGROUP_ROOT}/{group}"


def calibration_cgroup(pid: int) -> str:
    return f"{CGROUP_PREFIX}cal-{pid}"


def subnet(instance: int) -> str:
    return f"{SUBNET_FIRST_OCTETS}.{instance}.0/24"


# --------------------------------------------------------------------------- device profiles


@dataclass(frozen=True)
class CpuQuota:
    """A cgroup v1 CFS quota: ``quota_us`` of CPU time per ``period_us`` of wall time."""

    period_us: int
    quota_us: int

    def __post_init__(self) -> None:
        if not 1_000 <= self.period_us <= 1_000_000:
            raise ConfigError(f"cpu period must be 1 ms..1 s, got {self.period_us} us")
        if self.quota_us < 1_000:
            raise ConfigError(f"cpu quota must be >= 1 ms (kernel minimum), got {self.quota_us} us")

    @property
    def share(self) -> float:
        """Fraction of one core."""
        return self.quota_us / self.period_us


PROFILE_NAMES = ("native", "pi5", "pi-zero-2w")
PI5_LINK_MBIT = 27.0
PI_ZERO_LINK_MBIT = 21.0
# Used only until `mesh testbed calibrate` has run: DESIGN.md measured 16-17 s prefill at
# 20 ms / 1 s on this kind of machine, so the calibrated value is a little above this.
UNCALIBRATED_PI_ZERO_QUOTA = CpuQuota(period_us=1_000_000, quota_us=24_000)


@dataclass(frozen=True)
class DeviceProfile:
    """What one emulated device is allowed: link rate (None = unshaped) and CPU (None = free)."""

    name: str
    link_mbit: float | None
    cpu: CpuQuota | None
    calibrated: bool


def device_profile(name: str, calibration: "Calibration | None" = None) -> DeviceProfile:
    """The named profile; ``pi-zero-2w`` takes its CPU quota from ``calibration`` when given."""
    if name == "native":
        return DeviceProfile("native", None, None, calibrated=True)
    if name == "pi5":
        return DeviceProfile("pi5", PI5_LINK_MBIT, None, calibrated=True)
    if name == "pi-zero-2w":
        if calibration is not None:
            if calibration.profile != name:
                raise ConfigError(f"calibration is for {calibration.profile!r}, not {name!r}")
            return DeviceProfile(name, PI_ZERO_LINK_MBIT, calibration.quota, calibrated=True)
        return DeviceProfile(name, PI_ZERO_LINK_MBIT, UNCALIBRATED_PI_ZERO_QUOTA, calibrated=False)
    raise ConfigError(f"unknown profile {name!r}; known: {', '.join(PROFILE_NAMES)}")


# --------------------------------------------------------------------------- spec and layout


@dataclass(frozen=True)
class NodeSpec:
    """One emulated device: its profile plus per-node overrides."""

    name: NodeName
    link_mbit: float | None
    loss_pct: float
    cpu: CpuQuota | None
    profile: str = "native"

    def __post_init__(self) -> None:
        check_node_name(self.name)
        check_loss(self.loss_pct)
        if self.link_mbit is not None and not 0.01 <= self.link_mbit <= 100_000:
            raise ConfigError(f"link rate of {self.name} out of range: {self.link_mbit} Mbit/s")


@dataclass(frozen=True)
class TestbedSpec:
    """What to build. ``nodes`` in order; node i gets address 10.213.<instance>.(10+i)."""

    __test__ = False  # not a pytest class

    nodes: tuple[NodeSpec, ...]
    instance: int = 0
    broker_port: int = BROKER_PORT

    def __post_init__(self) -> None:
        check_instance(self.instance)
        if not 1 <= len(self.nodes) <= MAX_NODES:
            raise ConfigError(f"a testbed has 1..{MAX_NODES} nodes, got {len(self.nodes)}")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate node names: {names}")
        if not 1 <= self.broker_port <= 65535:
            raise ConfigError(f"bad broker port {self.broker_port}")

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node {name!r} in this testbed ({', '.join(self.names)})")

    @property
    def names(self) -> tuple[NodeName, ...]:
        return tuple(n.name for n in self.nodes)


def check_loss(pct: float) -> float:
    if not 0 <= pct < 100:
        raise ConfigError(f"loss must be 0 <= pct < 100, got {pct}")
    return pct


def parse_loss(items: Sequence[str]) -> dict[str, float]:
    """``["pi2=5", "pi3=0.5"]`` -> ``{"pi2": 5.0, "pi3": 0.5}`` (the CLI's ``--loss NODE=PCT``)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--loss wants NODE=PCT, got {item!r}")
        try:
            out[check_node_name(name.strip())] = check_loss(float(value))
        except ValueError as e:
            raise ConfigError(f"--loss {item!r}: {value!r} is not a number") from e
    return out


def make_spec(
    count: int,
    profile: DeviceProfile,
    *,
    link_mbit: float | None = None,
    loss: Mapping[str, float] | None = None,
    instance: int = 0,
    prefix: str = "pi",
) -> TestbedSpec:
    """``count`` nodes ``pi1..piK`` of one profile; ``link_mbit`` overrides the profile's rate."""
    names = [check_node_name(f"{prefix}{i}") for i in range(1, count + 1)]
    loss = dict(loss or {})
    unknown = set(loss) - set(names)
    if unknown:
        raise ConfigError(f"--loss names unknown nodes {sorted(unknown)}; nodes are {names}")
    rate = link_mbit if link_mbit is not None else profile.link_mbit
    nodes = tuple(
        NodeSpec(name=n, link_mbit=rate, loss_pct=loss.get(n, 0.0), cpu=profile.cpu, profile=profile.name)
        for n in names
    )
    return TestbedSpec(nodes=nodes, instance=instance)


@dataclass(frozen=True)
class NodeLayout:
    """Where one node lives once built."""

    name: NodeName
    netns: str
    address: str
    gw_if: str  # the node's port on the gateway bridge (its downlink shaper)
    cgroup: str
    spec: NodeSpec


@dataclass(frozen=True)
class Layout:
    instance: int
    gw_netns: str
    gw_address: str
    gw_cgroup: str
    host_link: str
    host_address: str
    broker_port: int
    nodes: tuple[NodeLayout, ...]

    def node(self, name: str) -> NodeLayout:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node {name!r} in testbed {self.instance}")

    @property
    def broker_host(self) -> str:
        return self.gw_address

    @property
    def netns(self) -> tuple[str, ...]:
        return (self.gw_netns,) + tuple(n.netns for n in self.nodes)

    @property
    def cgroups(self) -> tuple[str, ...]:
        return (self.gw_cgroup,) + tuple(n.cgroup for n in self.nodes)


def layout(spec: TestbedSpec) -> Layout:
    i = spec.instance
    base = f"{SUBNET_FIRST_OCTETS}.{i}"
    nodes = tuple(
        NodeLayout(
            name=n.name,
            netns=netns_name(i, n.name),
            address=f"{base}.{NODE_HOST_BASE + k}",
            gw_if=f"v-{n.name}",
            cgroup=cgroup_name(i, n.name),
            spec=n,
        )
        for k, n in enumerate(spec.nodes)
    )
    return Layout(
        instance=i,
        gw_netns=netns_name(i, GATEWAY),
        gw_address=f"{base}.2",
        gw_cgroup=cgroup_name(i, GATEWAY),
        host_link=host_link_name(i),
        host_address=f"{base}.1",
        broker_port=spec.broker_port,
        nodes=nodes,
    )


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Run:
    """Run ``argv``; ``stdin`` is fed to it; ``check=False`` tolerates failure (cleanup)."""

    argv: tuple[str, ...]
    stdin: str | None = None
    check: bool = True


@dataclass(frozen=True)
class MakeDir:
    path: str


@dataclass(frozen=True)
class WriteFile:
    path: str
    text: str


@dataclass(frozen=True)
class RemoveDir:
    path: str


Step = Union[Run, MakeDir, WriteFile, RemoveDir]


def _in(ns: str, *argv: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", ns) + argv


def tbf_args(mbit: float) -> tuple[str, ...]:
    """tbf parameters for ``mbit`` (decimal Mbit/s, as tc reads ``mbit``).

    burst: at least 16 KiB and 4 ms of traffic, so the kernel timer resolution does not cap the
    rate; latency 50 ms bounds the queue (a Wi-Fi driver's buffer is of that order).
    """
    rate_bytes = mbit * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes * 0.004), 2 * MTU_BYTES)
    return ("tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "50ms")


def _shape(ns: str, dev: str, mbit: float | None) -> list[Step]:
    if mbit is None:
        return [Run(("tc", "-n", ns, "qdisc", "del", "dev", dev, "root"), check=False)]
    return [Run(("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root") + tbf_args(mbit))]


def loss_rules(pct: float) -> str:
    """iptables-restore input that (re)fills the node's ``mesh-loss`` chain with ``pct`` % drop.

    Meant for ``iptables-restore --noflush`` inside the node's namespace: declaring the chain
    flushes it, so the change is one atomic commit. The chain is hooked on INPUT and OUTPUT of
    eth0, so ``pct`` applies to each direction.
    """
    check_loss(pct)
    lines = ["*filter", f":{LOSS_CHAIN} - [0:0]"]
    if pct > 0:
        lines.append(f"-A {LOSS_CHAIN} -m statistic --mode random --probability {pct / 100:.6f} -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _loss_hooks() -> str:
    return "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            f":{LOSS_CHAIN} - [0:0]",
            f"-A INPUT -i {NODE_IF} -j {LOSS_CHAIN}",
            f"-A OUTPUT -o {NODE_IF} -j {LOSS_CHAIN}",
            "COMMIT",
        ]
    ) + "\n"


def plan_set_loss(lay: Layout, node: str, pct: float) -> list[Step]:
    n = lay.node(node)
    return [Run(_in(n.netns, "iptables-restore", "--noflush"), stdin=loss_rules(pct))]


def plan_set_rate(lay: Layout, node: str, mbit: float | None) -> list[Step]:
    """Shape both directions of ``node``'s link to ``mbit`` (None removes the shaping)."""
    n = lay.node(node)
    return _shape(n.netns, NODE_IF, mbit) + _shape(lay.gw_netns, n.gw_if, mbit)


def _cgroup_steps(group: str, cpu: CpuQuota | None) -> list[Step]:
    path = cgroup_path(group)
    quota = "-1" if cpu is None else str(cpu.quota_us)
    period = "100000" if cpu is None else str(cpu.period_us)
    # quota -1 first: a new period may be rejected while an old quota is larger than it.
    return [
        MakeDir(path),
        WriteFile(f"{path}/cpu.cfs_quota_us", "-1"),
        WriteFile(f"{path}/cpu.cfs_period_us", period),
        WriteFile(f"{path}/cpu.cfs_quota_us", quota),
    ]


def plan_set_cpu(lay: Layout, node: str, cpu: CpuQuota | None) -> list[Step]:
    """Change the CPU quota of ``node``'s cgroup (None: unlimited); applies to running processes."""
    group = lay.gw_cgroup if node == GATEWAY else lay.node(node).cgroup
    return [s for s in _cgroup_steps(group, cpu) if not isinstance(s, MakeDir)]


def plan_up(lay: Layout) -> list[Step]:
    """Every step that builds ``lay``, in order. Run after cleaning up the same instance."""
    gw = lay.gw_netns
    no_v6 = ("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    steps: list[Step] = _cgroup_steps(lay.gw_cgroup, None)
    steps += [
        Run(("ip", "netns", "add", gw)),
        Run(_in(gw, *no_v6)),
        Run(("ip", "-n", gw, "link", "set", "lo", "up")),
        Run(("ip", "-n", gw, "link", "add", BRIDGE_IF, "type", "bridge")),
        Run(("ip", "-n", gw, "addr", "add", f"{lay.gw_address}/24", "dev", BRIDGE_IF)),
        Run(("ip", "-n", gw, "link", "set", BRIDGE_IF, "up")),
        Run(("ip", "link", "add", lay.host_link, "type", "veth", "peer", "name", HOST_PEER_IF, "netns", gw)),
        Run(("ip", "-n", gw, "link", "set", HOST_PEER_IF, "master", BRIDGE_IF, "up")),
        Run(("ip", "addr", "add", f"{lay.host_address}/24", "dev", lay.host_link)),
        Run(("ip", "link", "set", lay.host_link, "up")),
    ]
    for n in lay.nodes:
        steps += _cgroup_steps(n.cgroup, n.spec.cpu)
        steps += [
            Run(("ip", "netns", "add", n.netns)),
            Run(_in(n.netns, *no_v6)),
            Run(("ip", "-n", n.netns, "link", "set", "lo", "up")),
            Run(("ip", "-n", gw, "link", "add", n.gw_if, "type", "veth", "peer", "name", NODE_IF, "netns", n.netns)),
            Run(("ip", "-n", gw, "link", "set", n.gw_if, "master", BRIDGE_IF, "up")),
            Run(("ip", "-n", n.netns, "addr", "add", f"{n.address}/24", "dev", NODE_IF)),
            Run(("ip", "-n", n.netns, "link", "set", NODE_IF, "up")),
            Run(_in(n.netns, "iptables-restore"), stdin=_loss_hooks()),
        ]
        steps += plan_set_rate(lay, n.name, n.spec.link_mbit)
        steps += plan_set_loss(lay, n.name, n.spec.loss_pct)
    return steps


def spawn_argv(cgroup: str, netns: str | None, argv: Sequence[str]) -> tuple[str, ...]:
    """Wrap ``argv`` so it joins ``cgroup`` first and then enters ``netns``, both before it runs.

    The shell writes its own pid to the cgroup and execs; ``ip netns exec`` execs too, so the pid
    the caller sees is the final process. The cgroup join must come first: ``ip netns exec``
    remounts /sys, hiding /sys/fs/cgroup.
    """
    if not argv:
        raise ConfigError("spawn needs a command")
    procs = f"{cgroup_path(cgroup)}/cgroup.procs"
    inner = ("ip", "netns", "exec", netns) if netns else ()
    return ("sh", "-c", 'echo $$ > "$0" && exec "$@"', procs) + inner + tuple(argv)


# --------------------------------------------------------------------------- cleanup


@dataclass(frozen=True)
class Found:
    """What the shell saw on the machine: netns names, root-ns link names, cpu cgroup names."""

    netns: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()


def _owned(names: Iterable[str], prefix: str, instance: int | None, extra: str = "") -> tuple[str, ...]:
    tag = rf"{instance}" if instance is not None else rf"(\d+{extra})"
    pattern = re.compile(rf"^{re.escape(prefix)}{tag}-[a-z0-9-]+$")
    return tuple(sorted(n for n in names if pattern.match(n)))


def owned(found: Found, instance: int | None) -> Found:
    """The subset of ``found`` this testbed made: one instance, or every instance (None).

    Calibration cgroups (``mesh-tb-cal-<pid>``) count as every-instance leftovers only.
    """
    return Found(
        netns=_owned(found.netns, NETNS_PREFIX, instance),
        links=_owned(found.links, NETNS_PREFIX, instance),
        cgroups=_owned(found.cgroups, CGROUP_PREFIX, instance, extra="|cal"),
    )


def plan_unthrottle(mine: Found) -> list[Step]:
    """Lift the CPU quotas of ``mine``'s cgroups, so their processes exit promptly when told."""
    return [WriteFile(f"{cgroup_path(g)}/cpu.cfs_quota_us", "-1") for g in mine.cgroups]


def plan_cleanup(mine: Found) -> list[Step]:
    """Remove what :func:`owned` returned. Processes must be gone first (the shell kills them).

    Deleting a namespace deletes its veth ends, and with them their peers, its bridge and its
    iptables rules; the root-ns link is deleted explicitly in case its namespace never existed.
    """
    steps: list[Step] = [Run(("ip", "netns", "del", ns), check=False) for ns in mine.netns]
    steps += [Run(("ip", "link", "del", link), check=False) for link in mine.links]
    steps += [RemoveDir(cgroup_path(g)) for g in mine.cgroups]
    return steps


def owned_objects(lay: Layout) -> Found:
    """Everything ``plan_up(lay)`` creates outside of a namespace or inside the root one."""
    return Found(netns=lay.netns, links=(lay.host_link,), cgroups=lay.cgroups)


# --------------------------------------------------------------------------- processes


def mosquitto_conf(host: str, port: int) -> str:
    """A Mosquitto config for the testbed: one listener on the gateway address, no auth."""
    return (
        "# generated by mesh testbed: test use only (anonymous, no persistence)\n"
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )


BROKER_KINDS = ("amqtt", "mosquitto")


def broker_argv(kind: str, python: str, host: str, port: int, conf_path: str) -> tuple[str, ...]:
    if kind == "amqtt":
        return (python, "-m", "nodes.cli", "broker", "--host", host, "--port", str(port))
    if kind == "mosquitto":
        return ("mosquitto", "-c", conf_path)
    raise ConfigError(f"unknown broker {kind!r}; known: {', '.join(BROKER_KINDS)}")


def node_argv(python: str, name: str, broker: str, model: str) -> tuple[str, ...]:
    return (python, "-m", "nodes.cli", "node", "--name", name, "--broker", broker, "--model", model)


# --------------------------------------------------------------------------- state file


@dataclass(frozen=True)
class ProcessRecord:
    role: str  # "broker", "node" or "process"
    node: str
    pid: int
    argv: tuple[str, ...]
    log: str | None = None


@dataclass(frozen=True)
class TestbedState:
    """Contents of ``<run dir>/<instance>/state.json``.

    JSON object, ``version`` 1: ``instance``, ``created_at`` (ISO 8601 UTC), ``owner_pid`` (the
    process that brought it up), ``detached`` (true when that process left it running on
    purpose, as ``mesh testbed up`` does), ``spec`` (the nodes and their settings), ``objects``
    (netns / links / cgroups created), ``addresses`` (node -> IPv4), ``broker``
    (``{kind, host, port}`` or null), ``processes`` (``{role, node, pid, argv, log}``) and
    ``calibration`` (the profile calibration in force, or null).
    """

    __test__ = False

    instance: int
    created_at: str
    owner_pid: int
    detached: bool
    spec: TestbedSpec
    broker: Mapping[str, object] | None = None
    processes: tuple[ProcessRecord, ...] = ()
    calibration: Mapping[str, object] | None = None
    version: int = STATE_VERSION

    def to_json(self) -> str:
        lay = layout(self.spec)
        objs = owned_objects(lay)
        doc = {
            "version": self.version,
            "instance": self.instance,
            "created_at": self.created_at,
            "owner_pid": self.owner_pid,
            "detached": self.detached,
            "spec": spec_to_dict(self.spec),
            "objects": {"netns": list(objs.netns), "links": list(objs.links), "cgroups": list(objs.cgroups)},
            "addresses": {str(n.name): n.address for n in lay.nodes} | {GATEWAY: lay.gw_address},
            "broker": dict(self.broker) if self.broker is not None else None,
            "processes": [
                {"role": p.role, "node": p.node, "pid": p.pid, "argv": list(p.argv), "log": p.log}
                for p in self.processes
            ],
            "calibration": dict(self.calibration) if self.calibration is not None else None,
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TestbedState":
        try:
            doc = json.loads(text)
            if doc.get("version") != STATE_VERSION:
                raise ConfigError(f"testbed state version {doc.get('version')!r} is not {STATE_VERSION}")
            return cls(
                instance=int(doc["instance"]),
                created_at=str(doc["created_at"]),
                owner_pid=int(doc["owner_pid"]),
                detached=bool(doc["detached"]),
                spec=spec_from_dict(doc["spec"]),
                broker=doc.get("broker"),
                processes=tuple(
                    ProcessRecord(p["role"], p["node"], int(p["pid"]), tuple(p["argv"]), p.get("log"))
                    for p in doc.get("processes", [])
                ),
                calibration=doc.get("calibration"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"unreadable testbed state: {e}") from e


def _quota_to_dict(q: CpuQuota | None) -> dict[str, int] | None:
    return None if q is None else {"period_us": q.period_us, "quota_us": q.quota_us}


def _quota_from_dict(d: Mapping[str, int] | None) -> CpuQuota | None:
    return None if d is None else CpuQuota(int(d["period_us"]), int(d["quota_us"]))


def spec_to_dict(spec: TestbedSpec) -> dict[str, object]:
    return {
        "instance": spec.instance,
        "broker_port": spec.broker_port,
        "nodes": [
            {
                "name": n.name,
                "profile": n.profile,
                "link_mbit": n.link_mbit,
                "loss_pct": n.loss_pct,
                "cpu": _quota_to_dict(n.cpu),
            }
            for n in spec.nodes
        ],
    }


def spec_from_dict(d: Mapping[str, object]) -> TestbedSpec:
    nodes = tuple(
        NodeSpec(
            name=check_node_name(n["name"]),
            link_mbit=None if n["link_mbit"] is None else float(n["link_mbit"]),
            loss_pct=float(n["loss_pct"]),
            cpu=_quota_from_dict(n["cpu"]),
            profile=str(n.get("profile", "native")),
        )
        for n in d["nodes"]  # type: ignore[union-attr]
    )
    instance, port = int(d["instance"]), int(d["broker_port"])  # type: ignore[call-overload]
    return TestbedSpec(nodes=nodes, instance=instance, broker_port=port)


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Trial:
    """Probe times (seconds) measured at one quota."""

    quota_us: int
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        s = sorted(self.samples)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def closest_trial(trials: Sequence[Trial], target_s: float) -> Trial:
    if not trials:
        raise ConfigError("no calibration trials")
    return min(trials, key=lambda t: abs(math.log(t.median / target_s)))


def next_quota(
    trials: Sequence[Trial],
    *,
    target_s: float,
    period_us: int,
    native_s: float,
    tolerance: float = 0.05,
    min_quota_us: int = 1_000,
    step_us: int = 100,
) -> int | None:
    """The next quota to try, or None when searching further cannot help.

    Done when a trial's median is within ``tolerance`` of ``target_s``. The first guess assumes
    time ~ 1/quota from the unthrottled time. Then a bracket: the largest quota still too slow and
    the smallest already too fast, interpolated on log(time) vs log(quota) (the response is
    non-linear: small quotas cost more than 1/quota), kept off the bracket ends. One-sided, it
    extrapolates with 1/quota, stepping at most 4x.
    """
    if target_s <= 0 or native_s <= 0:
        raise ConfigError("calibration needs positive target and native times")

    def clamp(q: float) -> int:
        q = round(q / step_us) * step_us
        return int(min(max(q, min_quota_us), period_us))

    if not trials:
        return clamp(period_us * native_s / target_s)
    if any(abs(t.median - target_s) <= tolerance * target_s for t in trials):
        return None
    tried = {t.quota_us for t in trials}
    slow = [t for t in trials if t.median > target_s]
    fast = [t for t in trials if t.median < target_s]
    lo = max(slow, key=lambda t: t.quota_us) if slow else None
    hi = min(fast, key=lambda t: t.quota_us) if fast else None
    if lo is not None and hi is not None:
        if lo.quota_us >= hi.quota_us or hi.quota_us - lo.quota_us <= step_us:
            return None  # noise made the bracket inconsistent, or it cannot shrink further
        llo, lhi = math.log(lo.quota_us), math.log(hi.quota_us)
        tlo, thi = math.log(lo.median), math.log(hi.median)
        x = llo + (math.log(target_s) - tlo) * (lhi - llo) / (thi - tlo)
        x = min(max(x, llo + 0.1 * (lhi - llo)), lhi - 0.1 * (lhi - llo))
        q = clamp(math.exp(x))
    elif lo is not None:
        q = clamp(lo.quota_us * min(4.0, max(1.1, lo.median / target_s)))
    else:
        assert hi is not None
        q = clamp(hi.quota_us / min(4.0, max(1.1, target_s / hi.median)))
    return None if q in tried else q


@dataclass(frozen=True)
class Calibration:
    """A measured CPU quota for a device profile (one entry of the calibration file).

    ``samples`` are the probe times at the chosen quota; ``trials`` the whole search;
    ``native_s`` the probe's wall time without a quota and ``native_cpu_s`` its CPU time (they
    differ when other jobs share the cores); ``machine`` what the host was.
    """

    profile: str
    model: str
    tokens: int
    threads: int
    period_us: int
    quota_us: int
    target_s: float
    measured_s: float
    samples: tuple[float, ...]
    native_s: float
    date: str
    machine: Mapping[str, object] = field(default_factory=dict)
    trials: tuple[Trial, ...] = ()
    native_cpu_s: float | None = None

    @property
    def quota(self) -> CpuQuota:
        return CpuQuota(self.period_us, self.quota_us)

    @property
    def slowdown(self) -> float:
        return self.measured_s / self.native_s

    def to_dict(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "model": self.model,
            "tokens": self.tokens,
            "threads": self.threads,
            "period_us": self.period_us,
            "quota_us": self.quota_us,
            "share": round(self.quota_us / self.period_us, 6),
            "target_s": self.target_s,
            "measured_s": self.measured_s,
            "samples": list(self.samples),
            "native_s": self.native_s,
            "native_cpu_s": self.native_cpu_s,
            "slowdown": round(self.slowdown, 3),
            "date": self.date,
            "machine": dict(self.machine),
            "trials": [{"quota_us": t.quota_us, "samples": list(t.samples)} for t in self.trials],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Calibration":
        try:
            return cls(
                profile=str(d["profile"]),
                model=str(d["model"]),
                tokens=int(d["tokens"]),  # type: ignore[arg-type]
                threads=int(d["threads"]),  # type: ignore[arg-type]
                period_us=int(d["period_us"]),  # type: ignore[arg-type]
                quota_us=int(d["quota_us"]),  # type: ignore[arg-type]
                target_s=float(d["target_s"]),  # type: ignore[arg-type]
                measured_s=float(d["measured_s"]),  # type: ignore[arg-type]
                samples=tuple(float(x) for x in d["samples"]),  # type: ignore[union-attr]
                native_s=float(d["native_s"]),  # type: ignore[arg-type]
                date=str(d["date"]),
                machine=dict(d.get("machine") or {}),  # type: ignore[arg-type]
                trials=tuple(
                    Trial(int(t["quota_us"]), tuple(float(x) for x in t["samples"]))
                    for t in d.get("trials") or []  # type: ignore[union-attr]
                ),
                native_cpu_s=(
                    None if d.get("native_cpu_s") is None else float(d["native_cpu_s"])  # type: ignore[arg-type]
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad calibration entry: {e}") from e


def calibrations_to_json(entries: Mapping[str, Calibration]) -> str:
    """The calibration file: ``{"version": 1, "profiles": {name: Calibration.to_dict()}}``."""
    doc = {"version": CALIBRATION_VERSION, "profiles": {k: v.to_dict() for k, v in sorted(entries.items())}}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def calibrations_from_json(text: str) -> dict[str, Calibration]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"calibration file is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != CALIBRATION_VERSION:
        raise ConfigError("calibration file has an unknown version")
    profiles = doc.get("profiles")
    if not isinstance(profiles, dict):
        raise ConfigError("calibration file has no profiles")
    return {k: Calibration.from_dict(v) for k, v in profiles.items()}
