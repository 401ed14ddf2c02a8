"""Device profiles (link rate and CPU quota of an emulated Pi) and the arithmetic of calibrating
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


PROFILE_NAMES = ("native", "pi5", "pi-zero-2w")
PI5_LINK_MBIT = 27.0
PI_ZERO_LINK_MBIT = 21.0
# Used only until `mesh testbed calibrate` has run: a first guess from DESIGN.md's Pi Zero
# measurement; the calibration replaces it.
UNCALIBRATED_PI_ZERO_QUOTA = CpuQuota(period_us=1_000_000, quota_us=24_000)


@dataclass(frozen=True)
class DeviceProfile:
    """What one emulated device is allowed: link rate (None = unshaped) and CPU (None = free)."""

    name: str
    link_mbit: float | None
    cpu: CpuQuota | None
    calibrated: bool


def device_profile(name: str, calibration: "Calibration | None" = None) -> DeviceProfile:
    """The named profile; ``pi-zero-2w`` takes its CPU quota from ``calibration`` when given."""
    if name == "native":
        return DeviceProfile("native", None, None, calibrated=True)
    if name == "pi5":
        return DeviceProfile("pi5", PI5_LINK_MBIT, None, calibrated=True)
    if name == "pi-zero-2w":
        if calibration is not None:
            if calibration.profile != name:
                raise ConfigError(f"calibration is for {calibration.profile!r}, not {name!r}")
            return DeviceProfile(name, PI_ZERO_LINK_MBIT, calibration.quota, calibrated=True)
        return DeviceProfile(name, PI_ZERO_LINK_MBIT, UNCALIBRATED_PI_ZERO_QUOTA, calibrated=False)
    raise ConfigError(f"unknown profile {name!r}; known: {', '.join(PROFILE_NAMES)}")


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
