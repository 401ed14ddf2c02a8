"""Testbed tests: real namespaces, tbf, iptables drop and cgroup quotas (root only).

They measure real TCP traffic between namespaces (a socket pair and paho clients through a real
Mosquitto) and a CPU-loop probe, never the mesh's own node processes.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

from nodes.testbed.bed import Testbed, TestbedBusy
from nodes.testbed.calibrate import calibrate, load_calibration, save_calibration
from nodes.testbed.plan import owned
from nodes.testbed.profiles import CpuQuota
from nodes.testbed.shell import REPO_ROOT, scan
from nodes.testbed.spec import (
    NodeSpec,
    TestbedSpec,
    cgroup_path,
    check_node_name,
    netns_name,
)
from nodes.testbed.state import teardown

pytestmark = pytest.mark.testbed

MiB = 1024 * 1024


def node(name: str, *, mbit: float | None = None, loss: float = 0.0, cpu: CpuQuota | None = None) -> NodeSpec:
    return NodeSpec(name=check_node_name(name), link_mbit=mbit, loss_pct=loss, cpu=cpu)


def read_line(proc: subprocess.Popen[Any], timeout_s: float) -> str:
    """One stdout line of ``proc`` within ``timeout_s`` (fails instead of hanging)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            proc.kill()
            pytest.fail(f"{proc.args!r} printed nothing within {timeout_s} s")
    line = proc.stdout.readline()
    assert line, f"{proc.args!r} exited ({proc.wait()}) without output"
    return line


def run_json(proc: subprocess.Popen[Any], timeout_s: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args!r} did not finish within {timeout_s} s")
    assert proc.returncode == 0, f"{proc.args!r} failed with {proc.returncode}"
    return json.loads(out.strip().splitlines()[-1])


# (a) ------------------------------------------------------------------------------------------


def linkprobe(tb: Testbed, name: str, count: int) -> subprocess.Popen[Any]:
    argv = [sys.executable, "-m", "nodes.testbed", "linkprobe", "--broker", tb.broker_url, "--name", name,
            "--count", str(count), "--interval-ms", "20", "--late-ms", "10", "--timeout-ms", "1000"]
    return tb.spawn(name, argv, stdout=subprocess.PIPE, text=True)


def test_lossy_peer_reports_worse_link_than_clean_peer(make_testbed: Callable[..., Testbed], mosquitto_ok: None) -> None:
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("clean", mbit=21), node("lossy", mbit=21, loss=5)), instance=i))
    tb.start_broker("mosquitto")
    probes = {n: linkprobe(tb, n, count=400) for n in ("clean", "lossy")}  # same run, side by side
    stats = {n: run_json(p, timeout_s=60) for n, p in probes.items()}
    clean, lossy = stats["clean"], stats["lossy"]
    print(json.dumps(stats, indent=1))
    for s in (clean, lossy):
        assert s["pings_sent"] == 400 and s["resolved"] == 400
    bad = {n: s["lost"] + s["late"] for n, s in stats.items()}
    # 5 % drop per direction stalls about 1 ping in 15 for >= one ping interval (20 ms) here.
    assert bad["lossy"] >= 10, stats
    assert bad["lossy"] >= 3 * bad["clean"] + 5, stats
    assert lossy["rtt_p99_ms"] > clean["rtt_p99_ms"], stats

    # loss can be changed live, atomically, inside the node's own namespace
    def drop_probabilities() -> list[float]:
        out = subprocess.run(["ip", "netns", "exec", tb.netns("lossy"), "iptables", "-S", "mesh-loss"],
                             capture_output=True, text=True, check=True).stdout.split()
        return [round(float(out[k + 1]), 6) for k, word in enumerate(out) if word == "--probability"]

    assert drop_probabilities() == [0.05]
    tb.set_loss("lossy", 0)
    assert drop_probabilities() == []
    tb.set_loss("lossy", 10)
    assert drop_probabilities() == [0.1]


# (b) ------------------------------------------------------------------------------------------

SINK = r"""
import socket, sys
host, port, n, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(8)
print("listening", flush=True)
for _ in range(conns):
    c, _ = srv.accept()
    mode = c.recv(1)
    if mode == b"U":                      # client uploads n bytes, we ack with one byte
        got = 0
        while got < n:
            d = c.recv(1 << 16)
            if not d:
                break
            got += len(d)
        c.sendall(b"k")
    else:                                 # client downloads n bytes
        c.sendall(bytes(n))
        c.recv(1)
    c.close()
"""

SOURCE = r"""
import json, socket, sys, time
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
c = socket.create_connection((host, port), timeout=30)
t0 = time.monotonic()
c.sendall(mode.encode())
if mode == "U":
    c.sendall(bytes(n))
    assert c.recv(1) == b"k"
else:
    got = 0
    while got < n:
        d = c.recv(1 << 16)
        assert d
        got += len(d)
    c.sendall(b"k")
print(json.dumps({"seconds": time.monotonic() - t0, "bytes": n, "mode": mode}))
"""


def test_large_message_takes_the_time_the_link_rate_implies(make_testbed: Callable[..., Testbed]) -> None:
    rate = 21.0
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("slow", mbit=rate), node("fast")), instance=i))
    size = 4 * MiB
    port = 5001
    sink = tb.spawn("gw", [sys.executable, "-c", SINK, tb.address("gw"), str(port), str(size), "4"],
                    stdout=subprocess.PIPE, text=True)
    assert read_line(sink, 10).strip() == "listening"
    took = {}
    for name in ("slow", "fast"):
        for mode in ("U", "D"):  # uplink (node's eth0 tbf) and downlink (gateway port tbf)
            src = tb.spawn(name, [sys.executable, "-c", SOURCE, tb.address("gw"), str(port), str(size), mode],
                           stdout=subprocess.PIPE, text=True)
            took[name, mode] = run_json(src, timeout_s=30)["seconds"]
    sink.wait(timeout=10)
    implied = size * 8 / (rate * 1e6)  # 1.60 s
    print({f"{k[0]}-{k[1]}": round(v, 3) for k, v in took.items()}, "implied", round(implied, 3))
    for mode in ("U", "D"):
        assert abs(took["slow", mode] - implied) <= 0.25 * implied, (mode, took, implied)
        assert took["fast", mode] < implied / 4, (mode, took)  # an unshaped link is far faster


# (c) ------------------------------------------------------------------------------------------


def _probe(tb: Testbed, name: str, tokens: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "nodes.testbed", "probe", "--model", "loop", "--tokens", str(tokens)]
    return run_json(tb.spawn(name, argv, stdout=subprocess.PIPE, text=True), timeout_s=60)


def test_cpu_quota_slows_a_process_by_the_quota_ratio(make_testbed: Callable[..., Testbed]) -> None:
    quota = CpuQuota(period_us=100_000, quota_us=25_000)  # a quarter of one core
    tb = make_testbed(lambda i: TestbedSpec(nodes=(node("free"), node("slow", cpu=quota)), instance=i))

    # a spawned process really is in the node's namespace and cgroup
    sleeper = tb.spawn("slow", ["sh", "-c", "echo in; exec sleep 30"], stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(sleeper, 10).strip() == "in"  # it runs: the wrapper has entered the namespace
        ns_inode = os.stat(f"/run/netns/{tb.netns('slow')}").st_ino
        assert os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == ns_inode
        cg = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f"/{tb.cgroup('slow')}\n" in cg, cg
        assert str(sleeper.pid) in Path(cgroup_path(tb.cgroup("slow")), "cgroup.procs").read_text().split()
    finally:
        sleeper.kill()
        sleeper.wait()

    free = min((_probe(tb, "free", 30) for _ in range(3)), key=lambda r: r["seconds"])
    slow = _probe(tb, "slow", 30)
    expected = 1 / quota.share
    # The quota is CPU time per wall time, so wall/cpu of the quota'd run is the clean measure. The
    # comparison with the unquoted run is looser: when other jobs share the two cores, the free
    # run's wall time grows and both runs' CPU time varies by up to ~40 %.
    own = slow["seconds"] / slow["cpu_seconds"]
    vs_free = slow["seconds"] / free["seconds"]
    print(f"free {free}, quota'd {slow}, wall/cpu {own:.2f}, vs free {vs_free:.2f} (quota ratio {expected:.1f})")
    assert 0.8 * expected <= own <= 1.3 * expected, (free, slow)
    if free["seconds"] <= 1.5 * free["cpu_seconds"]:
        # Really slower than unquoted; the upper bound is per unit of CPU work, since the same loop
        # took 0.14 s of CPU free and 0.25 s quota'd in one CI run (cold caches after throttling)
        work = slow["cpu_seconds"] / free["cpu_seconds"]
        assert 0.45 * expected <= vs_free, (free, slow)
        assert vs_free / max(work, 1.0) <= 1.75 * expected, (free, slow)
    else:  # even the best unquoted run got under 2/3 of a core: no fair baseline right now
        warnings.warn(f"machine busy, unquoted baseline starved ({free}); compared wall/cpu only")


def test_calibrate_finds_the_quota_for_a_target_time(testbed_ok: None, tmp_path: Path) -> None:
    """The calibration search against a CPU loop (cheap stand-in for the model prefill)."""
    # 1 s = 20 periods (phase noise ~5 %) at a quota of ~8 ms, above the kernel's 5 ms bandwidth
    # slice, under which throttling gets erratic.
    target = 1.0
    cal = calibrate(profile="pi-zero-2w", model="loop", tokens=30, target_s=target, period_us=50_000,
                    repeats=3, max_trials=8, date="2026-01-01T00:00:00+00:00", log=lambda s: print(s))
    print(json.dumps(cal.to_dict(), indent=1))
    assert abs(cal.measured_s - target) <= 0.10 * target
    assert cal.native_cpu_s is not None and cal.native_cpu_s < target / 2 and cal.slowdown > 2
    assert 1_000 <= cal.quota_us < 50_000 and 1 <= len(cal.trials) <= 8
    assert not any(g.startswith("mesh-tb-cal-") for g in scan().cgroups)  # its cgroup is gone
    save_calibration(tmp_path, cal)
    assert load_calibration(tmp_path, "pi-zero-2w") == cal


# (d) ------------------------------------------------------------------------------------------

BRING_UP = r"""
import json, sys, time
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import make_spec
from nodes.testbed.bed import Testbed
instance = int(sys.argv[1])
spec = make_spec(2, device_profile("pi-zero-2w"), loss={"pi2": 5}, instance=instance)
tb = Testbed(spec).up()
tb.start_broker("mosquitto")
a = tb.spawn("pi1", ["sleep", "300"])
b = tb.spawn("pi2", [sys.executable, "-c", "import time\nwhile True: time.sleep(0.5)"])
print(json.dumps({"pids": [a.pid, b.pid, tb._broker["pid"]]}), flush=True)
time.sleep(300)
"""


def _root_iptables() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_down_removes_everything_after_the_owner_was_killed(free_instance: int, mosquitto_ok: None) -> None:
    i = free_instance
    before = _root_iptables()
    owner = subprocess.Popen([sys.executable, "-c", BRING_UP, str(i)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        pids = json.loads(read_line(owner, 30))["pids"]
        mine = owned(scan(), i)
        assert set(mine.netns) == {netns_name(i, n) for n in ("gw", "pi1", "pi2")}
        assert mine.links == (f"mt-{i}-host",)
        assert set(mine.cgroups) == {f"mesh-tb-{i}-{n}" for n in ("gw", "pi1", "pi2")}
        assert all(_alive(p) for p in pids)
        with pytest.raises(TestbedBusy):  # a live owner's instance is never taken over
            Testbed(TestbedSpec(nodes=(node("x"),), instance=i)).up()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    assert all(_alive(p) for p in pids)  # orphans keep running until down finds them

    t0 = time.monotonic()
    report = teardown(i)
    took = time.monotonic() - t0
    assert set(pids) <= set(report["killed"])
    assert not any(_alive(p) for p in pids)
    left = owned(scan(), i)
    assert (left.netns, left.links, left.cgroups) == ((), (), ())
    assert not any(n.startswith(f"mt-{i}-") for n in os.listdir("/run/netns")) if os.path.isdir("/run/netns") else True
    assert _root_iptables() == before  # the root namespace's rules were never touched
    again = teardown(i)  # idempotent
    assert again["killed"] == [] and again["removed"] == {"netns": [], "links": [], "cgroups": []}
    print(f"teardown after SIGKILL: {took:.2f} s, killed {report['killed']}")
