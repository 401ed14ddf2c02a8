"""`mesh setup` peak memory, measured with a cgroup v1 memory group (root only).

For each (model, profile) the script runs `mesh setup --profile P --models M --home <fresh home>`
as the only process of a one-node testbed (``nodes.testbed.Testbed``: its own memory cgroup,
``--cap`` MiB with swap off, or uncapped), after dropping the GGUF's page cache, so the run pays
its own reads. The fresh home gets the data wheels (MMLU, wiki) copied in beforehand and evicted
from the page cache: no network, and the run still reads them itself. Recorded: the cgroup's
``max_usage_in_bytes`` (peak), ``memory.stat`` at the end (rss, mapped_file, cache), OOM kills
and failcnt, and a sampler thread's view every 0.1 s: the group's usage, and at its highest
sample ``memory.stat`` (rss, mapped_file, cache, dirty) and each process's VmRSS/RssAnon/RssFile.

``--phases`` then runs the steps of a conversion one process at a time in another fresh home,
resetting the peak between them, to say where the peak comes from: config+tokenizer
(``prepare_model_dir``), tokenizer tables (``ensure_tables``), weights (``convert_weights``),
data (MMLU, wiki), and the rest of a warm `mesh setup` (HALO predictor, if any).

    .venv/bin/python results/2026-12-07/setup_peak.py --cap 400 --json results/2026-12-07/setup-peak.json

Library pages already in the page cache (torch's .so files, read by other processes on this
machine) are charged to whoever read them first, not to this group: on a Pi that boots only the
node they would count. The figures here are the setup's own anonymous memory and file reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mesh.model import model_spec  # noqa: E402
from nodes.setup import _package_dir  # noqa: E402
from nodes.testbed.bed import Testbed, drop_page_cache  # noqa: E402
from nodes.testbed.shell import pids_in  # noqa: E402
from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name, memory_cgroup_path  # noqa: E402
from nodes.testbed.state import DEFAULT_RUN_DIR, in_use  # noqa: E402

MiB = 1 << 20
NODE = "setup"
INSTANCES = range(80, 90)
RUNS = [("smollm2-135m", "pi-zero-2w"), ("smollm2-135m", "pi4-2gb"), ("gemma3-270m", "pi-zero-2w"),
        ("gemma3-270m", "pi4-2gb")]
FORMAT = {"pi-zero-2w": "q4", "pi4-2gb": "int8"}
WHEELS = Path.home() / ".cache" / "mesh" / "wheels"  # read only: copied into each fresh home

PHASE = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from nodes.cli import _quiet_libraries
_quiet_libraries(hf=True)
from mesh.model import converted_dir, model_spec
from nodes import setup
home, key, fmt, phase = Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
spec = model_spec(key, home)
if phase == "config+tokenizer":
    setup.prepare_model_dir(spec, home)
elif phase == "tables":
    from mesh.text import ensure_tables
    ensure_tables(converted_dir(home, key))
elif phase == "weights":
    setup.convert_weights(spec, home, fmt)
elif phase == "data":
    from nodes.halo_data import fetch_wiki
    (home / "data").mkdir(exist_ok=True)
    setup.fetch_mmlu(home); fetch_wiki(home)
"""


def free_instance() -> int:
    for i in INSTANCES:
        if in_use(DEFAULT_RUN_DIR, i) is None:
            return i
    raise SystemExit(f"every instance in {INSTANCES} is busy")


def fresh_home(parent: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="setup-peak-", dir=parent))
    shutil.copytree(WHEELS, home / "wheels")
    drop_page_cache(home)
    return home


def drop_gguf(key: str) -> None:
    drop_page_cache(_package_dir(model_spec(key, Path("/nonexistent")).module))


def setup_argv(key: str, profile: str, home: Path) -> list[str]:
    return [sys.executable, "-m", "nodes.cli", "setup", "--profile", profile, "--models", key, "--home", str(home)]


def cgroup_stat(group: Path) -> dict[str, int]:
    out = {}
    for line in (group / "memory.stat").read_text().splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[k] = int(v.split()[0]) * 1024
    return fields


class Sampler(threading.Thread):
    """Every ``period_s``: the group's usage and each of its processes' RSS split. Keeps the
    sample at the group's highest usage, and each process's highest RssAnon with its command."""

    def __init__(self, tb: Testbed, period_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.tb, self.period_s = tb, period_s
        self.stop = threading.Event()
        self.top: dict[str, Any] = {"usage_bytes": 0}
        self.procs: dict[int, dict[str, Any]] = {}
        self.series: list[tuple[float, int]] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        group = Path(memory_cgroup_path(self.tb.cgroup(NODE)))
        while not self.stop.wait(self.period_s):
            try:
                usage = int((group / "memory.usage_in_bytes").read_text())
            except OSError:
                return
            t = round(time.monotonic() - self.t0, 2)
            self.series.append((t, usage))
            now = {}
            for pid in pids_in(self.tb.cgroup(NODE)):
                try:
                    st = _status(pid)
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                except OSError:
                    continue
                now[pid] = st
                best = self.procs.setdefault(pid, {"cmd": cmd, "rss_anon_bytes": 0})
                if st.get("RssAnon", 0) > best["rss_anon_bytes"]:
                    best.update(rss_anon_bytes=st["RssAnon"], vm_rss_bytes=st["VmRSS"], at_s=t, cmd=cmd)
            if usage > self.top["usage_bytes"]:
                try:
                    stat = cgroup_stat(group)
                except OSError:
                    stat = {}
                self.top = {"usage_bytes": usage, "at_s": t, "processes": now,
                            "stat": {k: stat.get(k, 0) for k in ("rss", "mapped_file", "cache", "dirty", "writeback")}}


def mib(x: int | None) -> float | None:
    return None if x is None else round(x / MiB, 1)


def measure(tb: Testbed, argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``argv`` in the node's group from a fresh peak; the group's figures at the end."""
    group = Path(memory_cgroup_path(tb.cgroup(NODE)))
    (group / "memory.max_usage_in_bytes").write_text("0")
    (group / "memory.failcnt").write_text("0")
    oom_before = tb.oom_kills(NODE)
    sampler = Sampler(tb)
    sampler.start()
    t0 = time.monotonic()
    proc = tb.spawn(NODE, argv, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    wall = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    mem = tb.memory(NODE)
    stat = cgroup_stat(group)
    top = sampler.top
    return {
        "exit": proc.returncode, "wall_s": round(wall, 1),
        "peak_mib": mib(mem.peak_bytes), "limit_mib": mib(mem.limit_bytes),
        "oom_kills": tb.oom_kills(NODE) - oom_before, "failcnt": int((group / "memory.failcnt").read_text()),
        "end": {"rss_mib": mib(stat["rss"]), "mapped_file_mib": mib(stat["mapped_file"]),
                "cache_mib": mib(stat["cache"]), "usage_mib": mib(mem.usage_bytes)},
        "at_peak_sample": {"usage_mib": mib(top["usage_bytes"]), "at_s": top.get("at_s"),
                           **{f"{k}_mib": mib(v) for k, v in top.get("stat", {}).items()},
                           "processes": [{"pid": p, **{k: mib(v) for k, v in st.items()}}
                                         for p, st in top.get("processes", {}).items()]},
        "processes": [{"pid": p, "cmd": v["cmd"], "rss_anon_peak_mib": mib(v["rss_anon_bytes"]),
                       "vm_rss_then_mib": mib(v.get("vm_rss_bytes")), "at_s": v.get("at_s")}
                      for p, v in sampler.procs.items()],
        "usage_series_mib": [(t, mib(u)) for t, u in sampler.series[:: max(1, len(sampler.series) // 120)]],
        "tail": out[-1500:] if proc.returncode else out[-300:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=None, help="memory cap in MiB (default: none)")
    ap.add_argument("--runs", default=None, help="model:profile,... (default: both models x both Pi profiles)")
    ap.add_argument("--phases", action="store_true", help="also run the setup's steps one process each")
    ap.add_argument("--json", required=True)
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args()
    runs = [tuple(r.split(":")) for r in args.runs.split(",")] if args.runs else RUNS
    work = Path(tempfile.mkdtemp(prefix="setup-peak-"))
    spec = TestbedSpec(nodes=(NodeSpec(name=check_node_name(NODE), link_mbit=None, loss_pct=0.0, cpu=None,
                                       mem_cap_mib=args.cap),), instance=free_instance())
    rows = []
    try:
        with Testbed(spec) as tb:
            for key, profile in runs:
                row: dict[str, Any] = {"model": key, "profile": profile, "weights": FORMAT[profile],
                                       "cap_mib": args.cap}
                home = fresh_home(work)
                drop_gguf(key)
                row["setup"] = measure(tb, setup_argv(key, profile, home), args.timeout)
                print(json.dumps({k: row[k] for k in ("model", "profile")}
                                 | {k: row["setup"][k] for k in ("exit", "wall_s", "peak_mib", "oom_kills", "end")}),
                      flush=True)
                shutil.rmtree(home, ignore_errors=True)
                if args.phases:
                    home = fresh_home(work)
                    drop_gguf(key)
                    row["phases"] = {}
                    for phase in ("config+tokenizer", "tables", "weights", "data"):
                        got = measure(tb, [sys.executable, "-c", PHASE, str(REPO), str(home), key,
                                           FORMAT[profile], phase], args.timeout)
                        row["phases"][phase] = {k: got[k] for k in ("exit", "wall_s", "peak_mib", "oom_kills",
                                                                    "end", "processes", "tail")}
                        print(f"  {phase}: exit {got['exit']}, peak {got['peak_mib']} MiB", flush=True)
                    got = measure(tb, setup_argv(key, profile, home), args.timeout)  # warm: only what is left (HALO predictor)
                    row["phases"]["rest (warm setup)"] = {k: got[k] for k in ("exit", "wall_s", "peak_mib",
                                                                              "oom_kills", "end", "processes", "tail")}
                    print(f"  rest: exit {got['exit']}, peak {got['peak_mib']} MiB", flush=True)
                    shutil.rmtree(home, ignore_errors=True)
                rows.append(row)
                Path(args.json).write_text(json.dumps({"cap_mib": args.cap, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
