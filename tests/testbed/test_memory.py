"""Memory in the testbed (root only): every node in a real cgroup v1 memory group of its device's
size with swap off. A process over its cap is OOM-killed and counted; a node reads its own limit;
anonymous and mapped memory and major faults are told apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from nodes.testbed.bed import Testbed
from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name, memory_cgroup_path
from nodes.testbed.state import status

pytestmark = pytest.mark.testbed

MiB = 1 << 20

# Allocates 16 MiB at a time (bytes * n writes every page) and says how far it got.
HOG = """
import sys
chunks = []
for _ in range(int(sys.argv[1])):
    chunks.append(b"\\x01" * (16 << 20))
    print(16 * len(chunks), flush=True)
"""

# Writes a file, drops it from the page cache, then maps and reads all of it (major faults),
# holds an anonymous buffer beside it, and waits to be measured.
MAPPER = """
import mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2]) << 20
with open(path, "wb") as f:
    f.write(os.urandom(size))
    f.flush()
    os.fsync(f.fileno())
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)  # no readahead: every page read back is its own major fault
touched = sum(m[i] for i in range(0, size, 4096))
anon = b"\\x02" * (16 << 20)
print("ready", flush=True)
sys.stdin.readline()
"""

# What a node process learns about its memory (mesh.sysmem), as JSON.
SEES = """
import json
from mesh import sysmem
print(json.dumps({"limit": sysmem.memory_limit().__dict__, "hb": dict(sysmem.heartbeat_fields())}))
"""


def node(name: str, mem_cap_mib: int | None) -> NodeSpec:
    return NodeSpec(name=check_node_name(name), link_mbit=None, loss_pct=0.0, cpu=None, mem_cap_mib=mem_cap_mib)


def finish(proc: subprocess.Popen[Any], timeout_s: float = 60) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args!r} did not finish within {timeout_s} s")
    return proc.returncode, out


def test_a_process_over_its_cap_is_oom_killed_and_the_kill_is_counted(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed]) -> None:
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("small", 64), node("roomy", 256)), instance=i))
    for name in ("small", "roomy"):  # the cap is real: memory and memory+swap both set, swap none
        group = Path(memory_cgroup_path(tb.cgroup(name)))
        cap = tb.spec.node(name).mem_cap_mib * MiB
        assert int((group / "memory.limit_in_bytes").read_text()) == cap
        assert int((group / "memory.memsw.limit_in_bytes").read_text()) == cap
        assert tb.memory(name).limit_bytes == cap and tb.memory(name).swap_bytes == 0
        assert tb.oom_kills(name) == 0

    # 12 x 16 = 192 MiB: past the small cap, well within the roomy one
    small = tb.spawn("small", [sys.executable, "-c", HOG, "12"], stdout=subprocess.PIPE, text=True)
    roomy = tb.spawn("roomy", [sys.executable, "-c", HOG, "12"], stdout=subprocess.PIPE, text=True)
    rc_small, out_small = finish(small)
    rc_roomy, out_roomy = finish(roomy)
    reached = [int(x) for x in out_small.split()]
    print(f"small: rc {rc_small}, reached {reached[-1:]} MiB, {tb.memory('small')}")
    print(f"roomy: rc {rc_roomy}, {tb.memory('roomy')}")

    assert rc_small == -9  # SIGKILL from the kernel's OOM killer
    assert reached and reached[-1] < 64  # it never held more than its cap
    assert tb.oom_kills("small") == 1
    peak = tb.memory("small").peak_bytes
    assert peak is not None and 32 * MiB <= peak <= 64 * MiB

    assert rc_roomy == 0 and out_roomy.split()[-1] == "192"
    assert tb.oom_kills("roomy") == 0
    peak = tb.memory("roomy").peak_bytes
    assert peak is not None and 192 * MiB <= peak <= 256 * MiB

    # status (what `mesh testbed status` prints) carries the same figures
    inst = next(i for i in status()["instances"] if i.get("instance") == tb.spec.instance)
    assert inst["memory"]["small"]["oom_kills"] == 1 and inst["memory"]["small"]["limit_mib"] == 64.0
    assert inst["memory"]["roomy"]["peak_mib"] >= 192


def test_a_node_reads_its_own_limit_from_its_cgroup(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed]) -> None:
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("capped", 300), node("free", None)), instance=i))
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    seen = {}
    for name in ("capped", "free"):
        rc, out = finish(tb.spawn(name, [sys.executable, "-c", SEES], env=env, stdout=subprocess.PIPE, text=True))
        assert rc == 0, out
        seen[name] = json.loads(out)
    print(seen)
    assert seen["capped"]["limit"]["bytes"] == 300 * MiB and seen["capped"]["limit"]["source"] == "cgroup v1"
    assert seen["capped"]["hb"]["mem_limit_mib"] == 300.0 and seen["capped"]["hb"]["mem_limit_from"] == "cgroup v1"
    assert 5 < seen["capped"]["hb"]["rss_mib"] <= seen["capped"]["hb"]["rss_peak_mib"] < 300
    # no cap: the board's RAM, as on a Pi whose service has no memory limit
    assert seen["free"]["limit"]["source"] == "board"
    assert seen["free"]["limit"]["bytes"] == seen["free"]["limit"]["board_bytes"] > 300 * MiB


def test_mapped_file_pages_anonymous_memory_and_major_faults_are_told_apart(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed], tmp_path: Path) -> None:
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("pi1", 256),), instance=i))
    before = tb.memory("pi1")
    proc = tb.spawn("pi1", [sys.executable, "-c", MAPPER, str(tmp_path / "weights.bin"), "32"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        during = tb.memory("pi1")
        per_process = tb.process_memory("pi1")
    finally:
        proc.communicate("\n", timeout=30)
    print(f"before {before}\nduring {during}")
    assert line.strip() == "ready"
    assert during.mapped_bytes >= 32 * MiB  # the mapped file, charged to the node
    assert during.file_bytes >= during.mapped_bytes
    # the anonymous buffer and the interpreter's heap, without the 32 MiB of file pages
    assert 16 * MiB <= during.anon_bytes < 40 * MiB
    # the process's own view: its RSS holds the mapped file too, its anonymous part the buffer
    assert list(per_process) == [proc.pid]
    mine = per_process[proc.pid]
    assert mine.file_bytes >= 32 * MiB and mine.anon_bytes >= 16 * MiB
    assert mine.major_faults >= (32 * MiB // 4096) // 2 and mine.peak_bytes >= mine.rss_bytes
    # reading the file back from disk after it left the page cache: major faults, counted
    assert during.major_faults - before.major_faults >= (32 * MiB // 4096) // 2
    assert proc.returncode == 0


# Maps a file, reads every page, and waits to be measured.
READER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
touched = sum(m[i] for i in range(0, len(m), 4096))
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_private_copy_charges_the_weights_page_cache_to_the_node(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed], tmp_path: Path) -> None:
    """A file already in the page cache is charged to whoever read it first: a node mapping the
    shared file is charged nothing for it; its own copy (Testbed.private_home) is charged to it."""
    home = tmp_path / "home"
    (home / "models" / "m").mkdir(parents=True)
    weights = home / "models" / "m" / "w.bin"
    weights.write_bytes(os.urandom(32 * MiB))
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("shared", 256), node("own", 256)), instance=i))
    own_home = tb.private_home("own", home, ["models/m"])  # copied, then evicted: the node reads it first
    assert len(weights.read_bytes()) == 32 * MiB  # cached now, charged to this test's cgroup
    assert (own_home / "models" / "m" / "w.bin").stat().st_size == 32 * MiB  # (reading it here would charge us)
    mapped = {}
    for name, path in (("shared", weights), ("own", own_home / "models" / "m" / "w.bin")):
        proc = tb.spawn(name, [sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            mapped[name] = tb.memory(name)
        finally:
            proc.communicate("\n", timeout=30)
        assert line.strip() == "ready"
    print(mapped)
    assert mapped["shared"].mapped_bytes < 4 * MiB  # 32 MiB mapped, charged elsewhere
    assert mapped["own"].mapped_bytes >= 32 * MiB
    tb.down()
    assert not own_home.exists()  # the copy goes with the testbed


def test_a_private_copy_leaves_the_node_charged_for_nothing_it_did_not_read(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed], tmp_path: Path) -> None:
    """The copy is made in the node's cgroups, so the pages of the source it reads are charged to
    the node as well when nothing else had them cached: both are evicted after it, and the node's
    peak starts near zero (a Gemma-3 coordinator's bench row read 1.5 GiB, a 1 GiB fp32 file it
    never opened, when the shared model directory was not in the page cache)."""
    from nodes.testbed.bed import drop_page_cache

    home = tmp_path / "home"
    (home / "models" / "m").mkdir(parents=True)
    (home / "models" / "m" / "w.bin").write_bytes(os.urandom(48 * MiB))
    drop_page_cache(home)  # nobody has the source cached: whoever reads it first is charged
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("own", 256),), instance=i))
    tb.private_home("own", home, ["models/m"])
    mem = tb.memory("own")
    print(mem)
    assert mem.file_bytes < 8 * MiB and (mem.peak_bytes or 0) < 8 * MiB


def test_a_node_that_cannot_fit_says_so_at_start_not_by_an_oom_kill(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed]) -> None:
    """mesh.footprint in a real 400 MiB cgroup (the Pi Zero 2W's cap): fp32 Gemma-3 and a 350 MiB
    prompt cache cannot fit; the node says which flag to change and exits 2, before it loads
    anything and before it connects (the broker address here leads nowhere)."""
    from tests.conftest import CACHE_ROOT, ENV, mesh_argv, require_model

    require_model("gemma3-270m")
    require_model("smollm2-135m")
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("zero", 400),), instance=i))
    cases = {("gemma3-270m", "fp32", ()): "--weights int8",
             ("smollm2-135m", "int8", ("--cache-mb", "350")): "--cache-mb, now 350"}
    for (model, weights, extra), fix in cases.items():
        argv = mesh_argv("node", "--name", "zero", "--broker", "127.0.0.1:9", "--model", model, "--weights", weights,
                         "--home", str(CACHE_ROOT), *extra)
        rc, out = finish(tb.spawn("zero", argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                         120)
        print(out[-600:])
        assert rc == 2 and fix in out and "MiB more than the 400 MiB (cgroup v1)" in out, out[-2000:]
        assert "Traceback" not in out
    assert tb.oom_kills("zero") == 0
    peak = tb.memory("zero").peak_bytes
    assert peak is not None and peak < 400 * MiB


@pytest.mark.parametrize("profile,weights,cap", [("pi4-2gb", "int8", 1536), ("pi-zero-2w", "q4", 400)])
def test_bench_memory_measures_a_node_under_its_devices_cap(profile: str, weights: str, cap: int, free_instance: int,
                                                            tmp_path: Path, mosquitto_ok: None) -> None:
    """`mesh bench memory` end to end, small: SmolLM2 under a device's cap beside an uncapped fp32
    reference; every figure a row promises is there and measured. Under the Pi Zero 2W's 400 MiB
    the q4 node starts, answers and is never OOM-killed (mesh.lm: no transformers in the node)."""
    from tests.conftest import ENV, mesh_argv, require_model

    require_model("smollm2-135m")
    out = tmp_path / "m.json"
    proc = subprocess.run(mesh_argv("bench", "memory", "--profile", profile, "--models", "smollm2-135m",
                                    "--weights", weights, "--roles", "cache", "--asks", "2", "--tokens", "8",
                                    "--mmlu", "12",
                                    "--ppl-windows", "2", "--instance", str(free_instance),
                                    "--json", str(out), "--plot", str(tmp_path / "m.png")),
                          env=ENV, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and (tmp_path / "m.png").stat().st_size > 0
    r = rows[0]
    assert (r["model"], r["weights"], r["role"], r["cap_mib"]) == ("smollm2-135m", weights, "cache", cap)
    assert r["started"] and r["oom_kills"] == 0 and proc.returncode == 0, r
    assert 100 < r["peak_mib"] <= cap and 0 < r["anon_peak_mib"] <= r["peak_mib"]
    assert r["decode_tps"] > 0 and r["decode_tps_fp32"] > 0 and r["prefill_tps"] > 0 and r["prefill_tps_fp32"] > 0
    assert r["major_faults_per_token"] >= 0 and r["mmlu_questions"] == 12
    assert 0.5 <= r["mmlu_agreement"] <= 1.0 and 0.9 < r["ppl_ratio"] < 1.1
    from nodes.bench.llama_ref import available

    if available():  # the optional extra `reference`: llama.cpp on the same GGUF, asked beside the nodes
        assert r["llama_cpp_decode_tps"] > 0 and r["llama_cpp_prefill_tps"] > 0 and r["llama_cpp_rss_peak_mib"] > 50
    else:
        assert "llama_cpp_decode_tps" not in r
