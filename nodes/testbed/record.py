"""The state document of a running instance (``<run dir>/<instance>/state.json``): what was
built, which processes run, which calibration is in force. Pure; ``nodes.testbed.state`` keeps
the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from mesh.errors import ConfigError
from nodes.testbed.plan import owned_objects
from nodes.testbed.profiles import PROFILE_NAMES, CpuQuota, device_profile
from nodes.testbed.spec import GATEWAY, NodeSpec, TestbedSpec, check_node_name, layout

STATE_VERSION = 1



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


def _profile_cap(profile: str) -> int | None:
    return device_profile(profile).mem_cap_mib if profile in PROFILE_NAMES else None


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
                "mem_cap_mib": n.mem_cap_mib,
                # the profile's own cap: differs from mem_cap_mib when a run overrode it
                "profile_mem_cap_mib": _profile_cap(n.profile),
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
            mem_cap_mib=None if n.get("mem_cap_mib") is None else int(n["mem_cap_mib"]),
        )
        for n in d["nodes"]  # type: ignore[union-attr]
    )
    instance, port = int(d["instance"]), int(d["broker_port"])  # type: ignore[call-overload]
    return TestbedSpec(nodes=nodes, instance=instance, broker_port=port)
