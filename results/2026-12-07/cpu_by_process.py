"""Run a command and report the CPU seconds each of its descendant processes used, by role.

Issue 14's HALO side by side found the tree after the layout move ~15 % slower per token in every
phase, the coordinator's own encode included, as if something else took CPU. This runs one
`mesh bench halo` (or anything) and samples /proc every 0.5 s: per descendant, its command line
and its last user+system CPU time; at the end, totals per role (broker, coordinator, worker, ...).

Usage: python cpu_by_process.py OUT.json -- COMMAND...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def children_of(root: int) -> set[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                parent[int(d)] = int(fields[1])
            except (OSError, IndexError):
                pass
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out.add(c)
                todo.append(c)
    return out


def sample(pid: int) -> tuple[str, float, list[tuple[str, float]]] | None:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        threads = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                raw = open(f"/proc/{pid}/task/{tid}/stat").read()
                name = raw.split("(", 1)[1].rsplit(")", 1)[0]
                tf = raw.rsplit(")", 1)[1].split()
                threads.append((name, (int(tf[11]) + int(tf[12])) / TICK))
            except (OSError, IndexError):
                pass
        return cmd, (int(fields[11]) + int(fields[12])) / TICK, threads
    except (OSError, IndexError):
        return None


def role(cmd: str) -> str:
    if cmd.startswith("mosquitto") or "broker.runner" in cmd or "nodes.cli broker" in cmd:
        return "broker"
    if "nodes.cli coordinator" in cmd:
        return "coordinator"
    if "--roles worker" in cmd:
        return "worker"
    if "nodes.cli node" in cmd:
        return "node"
    return "other"


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    proc = subprocess.Popen(cmd)
    seen: dict[int, tuple[str, float, list[tuple[str, float]]]] = {}
    while proc.poll() is None:
        for pid in children_of(proc.pid):
            s = sample(pid)
            if s is None:
                continue
            old = seen.get(pid)
            if old is not None:  # a zombie has no command line and no threads: keep what it had
                cmd_, _, ths = old
                s = (s[0] or cmd_, max(s[1], old[1]), s[2] if sum(t for _, t in s[2]) >= sum(t for _, t in ths) else ths)
            seen[pid] = s
        time.sleep(0.5)
    by_role: dict[str, float] = {}  # threads are all "python" to the kernel: per process is what there is
    threads: dict[str, dict[str, float]] = {}
    for cmdline, cpu, ths in seen.values():
        r = role(cmdline)
        by_role[r] = round(by_role.get(r, 0.0) + cpu, 2)
        for name, t in ths:
            threads.setdefault(r, {})[name] = round(threads.get(r, {}).get(name, 0.0) + t, 2)
    json.dump({"command": cmd, "exit": proc.returncode, "cpu_s_by_role": by_role, "cpu_s_by_thread": threads,
               "processes": [{"cmd": c[:200], "cpu_s": t} for c, t, _ in seen.values()]}, open(out, "w"), indent=1)
    print(json.dumps(by_role))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
