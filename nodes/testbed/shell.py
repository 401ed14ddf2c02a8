"""Running the testbed's steps as root, and what the machine holds: find our objects, kill our
processes, one lock per run directory, and whether this machine can run a testbed at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from mesh.errors import MeshError, TransportError
from mesh.sysmem import CgroupMemory, read_cgroup_v1
from nodes.testbed.plan import Found, MakeDir, RemoveDir, Run, Step, WriteFile
from nodes.testbed.spec import CPU_CGROUP_ROOT, MEMORY_CGROUP_ROOT, cgroup_path, memory_cgroup_path, netns_name

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_INSTANCE = 99  # reserved for capability checks; user instances are 0..98
STEP_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- running steps


def run_command(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
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


def remove_dir(path: str, deadline_s: float = 3.0) -> bool:
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
            run_command(step.argv, stdin=step.stdin, check=step.check)
        elif isinstance(step, MakeDir):
            os.makedirs(step.path, exist_ok=True)
        elif isinstance(step, WriteFile):
            try:
                with open(step.path, "w") as f:
                    f.write(step.text)
            except OSError as e:
                raise MeshError(f"cannot write {step.text!r} to {step.path}: {e}") from e
        elif isinstance(step, RemoveDir):
            remove_dir(step.path)
        else:  # pragma: no cover - the Step union is closed
            raise TypeError(step)


# --------------------------------------------------------------------------- scanning and cleanup


def scan() -> Found:
    """Every netns, root-namespace link and top-level cpu or memory cgroup on the machine (names)."""
    netns = tuple(
        line.split()[0] for line in run_command(("ip", "netns", "list"), check=False).stdout.splitlines() if line.strip()
    )
    links = []
    for line in run_command(("ip", "-o", "link", "show"), check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            links.append(parts[1].strip().split("@")[0])
    groups: set[str] = set()
    for root in (CPU_CGROUP_ROOT, MEMORY_CGROUP_ROOT):
        with contextlib.suppress(OSError):
            groups |= {e.name for e in os.scandir(root) if e.is_dir()}
    return Found(netns=netns, links=tuple(links), cgroups=tuple(sorted(groups)))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def pids_of(mine: Found) -> set[int]:
    pids: set[int] = set()
    for group in mine.cgroups:
        for path in (cgroup_path(group), memory_cgroup_path(group)):
            with contextlib.suppress(OSError):
                pids |= {int(x) for x in Path(path, "cgroup.procs").read_text().split()}
    for ns in mine.netns:
        pids |= {int(x) for x in run_command(("ip", "netns", "pids", ns), check=False).stdout.split() if x.isdigit()}
    pids.discard(os.getpid())
    return pids


def kill_all(mine: Found, term_s: float = 3.0, kill_s: float = 3.0) -> list[int]:
    """SIGTERM every process found in ``mine``'s cgroups and namespaces, then SIGKILL (bounded).

    Pids are read from the cgroups and namespaces themselves, never from a state file, so a
    recycled pid can never hit an unrelated process.
    """
    seen: set[int] = set()
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        pids = {p for p in pids_of(mine) if alive(p)}
        seen |= pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + wait_s
        while time.monotonic() < end and any(alive(p) for p in pids):
            time.sleep(0.05)
    return sorted(seen)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- capability check


def unavailable_reason() -> str | None:
    """Why this machine cannot run a testbed, or None when it can (tries every mechanism)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, iptables, cgroups)"
    for tool in ("ip", "tc", "iptables", "iptables-restore", "sh", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2 / iptables / util-linux)"
    if not Path(CPU_CGROUP_ROOT, "cpu.cfs_quota_us").exists():
        return f"cgroup v1 cpu controller not mounted at {CPU_CGROUP_ROOT}"
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control"):
        if not Path(MEMORY_CGROUP_ROOT, name).exists():
            why = " (swap accounting off: boot with swapaccount=1)" if "memsw" in name else ""
            return f"cgroup v1 memory controller at {MEMORY_CGROUP_ROOT} has no {name}{why}"
    ns = netns_name(PROBE_INSTANCE, f"p{os.getpid()}")
    group = cgroup_path(f"mesh-tb-{PROBE_INSTANCE}-p{os.getpid()}")
    mem_group = memory_cgroup_path(f"mesh-tb-{PROBE_INSTANCE}-p{os.getpid()}")
    try:
        if run_command(("ip", "netns", "add", ns), check=False).returncode != 0:
            return "cannot create network namespaces (ip netns add failed)"
        run_command(("ip", "-n", ns, "link", "set", "lo", "up"), check=False)
        if run_command(("tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "21mbit",
                 "burst", "16384", "latency", "50ms"), check=False).returncode != 0:
            return "tc tbf is not available"
        rule = ("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-m", "statistic",
                "--mode", "random", "--probability", "0.05", "-j", "DROP")
        if run_command(rule, check=False).returncode != 0:
            return "iptables -m statistic does not work inside a namespace"
        try:
            os.mkdir(group)
            Path(group, "cpu.cfs_quota_us").write_text("50000")
        except OSError as e:
            return f"cannot create a cgroup v1 cpu group with a quota: {e}"
        try:
            os.mkdir(mem_group)
            Path(mem_group, "memory.limit_in_bytes").write_text(str(64 << 20))
            Path(mem_group, "memory.memsw.limit_in_bytes").write_text(str(64 << 20))
        except OSError as e:
            return f"cannot create a cgroup v1 memory group with a limit and no swap: {e}"
    finally:
        run_command(("ip", "netns", "del", ns), check=False)
        remove_dir(group)
        remove_dir(mem_group)
    return None


def group_memory(group: str) -> CgroupMemory | None:
    """The memory figures of testbed cgroup ``group`` (None when it does not exist)."""
    try:
        return read_cgroup_v1(Path(memory_cgroup_path(group)))
    except (OSError, ValueError):
        return None


def pids_in(group: str) -> list[int]:
    """The processes in testbed cgroup ``group`` (its memory hierarchy; [] when it is gone)."""
    try:
        return [int(x) for x in Path(memory_cgroup_path(group), "cgroup.procs").read_text().split()]
    except OSError:
        return []


def reset_peak(group: str) -> None:
    """Restart the group's peak (``max_usage_in_bytes``) from its current usage, e.g. after a
    node has loaded, so the next read is the peak of what came after."""
    try:
        Path(memory_cgroup_path(group), "memory.max_usage_in_bytes").write_text("0")
    except OSError as e:
        raise MeshError(f"cannot reset the memory peak of {group}: {e}") from e


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
