"""What memory a process may use and what it uses, as the kernel reports it.

A node runs on a board whose RAM is all it has (a Pi Zero 2W's Linux sees about 426 MB), often
inside a memory cgroup that is smaller still: the testbed puts each emulated device in a cgroup
v1 group of the device's size; Raspberry Pi OS runs systemd services in cgroup v2. The limit a
node must live within is therefore the smallest of:

- its memory cgroup's limit, including every ancestor's (v1: ``memory.limit_in_bytes`` and
  ``hierarchical_memory_limit``; v2: ``memory.max`` up to the mount's root),
- the board's RAM (``MemTotal``), which is all there is when no cgroup limits the process.

The cgroup also says what the memory is: anonymous (heap, tensors built at run time) apart from
page cache, and within the page cache what is mapped into a process (memory-mapped weights).
The split matters on a small device: the kernel can drop mapped file pages under pressure and
read them back on the next touch (a *major* fault, from the SD card), so a node squeezed by its
cap slows down instead of dying; anonymous memory cannot be dropped without swap, so a node
over its cap with no swap is OOM-killed. The counters here are what a benchmark reads to tell
the two apart: major faults, and the cgroup's OOM-kill count.

Paths come from ``/proc/self/cgroup`` and ``/proc/self/mountinfo``, so a cgroup mounted anywhere
(or a container's view of one) is found; ``proc`` is a parameter so that callers can read another
process's view. Nothing here changes anything, except :func:`clear_referenced` (a process's
pages' referenced bits, which only measurements read).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

MiB = 1 << 20
# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is no limit.
V1_UNLIMITED_FROM = 1 << 62


@dataclass(frozen=True)
class CgroupMemory:
    """One memory cgroup's figures, in bytes (v1 or v2; ``None`` where the kernel has none).

    ``limit_bytes`` is the effective limit (the group's or an ancestor's, whichever is lower);
    ``swap_bytes`` how much swap the group may use on top of it (0: none; v1 derives it from
    ``memsw`` minus the memory limit). ``peak_bytes`` is v1 ``max_usage_in_bytes`` or v2
    ``memory.peak`` (kernels >= 5.19). ``anon_bytes`` is anonymous memory (v1 ``rss``),
    ``file_bytes`` the page cache (v1 ``cache``), ``mapped_bytes`` the part of the page cache
    mapped into a process (v1 ``mapped_file``, v2 ``file_mapped``). ``major_faults`` and
    ``oom_kills`` count since the group was made.
    """

    version: int
    path: str
    limit_bytes: int | None
    swap_bytes: int | None
    usage_bytes: int
    peak_bytes: int | None
    anon_bytes: int
    file_bytes: int
    mapped_bytes: int
    major_faults: int
    oom_kills: int

    def as_mib(self) -> dict[str, Any]:
        """The same figures in MiB (one decimal), counts as they are: for JSON and status lines."""
        out: dict[str, Any] = {"version": self.version, "path": self.path}
        for k, v in asdict(self).items():
            if k.endswith("_bytes"):
                out[k[: -len("_bytes")] + "_mib"] = None if v is None else round(v / MiB, 1)
        out["major_faults"] = self.major_faults
        out["oom_kills"] = self.oom_kills
        return out


@dataclass(frozen=True)
class ProcessMemory:
    """One process's resident memory (bytes) from ``/proc/<pid>/status`` and its major faults."""

    rss_bytes: int
    peak_bytes: int  # VmHWM: the highest RSS so far
    anon_bytes: int
    file_bytes: int
    shmem_bytes: int
    major_faults: int


@dataclass(frozen=True)
class MemoryLimit:
    """The memory a process may use: ``bytes``, and where that bound comes from.

    ``source`` is ``"cgroup v1"``, ``"cgroup v2"`` or ``"board"`` (no cgroup limit below the
    board's RAM); ``board_bytes`` is ``MemTotal`` either way.
    """

    bytes: int
    source: str
    board_bytes: int


# --------------------------------------------------------------------------- parsing (pure)


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``memory.events``, ``memory.oom_control``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_kib_fields(text: str) -> dict[str, int]:
    """``Key:   123 kB`` lines (``/proc/meminfo``, ``/proc/<pid>/status``) -> bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def memory_cgroup_dir(cgroup_text: str, mountinfo_text: str) -> tuple[int, Path] | None:
    """Where this process's memory cgroup is: ``(version, directory)``, or None.

    ``cgroup_text`` is ``/proc/<pid>/cgroup``, ``mountinfo_text`` that process's
    ``/proc/<pid>/mountinfo``. The v1 memory controller wins where both exist (a hybrid system
    such as this one has a v2 mount without the memory controller). The directory is the
    mount point plus the cgroup path below the mount's root, so bind-mounted or namespaced
    views resolve too.
    """
    v1_path = v2_path = None
    for line in cgroup_text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            v1_path = path
        elif hid == "0" and controllers == "":
            v2_path = path
    mounts: list[tuple[str, str, str, str]] = []  # (fstype, root, mount point, super options)
    for line in mountinfo_text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 5 or len(fields) < dash + 4:
            continue
        mounts.append((fields[dash + 1], _unescape(fields[3]), _unescape(fields[4]), fields[dash + 3]))

    def resolve(path: str, fstype: str, need: str | None) -> Path | None:
        for fs, root, point, opts in mounts:
            if fs != fstype or (need is not None and need not in opts.split(",")):
                continue
            if path == root or path.startswith(root.rstrip("/") + "/"):
                rel = path[len(root.rstrip("/")):].lstrip("/")
                return Path(point) / rel if rel else Path(point)
        return None

    if v1_path is not None:
        found = resolve(v1_path, "cgroup", "memory")
        if found is not None:
            return 1, found
    if v2_path is not None:
        found = resolve(v2_path, "cgroup2", None)
        if found is not None:
            return 2, found
    return None


# --------------------------------------------------------------------------- reading a cgroup


def _read(path: Path) -> str:
    return path.read_text()


def _read_int(path: Path) -> int | None:
    """An integer file; ``max`` (v2) or a v1 no-limit value read as None."""
    text = _read(path).strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= V1_UNLIMITED_FROM else value


def _min_limit(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def read_cgroup_v1(group: Path) -> CgroupMemory:
    """Figures of the v1 memory cgroup at ``group``, with its children's (``total_*``) included.

    Raises OSError when the group or one of its files is missing.
    """
    stat = parse_keyed(_read(group / "memory.stat"))
    limit = _min_limit(_read_int(group / "memory.limit_in_bytes"),
                       _unlimited_v1(stat.get("hierarchical_memory_limit")))
    memsw: int | None = None
    swap_file = group / "memory.memsw.limit_in_bytes"
    if swap_file.exists():
        memsw = _min_limit(_read_int(swap_file), _unlimited_v1(stat.get("hierarchical_memsw_limit")))
    swap = None if memsw is None or limit is None else max(0, memsw - limit)
    oom = parse_keyed(_read(group / "memory.oom_control"))
    return CgroupMemory(
        version=1,
        path=str(group),
        limit_bytes=limit,
        swap_bytes=swap,
        usage_bytes=int(_read(group / "memory.usage_in_bytes")),
        peak_bytes=int(_read(group / "memory.max_usage_in_bytes")),
        anon_bytes=stat.get("total_rss", stat.get("rss", 0)) + stat.get("total_shmem", stat.get("shmem", 0)),
        file_bytes=stat.get("total_cache", stat.get("cache", 0)),
        mapped_bytes=stat.get("total_mapped_file", stat.get("mapped_file", 0)),
        major_faults=stat.get("total_pgmajfault", stat.get("pgmajfault", 0)),
        oom_kills=oom.get("oom_kill", 0),
    )


def _unlimited_v1(value: int | None) -> int | None:
    return None if value is None or value >= V1_UNLIMITED_FROM else value


def read_cgroup_v2(group: Path, mount_root: Path | None = None) -> CgroupMemory:
    """Figures of the v2 cgroup at ``group``; the limit is the lowest ``memory.max`` from
    ``group`` up to ``mount_root`` (default: as far as the files go). Raises OSError when the
    group has no memory controller (no ``memory.current``)."""
    stat = parse_keyed(_read(group / "memory.stat"))
    usage = int(_read(group / "memory.current"))
    limit = swap = None
    node = group
    while True:
        if (node / "memory.max").exists():
            limit = _min_limit(limit, _read_int(node / "memory.max"))
        if (node / "memory.swap.max").exists():
            swap = _min_limit(swap, _read_int(node / "memory.swap.max"))
        if node == mount_root or node.parent == node or not (node.parent / "cgroup.controllers").exists():
            break
        node = node.parent
    peak_file = group / "memory.peak"
    events = parse_keyed(_read(group / "memory.events")) if (group / "memory.events").exists() else {}
    return CgroupMemory(
        version=2,
        path=str(group),
        limit_bytes=limit,
        swap_bytes=swap,
        usage_bytes=usage,
        peak_bytes=int(_read(peak_file)) if peak_file.exists() else None,
        anon_bytes=stat.get("anon", 0) + stat.get("shmem", 0),
        file_bytes=stat.get("file", 0) - stat.get("shmem", 0),
        mapped_bytes=stat.get("file_mapped", 0),
        major_faults=stat.get("pgmajfault", 0),
        oom_kills=events.get("oom_kill", 0),
    )


def read_cgroup(version: int, group: Path) -> CgroupMemory:
    return read_cgroup_v1(group) if version == 1 else read_cgroup_v2(group)


# --------------------------------------------------------------------------- this process


def own_cgroup_memory(pid: int | str = "self", proc: Path = Path("/proc")) -> CgroupMemory | None:
    """The memory cgroup of process ``pid`` (default this one), or None where there is none
    readable (no memory controller, cgroup filesystem not mounted in this mount namespace)."""
    try:
        where = memory_cgroup_dir(_read(proc / str(pid) / "cgroup"), _read(proc / str(pid) / "mountinfo"))
        if where is None:
            return None
        return read_cgroup(*where)
    except (OSError, ValueError):
        return None


def board_bytes(proc: Path = Path("/proc")) -> int:
    """The board's RAM as Linux sees it (``MemTotal``)."""
    return parse_kib_fields(_read(proc / "meminfo"))["MemTotal"]


def memory_limit(pid: int | str = "self", proc: Path = Path("/proc")) -> MemoryLimit:
    """How much memory process ``pid`` may use: its cgroup's limit, or the board's RAM if lower
    or if no cgroup limits it."""
    board = board_bytes(proc)
    group = own_cgroup_memory(pid, proc)
    if group is not None and group.limit_bytes is not None and group.limit_bytes < board:
        return MemoryLimit(group.limit_bytes, f"cgroup v{group.version}", board)
    return MemoryLimit(board, "board", board)


def process_memory(pid: int | str = "self", proc: Path = Path("/proc")) -> ProcessMemory:
    """RSS, its peak and its parts for process ``pid``, and its major page faults so far."""
    status = parse_kib_fields(_read(proc / str(pid) / "status"))
    stat = _read(proc / str(pid) / "stat")
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, majflt field 12
    return ProcessMemory(
        rss_bytes=status.get("VmRSS", 0),
        peak_bytes=status.get("VmHWM", 0),
        anon_bytes=status.get("RssAnon", 0),
        file_bytes=status.get("RssFile", 0),
        shmem_bytes=status.get("RssShmem", 0),
        major_faults=int(fields[9]),
    )


@dataclass(frozen=True)
class MappingUse:
    """What a process holds of one mapped object (a file, or ``[heap]``, ``[anon]``, ``[stack]``),
    in bytes, over all its mappings (``/proc/<pid>/smaps``): ``rss`` resident, ``anon`` of that
    anonymous (heap, or a file mapping's written copy-on-write pages), ``referenced`` touched since
    the referenced bits were last cleared (:func:`clear_referenced`)."""

    rss: int
    anon: int
    referenced: int

    @property
    def file(self) -> int:
        """Resident pages backed by the file: clean, so the kernel may drop them under pressure."""
        return self.rss - self.anon


def parse_smaps(text: str) -> dict[str, MappingUse]:
    """``/proc/<pid>/smaps`` summed per mapped object: a file by its path, anonymous mappings as
    ``[anon]``, and the kernel's own names (``[heap]``, ``[stack]``, ``[vdso]``) as they are."""
    sums: dict[str, list[int]] = {}
    cur: list[int] | None = None
    fields = {"Rss:": 0, "Anonymous:": 1, "Referenced:": 2}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":") and "-" in parts[0] and len(parts) >= 5:
            name = " ".join(parts[5:]) or "[anon]"
            if name.startswith("[anon:") or name.startswith("[stack:"):  # named anonymous regions
                name = name.split(":", 1)[0] + "]"
            cur = sums.setdefault(name, [0, 0, 0])
        elif cur is not None and parts[0] in fields and len(parts) >= 2 and parts[1].isdigit():
            cur[fields[parts[0]]] += int(parts[1]) * 1024
    return {name: MappingUse(*v) for name, v in sums.items()}


def mappings(pid: int | str = "self", proc: Path = Path("/proc")) -> dict[str, MappingUse]:
    """Process ``pid``'s resident memory per mapped object (:func:`parse_smaps`)."""
    return parse_smaps(_read(proc / str(pid) / "smaps"))


def clear_referenced(pid: int | str = "self", proc: Path = Path("/proc")) -> None:
    """Clear the referenced bits of ``pid``'s pages: what :func:`mappings` then reports as
    ``referenced`` is what the process touched since (its working set over that span)."""
    (proc / str(pid) / "clear_refs").write_text("1")


LIMIT_REFRESH_S = 30.0  # a limit rarely changes: heartbeats re-read it at most this often
_limits: dict[Path, tuple[float, MemoryLimit]] = {}  # proc root -> (read at, limit)


def heartbeat_fields(proc: Path = Path("/proc")) -> Mapping[str, Any]:
    """What a node's heartbeat says about its memory, in MiB: RSS now and its peak, and the
    limit it lives within and where that comes from. Cheap enough for every heartbeat: RSS from
    ``/proc/self/status`` each time, the limit (cgroup files, mountinfo) at most every
    :data:`LIMIT_REFRESH_S`. Empty when ``/proc`` cannot be read (a heartbeat never fails for
    want of these figures)."""
    try:
        status = parse_kib_fields(_read(proc / "self" / "status"))
        now = time.monotonic()
        cached = _limits.get(proc)
        if cached is None or now - cached[0] >= LIMIT_REFRESH_S:
            cached = _limits[proc] = (now, memory_limit("self", proc))
        lim = cached[1]
    except (OSError, ValueError, KeyError, IndexError):
        return {}
    return {
        "rss_mib": round(status.get("VmRSS", 0) / MiB, 1),
        "rss_peak_mib": round(status.get("VmHWM", 0) / MiB, 1),
        "mem_limit_mib": round(lim.bytes / MiB, 1),
        "mem_limit_from": lim.source,
    }
