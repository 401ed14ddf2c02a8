"""What a testbed is, as data: node names, the spec (nodes, links, loss, CPU) and the layout
(namespaces, addresses, cgroups) it gets on the machine.

Pure: nothing here runs a command, reads a clock or touches a file.

Topology of instance ``I`` (0..99; several instances can be up at once)::

    root ns          mt-I-host 10.213.I.1   (one veth end: lets host tools reach the mesh)
                        |
    ns mt-I-gw       host --+
                            br0 10.213.I.2  (bridge = the access point; the broker binds here)
                     v-pi1 -+  v-pi2 ...    (tbf on each v-<node>: the node's downlink)
                        |
    ns mt-I-pi1      eth0 10.213.I.10       (tbf on eth0: uplink; iptables chain mesh-loss)

Every namespace is ``mt-I-<name>`` (the gateway is ``mt-I-gw``), the one root-namespace link is
``mt-I-host``, every cgroup is ``mesh-tb-I-<name>`` in both the ``cpu`` and the ``memory``
hierarchy (``/sys/fs/cgroup/{cpu,memory}/``); calibration runs use ``mesh-tb-cal-<pid>`` (cpu only). Cleanup finds leftovers of a crashed run by these patterns alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NewType, Sequence

from mesh.errors import ConfigError
from nodes.testbed.profiles import CpuQuota, DeviceProfile

NodeName = NewType("NodeName", str)

CPU_CGROUP_ROOT = "/sys/fs/cgroup/cpu"
MEMORY_CGROUP_ROOT = "/sys/fs/cgroup/memory"
MIN_MEM_CAP_MIB = 16  # below this not even the Python interpreter starts
NETNS_PREFIX = "mt-"
CGROUP_PREFIX = "mesh-tb-"
GATEWAY = NodeName("gw")
SUBNET_FIRST_OCTETS = "10.213"
BROKER_PORT = 1883
NODE_HOST_BASE = 10  # node i gets 10.213.I.(10 + i)
MAX_NODES = 200
MAX_INSTANCE = 99

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
    """The group's directory in the cpu hierarchy."""
    return f"{CPU_CGROUP_ROOT}/{group}"


def memory_cgroup_path(group: str) -> str:
    """The group's directory in the memory hierarchy (same name as in the cpu one)."""
    return f"{MEMORY_CGROUP_ROOT}/{group}"


def calibration_cgroup(pid: int) -> str:
    return f"{CGROUP_PREFIX}cal-{pid}"


# --------------------------------------------------------------------------- spec and layout


@dataclass(frozen=True)
class NodeSpec:
    """One emulated device: its profile plus per-node overrides. ``mem_cap_mib`` is the node's
    memory cgroup limit (swap off; None = uncapped)."""

    name: NodeName
    link_mbit: float | None
    loss_pct: float
    cpu: CpuQuota | None
    profile: str = "native"
    mem_cap_mib: int | None = None

    def __post_init__(self) -> None:
        check_node_name(self.name)
        check_loss(self.loss_pct)
        check_mem_cap(self.mem_cap_mib)
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


def check_mem_cap(mib: int | None) -> int | None:
    if mib is not None and not MIN_MEM_CAP_MIB <= mib <= 1 << 24:
        raise ConfigError(f"memory cap must be {MIN_MEM_CAP_MIB} MiB..16 TiB, got {mib} MiB")
    return mib


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
    mem_cap_mib: int | None = None,
) -> TestbedSpec:
    """``count`` nodes ``pi1..piK`` of one profile; ``link_mbit`` overrides the profile's rate,
    ``mem_cap_mib`` its memory cap (an explicit override: results record both, see
    ``TestbedState``)."""
    names = [check_node_name(f"{prefix}{i}") for i in range(1, count + 1)]
    loss = dict(loss or {})
    unknown = set(loss) - set(names)
    if unknown:
        raise ConfigError(f"--loss names unknown nodes {sorted(unknown)}; nodes are {names}")
    rate = link_mbit if link_mbit is not None else profile.link_mbit
    cap = check_mem_cap(mem_cap_mib) if mem_cap_mib is not None else profile.mem_cap_mib
    nodes = tuple(
        NodeSpec(name=n, link_mbit=rate, loss_pct=loss.get(n, 0.0), cpu=profile.cpu, profile=profile.name,
                 mem_cap_mib=cap)
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
