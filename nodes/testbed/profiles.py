"""Device profiles (link rate, CPU quota and memory cap of an emulated Pi) and the arithmetic of calibrating
a profile's quota by measurement (the search, the calibration file format).

Pure: nothing here runs a command, reads a clock or touches a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from mesh.errors import ConfigError

CALIBRATION_VERSION = 1


# --------------------------------------------------------------------------- device profiles


@dataclass(frozen=True)
class CpuQuota:
    """A cgroup v1 CFS quota: ``quota_us`` of CPU time per ``period_us`` of wall time."""

    period_us: int
    quota_us: int

    def __post_init__(self) -> None:
        if not 1_000 <= self.period_us <= 1_000_000:
            raise ConfigError(f"cpu period must be 1 ms..1 s, got {self.period_us} us")
        if self.quota_us < 1_000:
            raise ConfigError(f"cpu quota must be >= 1 ms (kernel minimum), got {self.quota_us} us")

    @property
    def share(self) -> float:
        """Fraction of one core."""
        return self.quota_us / self.period_us


PROFILE_NAMES = ("native", "pi5", "pi4-2gb", "pi-zero-2w")
PI5_LINK_MBIT = 27.0
PI4_LINK_MBIT = 27.0  # the Pi 4's Wi-Fi is the same 802.11ac radio as the Pi 5's
PI_ZERO_LINK_MBIT = 21.0
# Used only until `mesh testbed calibrate` has run: a first guess from DESIGN.md's Pi Zero
# measurement; the calibration replaces it.
UNCALIBRATED_PI_ZERO_QUOTA = CpuQuota(period_us=1_000_000, quota_us=24_000)

# Memory each emulated node may use (a cgroup v1 limit, swap off) and the board's RAM, in MiB.
# The node gets what the board's OS leaves free, not the whole board: a Pi Zero 2W's Linux sees
# ~426 MB and leaves ~340 MiB after the OS (design to that; 400 MiB is the hard cap); a 4 GB Pi 5
# gives a node 3 GiB, a 2 GB Pi 4 1.5 GiB.
PI_ZERO_RAM_MIB, PI_ZERO_MEM_CAP_MIB = 512, 400
PI4_2GB_RAM_MIB, PI4_2GB_MEM_CAP_MIB = 2048, 1536
PI5_RAM_MIB, PI5_MEM_CAP_MIB = 4096, 3072

# A Pi 4 core (Cortex-A72, 1.5 GHz) against a Pi Zero 2W core (Cortex-A53, 1.0 GHz), single
# thread. Source: sysbench 1.0.20 `cpu --threads=1` (primes to 10,000), "Raspberry Pi CPU
# Benchmarks", https://leoncode.co.uk/articles/raspberry-pi-benchmarks: Pi 4 1477.83 events/s,
# Pi 3B+ (the same A53 core at 1.4 GHz) 687.45 events/s. Scaling the A53 to the Zero's 1.0 GHz
# (a CPU-bound loop scales with the clock) gives 1477.83 / (687.45 / 1.4) = 3.01. An integer
# benchmark: the A72's wider NEON pipes likely make it faster than this on matmuls, and its
# LPDDR4 feeds decode faster, so pi4-2gb errs on the slow side.
SYSBENCH_PI4_A72_1500 = 1477.83
SYSBENCH_PI3BPLUS_A53_1400 = 687.45
PI4_VS_PI_ZERO_CPU = SYSBENCH_PI4_A72_1500 / (SYSBENCH_PI3BPLUS_A53_1400 * 1.0 / 1.4)
# Profiles whose CPU quota derives from a calibrated one: profile -> (calibrated profile, speed)
DERIVED_QUOTA = {"pi4-2gb": ("pi-zero-2w", PI4_VS_PI_ZERO_CPU)}


@dataclass(frozen=True)
class DeviceProfile:
    """What one emulated device is allowed: link rate (None = unshaped), CPU (None = free) and
    memory: ``mem_cap_mib`` for the node's cgroup (None = uncapped), ``ram_mib`` the board's RAM
    (recorded with results; None = this machine)."""

    name: str
    link_mbit: float | None
    cpu: CpuQuota | None
    calibrated: bool
    mem_cap_mib: int | None = None
    ram_mib: int | None = None


def scaled_quota(quota: CpuQuota, speed: float) -> CpuQuota:
    """The quota of a device ``speed`` times as fast per core as the one ``quota`` emulates."""
    return CpuQuota(quota.period_us, min(quota.period_us, round(quota.quota_us * speed / 100) * 100))


def device_profile(name: str, calibration: "Calibration | None" = None) -> DeviceProfile:
    """The named profile. ``pi-zero-2w`` takes its CPU quota from ``calibration`` when given, and
    ``pi4-2gb`` its quota from the same ``pi-zero-2w`` calibration times the Pi 4's per-core speed
    (:data:`DERIVED_QUOTA`); without one both use the uncalibrated first guess and say so."""
    if name == "native":
        return DeviceProfile("native", None, None, calibrated=True)
    if name == "pi5":
        return DeviceProfile("pi5", PI5_LINK_MBIT, None, calibrated=True, mem_cap_mib=PI5_MEM_CAP_MIB,
                             ram_mib=PI5_RAM_MIB)
    if name in ("pi-zero-2w", "pi4-2gb"):
        base, speed = DERIVED_QUOTA.get(name, (name, 1.0))
        if calibration is not None and calibration.profile != base:
            raise ConfigError(f"calibration is for {calibration.profile!r}; {name!r} needs {base!r}'s")
        quota = calibration.quota if calibration is not None else UNCALIBRATED_PI_ZERO_QUOTA
        if speed != 1.0:
            quota = scaled_quota(quota, speed)
        if name == "pi4-2gb":
            return DeviceProfile(name, PI4_LINK_MBIT, quota, calibrated=calibration is not None,
                                 mem_cap_mib=PI4_2GB_MEM_CAP_MIB, ram_mib=PI4_2GB_RAM_MIB)
        return DeviceProfile(name, PI_ZERO_LINK_MBIT, quota, calibrated=calibration is not None,
                             mem_cap_mib=PI_ZERO_MEM_CAP_MIB, ram_mib=PI_ZERO_RAM_MIB)
    raise ConfigError(f"unknown profile {name!r}; known: {', '.join(PROFILE_NAMES)}")


def calibrated_from(name: str) -> str | None:
    """Which profile's calibration ``name`` needs (itself for ``pi-zero-2w``), or None."""
    if name == "pi-zero-2w":
        return name
    return DERIVED_QUOTA[name][0] if name in DERIVED_QUOTA else None


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Trial:
    """Probe times (seconds) measured at one quota."""

    quota_us: int
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        s = sorted(self.samples)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def closest_trial(trials: Sequence[Trial], target_s: float) -> Trial:
    if not trials:
        raise ConfigError("no calibration trials")
    return min(trials, key=lambda t: abs(math.log(t.median / target_s)))


def next_quota(
    trials: Sequence[Trial],
    *,
    target_s: float,
    period_us: int,
    native_s: float,
    tolerance: float = 0.05,
    min_quota_us: int = 1_000,
    step_us: int = 100,
) -> int | None:
    """The next quota to try, or None when searching further cannot help.

    Done when a trial's median is within ``tolerance`` of ``target_s``. The first guess assumes
    time ~ 1/quota from the unthrottled time. Then a bracket: the largest quota still too slow and
    the smallest already too fast, interpolated on log(time) vs log(quota) (the response is
    non-linear: small quotas cost more than 1/quota), kept off the bracket ends. One-sided, it
    extrapolates with 1/quota, stepping at most 4x.
    """
    if target_s <= 0 or native_s <= 0:
        raise ConfigError("calibration needs positive target and native times")

    def clamp(q: float) -> int:
        q = round(q / step_us) * step_us
        return int(min(max(q, min_quota_us), period_us))

    if not trials:
        return clamp(period_us * native_s / target_s)
    if any(abs(t.median - target_s) <= tolerance * target_s for t in trials):
        return None
    tried = {t.quota_us for t in trials}
    slow = [t for t in trials if t.median > target_s]
    fast = [t for t in trials if t.median < target_s]
    lo = max(slow, key=lambda t: t.quota_us) if slow else None
    hi = min(fast, key=lambda t: t.quota_us) if fast else None
    if lo is not None and hi is not None:
        if lo.quota_us >= hi.quota_us or hi.quota_us - lo.quota_us <= step_us:
            return None  # noise made the bracket inconsistent, or it cannot shrink further
        llo, lhi = math.log(lo.quota_us), math.log(hi.quota_us)
        tlo, thi = math.log(lo.median), math.log(hi.median)
        x = llo + (math.log(target_s) - tlo) * (lhi - llo) / (thi - tlo)
        x = min(max(x, llo + 0.1 * (lhi - llo)), lhi - 0.1 * (lhi - llo))
        q = clamp(math.exp(x))
    elif lo is not None:
        q = clamp(lo.quota_us * min(4.0, max(1.1, lo.median / target_s)))
    else:
        assert hi is not None
        q = clamp(hi.quota_us / min(4.0, max(1.1, target_s / hi.median)))
    return None if q in tried else q


@dataclass(frozen=True)
class Calibration:
    """A measured CPU quota for a device profile (one entry of the calibration file).

    ``samples`` are the probe times at the chosen quota; ``trials`` the whole search;
    ``native_s`` the probe's wall time without a quota and ``native_cpu_s`` its CPU time (they
    differ when other jobs share the cores); ``machine`` what the host was.
    """

    profile: str
    model: str
    tokens: int
    threads: int
    period_us: int
    quota_us: int
    target_s: float
    measured_s: float
    samples: tuple[float, ...]
    native_s: float
    date: str
    machine: Mapping[str, object] = field(default_factory=dict)
    trials: tuple[Trial, ...] = ()
    native_cpu_s: float | None = None

    @property
    def quota(self) -> CpuQuota:
        return CpuQuota(self.period_us, self.quota_us)

    @property
    def slowdown(self) -> float:
        return self.measured_s / self.native_s

    def to_dict(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "model": self.model,
            "tokens": self.tokens,
            "threads": self.threads,
            "period_us": self.period_us,
            "quota_us": self.quota_us,
            "share": round(self.quota_us / self.period_us, 6),
            "target_s": self.target_s,
            "measured_s": self.measured_s,
            "samples": list(self.samples),
            "native_s": self.native_s,
            "native_cpu_s": self.native_cpu_s,
            "slowdown": round(self.slowdown, 3),
            "date": self.date,
            "machine": dict(self.machine),
            "trials": [{"quota_us": t.quota_us, "samples": list(t.samples)} for t in self.trials],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Calibration":
        try:
            return cls(
                profile=str(d["profile"]),
                model=str(d["model"]),
                tokens=int(d["tokens"]),  # type: ignore[arg-type]
                threads=int(d["threads"]),  # type: ignore[arg-type]
                period_us=int(d["period_us"]),  # type: ignore[arg-type]
                quota_us=int(d["quota_us"]),  # type: ignore[arg-type]
                target_s=float(d["target_s"]),  # type: ignore[arg-type]
                measured_s=float(d["measured_s"]),  # type: ignore[arg-type]
                samples=tuple(float(x) for x in d["samples"]),  # type: ignore[union-attr]
                native_s=float(d["native_s"]),  # type: ignore[arg-type]
                date=str(d["date"]),
                machine=dict(d.get("machine") or {}),  # type: ignore[arg-type]
                trials=tuple(
                    Trial(int(t["quota_us"]), tuple(float(x) for x in t["samples"]))
                    for t in d.get("trials") or []  # type: ignore[union-attr]
                ),
                native_cpu_s=(
                    None if d.get("native_cpu_s") is None else float(d["native_cpu_s"])  # type: ignore[arg-type]
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad calibration entry: {e}") from e


def calibrations_to_json(entries: Mapping[str, Calibration]) -> str:
    """The calibration file: ``{"version": 1, "profiles": {name: Calibration.to_dict()}}``."""
    doc = {"version": CALIBRATION_VERSION, "profiles": {k: v.to_dict() for k, v in sorted(entries.items())}}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def calibrations_from_json(text: str) -> dict[str, Calibration]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"calibration file is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != CALIBRATION_VERSION:
        raise ConfigError("calibration file has an unknown version")
    profiles = doc.get("profiles")
    if not isinstance(profiles, dict):
        raise ConfigError("calibration file has no profiles")
    return {k: Calibration.from_dict(v) for k, v in profiles.items()}
