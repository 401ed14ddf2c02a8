"""The state file of an instance (``<run dir>/<instance>/state.json``), what is up on the
machine (:func:`status`), and :func:`teardown`, which removes an instance by the names alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError, MeshError
from nodes.testbed.plan import owned, plan_cleanup, plan_unthrottle
from nodes.testbed.record import TestbedState
from nodes.testbed.shell import alive, execute, group_memory, kill_all, locked, pids_of, scan
from nodes.testbed.spec import layout

DEFAULT_RUN_DIR = Path("/run/mesh-testbed")


def state_path(run_dir: Path, instance: int) -> Path:
    return run_dir / str(instance) / "state.json"


def read_state(run_dir: Path, instance: int) -> TestbedState | None:
    try:
        return TestbedState.from_json(state_path(run_dir, instance).read_text())
    except FileNotFoundError:
        return None


def in_use(run_dir: Path, instance: int) -> TestbedState | None:
    """The state of ``instance`` if it is up: left running on purpose or its owner is alive."""
    st = read_state(run_dir, instance)
    if st is not None and (st.detached or (st.owner_pid != os.getpid() and alive(st.owner_pid))):
        return st
    return None


def write_state(run_dir: Path, state: TestbedState) -> None:
    path = state_path(run_dir, state.instance)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def private_homes(home: Path, instance: int | None) -> list[Path]:
    """The nodes' private copies (``Testbed.private_home``) of ``instance`` (None: every one)
    under mesh home ``home``: ``<home>/testbed/nodes/<instance>-<node>``."""
    root = home / "testbed" / "nodes"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.split("-", 1)[0].isdigit()
                  and (instance is None or d.name.split("-", 1)[0] == str(instance)))


def teardown(instance: int | None, run_dir: Path = DEFAULT_RUN_DIR, home: Path | None = None) -> dict[str, Any]:
    """Remove every object of ``instance`` (None: of every instance) and kill its processes;
    with ``home``, also the nodes' private copies of the weights under it.

    Idempotent; works from the names alone, so it also cleans up after a crashed run. Raises
    :class:`MeshError` if anything is still there afterwards.
    """
    with locked(run_dir):
        mine = owned(scan(), instance)
        for step in plan_unthrottle(mine):
            with contextlib.suppress(MeshError):  # a cgroup may vanish meanwhile
                execute([step])
        killed = kill_all(mine)
        execute(plan_cleanup(mine))
        left = owned(scan(), instance)
        dirs = [run_dir / str(instance)] if instance is not None else [
            d for d in run_dir.iterdir() if d.is_dir() and d.name.isdigit()
        ]
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                state_path(run_dir, int(d.name)).unlink()
        copies = private_homes(home, instance) if home is not None else []
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)
    report = {
        "instance": instance,
        "killed": killed,
        "removed": {"netns": list(mine.netns), "links": list(mine.links), "cgroups": list(mine.cgroups)}
        | ({"private_homes": [str(c) for c in copies]} if home is not None else {}),
        "left": {"netns": list(left.netns), "links": list(left.links), "cgroups": list(left.cgroups)},
    }
    if left.netns or left.links or left.cgroups:
        raise MeshError(f"testbed teardown left objects behind: {report['left']}")
    return report


def status(run_dir: Path = DEFAULT_RUN_DIR) -> dict[str, Any]:
    """Every instance with a state file, the liveness of its processes, each node's memory
    (``memory``: node -> :meth:`CgroupMemory.as_mib`, or null once its cgroup is gone), and
    stray objects."""
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
            live = pids_of(mine)
            for p in doc["processes"]:
                p["alive"] = p["pid"] in live and alive(p["pid"])
            doc["owner_alive"] = alive(st.owner_pid)
            lay = layout(st.spec)
            doc["memory"] = {}
            for n in (*lay.nodes, None):
                name, group = (str(n.name), n.cgroup) if n is not None else ("gw", lay.gw_cgroup)
                mem = group_memory(group)
                doc["memory"][name] = mem.as_mib() if mem is not None else None
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
