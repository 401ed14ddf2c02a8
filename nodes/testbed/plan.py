"""The commands that build, change and remove a testbed, as data: :class:`Step` lists the shell
(``nodes.testbed.shell.execute``) runs as root, the cleanup matching that finds a crashed run's
objects by name, and the argv of the processes started inside.

Pure: nothing here runs a command, reads a clock or touches a file; tests read the steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from mesh.errors import ConfigError
from nodes.testbed.profiles import CpuQuota
from nodes.testbed.spec import (
    CGROUP_PREFIX,
    GATEWAY,
    NETNS_PREFIX,
    Layout,
    cgroup_path,
    check_loss,
    check_mem_cap,
    memory_cgroup_path,
)


LOSS_CHAIN = "mesh-loss"
NODE_IF = "eth0"
BRIDGE_IF = "br0"
HOST_PEER_IF = "host"
MTU_BYTES = 1514
NETNS_DIR = "/run/netns"  # where `ip netns add` binds each namespace
MiB = 1 << 20


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


def _cpu_steps(group: str, cpu: CpuQuota | None) -> list[Step]:
    path = cgroup_path(group)
    quota = "-1" if cpu is None else str(cpu.quota_us)
    period = "100000" if cpu is None else str(cpu.period_us)
    # quota -1 first: a new period may be rejected while an old quota is larger than it.
    return [
        WriteFile(f"{path}/cpu.cfs_quota_us", "-1"),
        WriteFile(f"{path}/cpu.cfs_period_us", period),
        WriteFile(f"{path}/cpu.cfs_quota_us", quota),
    ]


def _memory_steps(group: str, mem_cap_mib: int | None) -> list[Step]:
    """Cap memory at ``mem_cap_mib`` with no swap: memory+swap (``memsw``) gets the same limit,
    so a group over its cap reclaims page cache and then OOM-kills instead of swapping.

    The kernel wants memsw >= memory at every moment, so memsw is lifted first, then memory
    set, then memsw lowered to it: valid from any previous pair of limits.
    """
    check_mem_cap(mem_cap_mib)
    path = memory_cgroup_path(group)
    limit = "-1" if mem_cap_mib is None else str(mem_cap_mib * MiB)
    return [
        WriteFile(f"{path}/memory.memsw.limit_in_bytes", "-1"),
        WriteFile(f"{path}/memory.limit_in_bytes", limit),
        WriteFile(f"{path}/memory.memsw.limit_in_bytes", limit),
    ]


def _cgroup_steps(group: str, cpu: CpuQuota | None, mem_cap_mib: int | None) -> list[Step]:
    return ([MakeDir(cgroup_path(group))] + _cpu_steps(group, cpu)
            + [MakeDir(memory_cgroup_path(group))] + _memory_steps(group, mem_cap_mib))


def plan_set_cpu(lay: Layout, node: str, cpu: CpuQuota | None) -> list[Step]:
    """Change the CPU quota of ``node``'s cgroup (None: unlimited); applies to running processes."""
    group = lay.gw_cgroup if node == GATEWAY else lay.node(node).cgroup
    return _cpu_steps(group, cpu)


def plan_set_mem(lay: Layout, node: str, mem_cap_mib: int | None) -> list[Step]:
    """Change the memory cap of ``node``'s cgroup (None: uncapped) while it runs. Lowering it
    below what the group uses makes the kernel reclaim first and refuse the write if it cannot
    (the shell then raises)."""
    group = lay.gw_cgroup if node == GATEWAY else lay.node(node).cgroup
    return _memory_steps(group, mem_cap_mib)


def plan_up(lay: Layout) -> list[Step]:
    """Every step that builds ``lay``, in order. Run after cleaning up the same instance."""
    gw = lay.gw_netns
    no_v6 = ("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    steps: list[Step] = _cgroup_steps(lay.gw_cgroup, None, None)
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
        steps += _cgroup_steps(n.cgroup, n.spec.cpu, n.spec.mem_cap_mib)
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
    """Wrap ``argv`` so it joins ``cgroup`` (cpu and memory) and then enters ``netns``, all
    before it runs.

    The shell writes its own pid to both groups and execs; ``nsenter`` execs too, so the pid the
    caller sees is the final process and every byte it allocates is charged to the node's memory
    cgroup. ``nsenter --net`` enters only the network namespace: the process keeps this mount
    namespace and so sees /sys/fs/cgroup and can read its own memory limit (``ip netns exec``
    remounts /sys without the cgroup filesystems).
    """
    if not argv:
        raise ConfigError("spawn needs a command")
    cpu = f"{cgroup_path(cgroup)}/cgroup.procs"
    mem = f"{memory_cgroup_path(cgroup)}/cgroup.procs"
    inner = ("nsenter", f"--net={NETNS_DIR}/{netns}", "--") if netns else ()
    return ("sh", "-c", 'echo $$ > "$0" && echo $$ > "$1" && shift && exec "$@"', cpu, mem) + inner + tuple(argv)


# --------------------------------------------------------------------------- cleanup


@dataclass(frozen=True)
class Found:
    """What the shell saw on the machine: netns names, root-ns link names, cgroup names (in the
    cpu or the memory hierarchy: the testbed gives a group the same name in both)."""

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
    """Lift the CPU quotas of ``mine``'s cgroups, so their processes exit promptly when told
    (a memory cap does not slow an exit: it is left alone)."""
    return [WriteFile(f"{cgroup_path(g)}/cpu.cfs_quota_us", "-1") for g in mine.cgroups]


def plan_cleanup(mine: Found) -> list[Step]:
    """Remove what :func:`owned` returned. Processes must be gone first (the shell kills them).

    Deleting a namespace deletes its veth ends, and with them their peers, its bridge and its
    iptables rules; the root-ns link is deleted explicitly in case its namespace never existed.
    """
    steps: list[Step] = [Run(("ip", "netns", "del", ns), check=False) for ns in mine.netns]
    steps += [Run(("ip", "link", "del", link), check=False) for link in mine.links]
    steps += [RemoveDir(path(g)) for g in mine.cgroups for path in (cgroup_path, memory_cgroup_path)]
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
