"""Calibrating a device profile's CPU quota by measurement, and the calibration file
(``<mesh home>/testbed/calibration.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from mesh.errors import MeshError
from nodes.testbed.profiles import (
    Calibration,
    DeviceProfile,
    Trial,
    calibrated_from,
    calibrations_from_json,
    calibrations_to_json,
    closest_trial,
    device_profile,
    next_quota,
)
from nodes.testbed.shell import REPO_ROOT, remove_dir
from nodes.testbed.spec import calibration_cgroup, cgroup_path


class _ProbeProcess:
    """A ``probe --serve`` child: JSON lines in, JSON lines out, every read with a deadline."""

    def __init__(self, argv: Sequence[str], cwd: Path | None) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd, bufsize=1
        )
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="probe-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def receive(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise MeshError(f"probe gave no answer within {timeout_s:.0f} s") from None
        if line is None:
            raise MeshError(f"probe exited ({self.proc.wait()}) before answering")
        return json.loads(line)

    def run(self, timeout_s: float) -> tuple[float, float]:
        """One timed run: (wall seconds, CPU seconds)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        doc = self.receive(timeout_s)
        return float(doc["seconds"]), float(doc["cpu_seconds"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def machine_info() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def calibrate(
    *,
    profile: str = "pi-zero-2w",
    model: str = "gemma3-270m",
    tokens: int = 65,
    target_s: float = 12.6,
    period_us: int = 1_000_000,
    repeats: int = 3,
    max_trials: int = 8,
    tolerance: float = 0.05,
    accept: float = 0.10,
    model_dir: Path | None = None,
    python: str = sys.executable,
    cwd: Path | None = REPO_ROOT,
    date: str,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Calibration:
    """Find by measurement the quota (per ``period_us``) at which the probe takes ``target_s``.

    The probe loads and warms up unthrottled, then joins a calibration cgroup; the quota changes
    between trials, each trial is ``repeats`` runs (median). Raises :class:`MeshError` if no trial
    lands within ``accept`` of the target.
    """
    argv = [python, "-m", "nodes.testbed", "probe", "--model", model, "--tokens", str(tokens), "--serve"]
    if model_dir is not None:
        argv += ["--model-dir", str(model_dir)]
    probe = _ProbeProcess(argv, cwd)
    group = cgroup_path(calibration_cgroup(probe.proc.pid))
    try:
        ready = probe.receive(timeout_s=600)
        native = [probe.run(timeout_s=600) for _ in range(repeats)]
        native_s = Trial(0, tuple(w for w, _ in native)).median
        native_cpu_s = Trial(0, tuple(c for _, c in native)).median
        log(f"calibrate: unthrottled {native_s:.3f} s wall, {native_cpu_s:.3f} s CPU")
        os.mkdir(group)
        Path(group, "cpu.cfs_period_us").write_text(str(period_us))
        Path(group, "cgroup.procs").write_text(str(probe.proc.pid))
        trials: list[Trial] = []
        run_timeout = max(60.0, 8 * target_s)
        for _ in range(max_trials):
            # CPU time, not wall time, predicts the quota'd time (other jobs may share the cores)
            q = next_quota(trials, target_s=target_s, period_us=period_us, native_s=native_cpu_s, tolerance=tolerance)
            if q is None:
                break
            Path(group, "cpu.cfs_quota_us").write_text(str(q))
            samples = tuple(probe.run(timeout_s=run_timeout)[0] for _ in range(repeats))
            trials.append(Trial(q, samples))
            log(f"calibrate: quota {q} us / {period_us} us -> {trials[-1].median:.3f} s {list(samples)}")
        best = closest_trial(trials, target_s)
        if abs(best.median - target_s) > accept * target_s:
            raise MeshError(f"calibration did not converge: best {best.quota_us} us gave {best.median:.2f} s")
    finally:
        with contextlib.suppress(OSError):  # let the probe exit at full speed
            Path(group, "cpu.cfs_quota_us").write_text("-1")
        probe.close()
        remove_dir(group)
    return Calibration(
        profile=profile,
        model=model,
        tokens=tokens,
        threads=1,
        period_us=period_us,
        quota_us=best.quota_us,
        target_s=target_s,
        measured_s=round(best.median, 4),
        samples=best.samples,
        native_s=round(native_s, 4),
        native_cpu_s=round(native_cpu_s, 4),
        date=date,
        machine=machine_info() | {k: ready[k] for k in ("torch",) if k in ready},
        trials=tuple(trials),
    )


def calibration_dir(home: Path) -> Path:
    """Where calibrations are kept: beside the models, under the mesh home (``MESH_HOME``)."""
    return home / "testbed"


def load_calibration(cache_dir: Path, profile: str) -> Calibration | None:
    path = cache_dir / "calibration.json"
    try:
        return calibrations_from_json(path.read_text()).get(profile)
    except FileNotFoundError:
        return None


def load_profile(cache_dir: Path, profile: str) -> tuple[DeviceProfile, Calibration | None]:
    """The named device profile with the calibration it derives its CPU quota from (``pi-zero-2w``
    for itself and for ``pi4-2gb``), read from ``cache_dir``; the calibration is None where the
    profile needs none or none was measured yet (then the profile says ``calibrated=False``)."""
    base = calibrated_from(profile)
    cal = load_calibration(cache_dir, base) if base is not None else None
    return device_profile(profile, cal), cal


def save_calibration(cache_dir: Path, cal: Calibration) -> Path:
    path = cache_dir / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = calibrations_from_json(path.read_text()) if path.exists() else {}
    entries[cal.profile] = cal
    tmp = path.with_suffix(".tmp")
    tmp.write_text(calibrations_to_json(entries))
    os.replace(tmp, path)
    return path
