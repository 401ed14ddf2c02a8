"""mesh.sysmem: a process learns its memory limit and what it uses.

Cgroup v1 is tested on real cgroups (root only: a group is made, a real process joins it and
reports what it sees). This kernel binds the memory controller to v1, so no real v2 memory
cgroup can exist here; the v2 path (Raspberry Pi OS) is read from a directory laid out as the
kernel's cgroup v2 interface (Documentation/admin-guide/cgroup-v2.rst) with a mountinfo that
points at it, and the board fallback from a meminfo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mesh import sysmem, wire
from mesh.config import Limits
from mesh.member import Member

MiB = 1 << 20
V1_ROOT = Path("/sys/fs/cgroup/memory")
REPO = Path(__file__).resolve().parents[2]

REPORT = """
import json, sys
from mesh import sysmem
hold = b"\\x01" * (int(sys.argv[1]) << 20)
g = sysmem.own_cgroup_memory()
print(json.dumps({"limit": sysmem.memory_limit().__dict__, "group": g.__dict__ if g else None,
                  "proc": sysmem.process_memory().__dict__}))
"""


# --------------------------------------------------------------------------- cgroup v1, real


@pytest.fixture
def v1_groups() -> Iterator[list[Path]]:
    """Memory cgroups made for one test (removed afterwards, children first)."""
    if os.geteuid() != 0 or not (V1_ROOT / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and the cgroup v1 memory controller")
    made: list[Path] = []
    yield made
    for group in reversed(made):
        for _ in range(50):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # its last task is still exiting
                time.sleep(0.05)


def make_group(made: list[Path], path: Path, limit_mib: int | None) -> Path:
    path.mkdir()
    made.append(path)
    if limit_mib is not None:
        (path / "memory.limit_in_bytes").write_text(str(limit_mib * MiB))
    return path


def report_from(group: Path, hold_mib: int) -> dict[str, Any]:
    """Run REPORT in ``group`` (the shell joins it, then execs Python) and return what it saw."""
    argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"),
            sys.executable, "-c", REPORT, str(hold_mib)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_process_in_a_v1_group_sees_its_limit_and_its_usage(v1_groups: list[Path]) -> None:
    group = make_group(v1_groups, V1_ROOT / f"mesh-sysmem-test-{os.getpid()}", 200)
    seen = report_from(group, 40)
    print(seen)
    assert seen["limit"] == {"bytes": 200 * MiB, "source": "cgroup v1", "board_bytes": sysmem.board_bytes()}
    g = seen["group"]
    assert g["version"] == 1 and g["path"] == str(group) and g["limit_bytes"] == 200 * MiB
    assert g["anon_bytes"] >= 40 * MiB and g["usage_bytes"] >= g["anon_bytes"]
    assert g["peak_bytes"] >= g["usage_bytes"] and g["oom_kills"] == 0
    assert seen["proc"]["anon_bytes"] >= 40 * MiB and seen["proc"]["peak_bytes"] >= seen["proc"]["rss_bytes"]


def test_an_ancestors_lower_limit_is_the_one_that_counts(v1_groups: list[Path]) -> None:
    parent = make_group(v1_groups, V1_ROOT / f"mesh-sysmem-test-{os.getpid()}", 120)
    child = make_group(v1_groups, parent / "node", None)  # no limit of its own
    seen = report_from(child, 8)
    assert seen["group"]["path"] == str(child)
    assert seen["limit"]["bytes"] == 120 * MiB and seen["limit"]["source"] == "cgroup v1"


def test_without_a_limit_the_board_is_the_limit() -> None:
    lim = sysmem.memory_limit()
    mine = sysmem.own_cgroup_memory()
    if mine is not None and mine.limit_bytes is not None:
        pytest.skip("this test process itself runs under a memory limit")
    assert lim.source == "board" and lim.bytes == lim.board_bytes == sysmem.board_bytes()
    meminfo = Path("/proc/meminfo").read_text()
    assert lim.board_bytes == int(meminfo.split("MemTotal:")[1].split()[0]) * 1024


# --------------------------------------------------------------------------- this process


def test_process_memory_follows_an_allocation() -> None:
    before = sysmem.process_memory()
    hold = b"\x01" * (64 * MiB)
    after = sysmem.process_memory()
    assert len(hold) == 64 * MiB
    assert after.anon_bytes - before.anon_bytes >= 60 * MiB
    assert after.rss_bytes >= after.anon_bytes and after.peak_bytes >= after.rss_bytes
    assert after.major_faults >= before.major_faults


def test_every_heartbeat_carries_rss_peak_and_limit() -> None:
    class Bus:
        sent: list[tuple[str, bytes]] = []

        def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
            self.sent.append((topic, payload))

    bus = Bus()
    member = Member("n1", bus, Limits(), wire.RejectCounter())  # type: ignore[arg-type]
    member.publish_heartbeat({"time": 1.0, "model": "m", "model_key": "k", "queue": 0, "load": 0.0,
                              "prefill_tps": 0.0})
    body = wire.decode(bus.sent[-1][1]).body  # still a valid heartbeat on the wire
    mem, lim = sysmem.process_memory(), sysmem.memory_limit()
    assert body["mem_limit_mib"] == round(lim.bytes / MiB, 1) and body["mem_limit_from"] == lim.source
    assert 0 < body["rss_mib"] <= body["rss_peak_mib"] <= mem.peak_bytes / MiB + 1


# --------------------------------------------------------------------------- cgroup v2 and the board


def fake_proc(root: Path, cgroup: str, mountinfo: str, memtotal_kib: int = 427_000) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "meminfo").write_text(f"MemTotal:       {memtotal_kib} kB\nMemFree:         1000 kB\n")
    return proc


def v2_tree(root: Path, service_max: str, slice_max: str) -> Path:
    """A cgroup v2 hierarchy as the kernel lays it out: /system.slice/mesh-node.service."""
    cg = root / "cgroup"
    service = cg / "system.slice" / "mesh-node.service"
    service.mkdir(parents=True)
    for d in (cg, cg / "system.slice", service):
        (d / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (cg / "system.slice" / "memory.max").write_text(slice_max + "\n")
    (cg / "system.slice" / "memory.swap.max").write_text("max\n")
    (service / "memory.max").write_text(service_max + "\n")
    (service / "memory.swap.max").write_text("0\n")
    (service / "memory.current").write_text(str(150 * MiB) + "\n")
    (service / "memory.peak").write_text(str(190 * MiB) + "\n")
    (service / "memory.stat").write_text(
        f"anon {100 * MiB}\nfile {50 * MiB}\nkernel 1048576\nshmem 0\nfile_mapped {30 * MiB}\n"
        "pgfault 12345\npgmajfault 77\n")
    (service / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n")
    return cg


V2_MOUNT = "30 1 0:26 / {point} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_v2_limit_is_the_lowest_memory_max_up_the_tree(tmp_path: Path) -> None:
    cg = v2_tree(tmp_path, service_max="max", slice_max=str(350 * MiB))
    proc = fake_proc(tmp_path, "0::/system.slice/mesh-node.service\n", V2_MOUNT.format(point=cg))
    lim = sysmem.memory_limit(proc=proc)
    assert lim == sysmem.MemoryLimit(350 * MiB, "cgroup v2", 427_000 * 1024)
    g = sysmem.own_cgroup_memory(proc=proc)
    assert g == sysmem.CgroupMemory(
        version=2, path=str(cg / "system.slice" / "mesh-node.service"), limit_bytes=350 * MiB, swap_bytes=0,
        usage_bytes=150 * MiB, peak_bytes=190 * MiB, anon_bytes=100 * MiB, file_bytes=50 * MiB,
        mapped_bytes=30 * MiB, major_faults=77, oom_kills=2)
    assert g.as_mib()["mapped_mib"] == 30.0 and g.as_mib()["oom_kills"] == 2


def test_v2_with_no_limit_below_the_board_falls_back_to_memtotal(tmp_path: Path) -> None:
    cg = v2_tree(tmp_path, service_max="max", slice_max="max")
    proc = fake_proc(tmp_path, "0::/system.slice/mesh-node.service\n", V2_MOUNT.format(point=cg))
    assert sysmem.memory_limit(proc=proc) == sysmem.MemoryLimit(427_000 * 1024, "board", 427_000 * 1024)
    # a cgroup limit above the board's RAM is no limit either
    (cg / "system.slice" / "memory.max").write_text(str(4096 * MiB))
    assert sysmem.memory_limit(proc=proc).source == "board"


def test_no_cgroup_filesystem_in_view_means_the_board(tmp_path: Path) -> None:
    # what `ip netns exec` gives a process: /proc/self/cgroup names a group, no cgroup mount
    proc = fake_proc(tmp_path, "4:memory:/mesh-tb-0-pi1\n0::/\n",
                     "22 1 0:21 / /sys rw,relatime - sysfs sysfs rw\n")
    assert sysmem.own_cgroup_memory(proc=proc) is None
    assert sysmem.memory_limit(proc=proc).source == "board"


def test_mount_points_resolve_through_the_mounts_root_and_escapes() -> None:
    hybrid = ("35 25 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
              "38 25 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
              "39 25 0:34 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert sysmem.memory_cgroup_dir("4:memory:/a/b\n1:cpu:/\n0::/\n", hybrid) == (
        1, Path("/sys/fs/cgroup/memory/a/b"))
    # a container sees its own group as the mount's root
    inner = "40 1 0:33 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    assert sysmem.memory_cgroup_dir("4:memory:/docker/abc\n", inner) == (1, Path("/sys/fs/cgroup/memory"))
    spaced = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n"
    assert sysmem.memory_cgroup_dir("0::/x\n", spaced) == (2, Path("/mnt/my cg/x"))
    assert sysmem.memory_cgroup_dir("0::/x\n", "") is None


SMAPS = """\
7f0000000000-7f0000200000 r-xp 00000000 fd:00 1234                       /venv/torch/lib/libtorch_cpu.so
Size:               2048 kB
Rss:                 800 kB
Anonymous:             0 kB
Referenced:          120 kB
VmFlags: rd ex mr mw me
7f0000200000-7f0000204000 rw-p 00200000 fd:00 1234                       /venv/torch/lib/libtorch_cpu.so
Rss:                  16 kB
Anonymous:            12 kB
Referenced:           16 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Rss:                1024 kB
Anonymous:          1024 kB
Referenced:            4 kB
55d000000000-55d000400000 rw-p 00000000 00:00 0                          [heap]
Rss:                4096 kB
Anonymous:          4096 kB
Referenced:         4096 kB
7f2000000000-7f2000001000 rw-p 00000000 00:00 0                          [anon:glibc: malloc arena]
Rss:                   4 kB
Anonymous:             4 kB
Referenced:            0 kB
7f3000000000-7f3000800000 r--p 00000000 fd:00 99                         /home/m/my weights.safetensors
Rss:                8192 kB
Anonymous:             0 kB
Referenced:         8192 kB
"""


def test_smaps_sums_per_mapped_object_and_tells_file_pages_from_anonymous() -> None:
    use = sysmem.parse_smaps(SMAPS)
    lib = use["/venv/torch/lib/libtorch_cpu.so"]  # both of its mappings
    assert (lib.rss, lib.anon, lib.referenced) == (816 * 1024, 12 * 1024, 136 * 1024)
    assert lib.file == 804 * 1024  # clean file pages: the kernel may drop them
    assert use["[anon]"] == sysmem.MappingUse(1028 * 1024, 1028 * 1024, 4 * 1024)  # with the named arena
    assert use["[heap]"].anon == 4096 * 1024 and use["[anon]"].file == 0
    assert use["/home/m/my weights.safetensors"].file == 8192 * 1024  # a path with a space
    assert sum(u.rss for u in use.values()) == (816 + 1024 + 4096 + 4 + 8192) * 1024


def test_referenced_pages_are_what_a_process_touched_since_they_were_cleared() -> None:
    """A real process: after clear_referenced, a buffer read again shows as referenced; one left
    alone does not."""
    code = """
import json, mmap, sys
from mesh import sysmem
hot, cold = (mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in "ab")
for m in (hot, cold):
    m.write(b"\\x01" * (8 << 20))
sysmem.clear_referenced()
total = sum(hot[i] for i in range(0, 8 << 20, 4096))
use = sysmem.mappings()
print(json.dumps({"anon_rss": use["[anon]"].rss, "anon_ref": use["[anon]"].referenced, "total": total}))
"""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["total"] == 2048 and got["anon_rss"] >= 16 * MiB
    assert 8 * MiB <= got["anon_ref"] < 12 * MiB  # the hot buffer (and a little heap), not the cold one
