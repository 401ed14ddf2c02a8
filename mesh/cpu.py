"""What this CPU can run: its ARM features, and the torch settings a node needs on it.

The Raspberry Pis the mesh is for differ in instruction set, not only in speed: the Pi Zero 2W
(Cortex-A53), Pi 3 and Pi 4 (Cortex-A72) implement ARMv8.0, the Pi 5 (Cortex-A76) ARMv8.2. A
library built for a later ARM version dies with SIGILL on the older cores, so a node must know
which one it runs on before it loads torch, and the install must know before it picks a wheel.

Two sources, both what the kernel itself decided:

- ``/proc/cpuinfo``: on arm64 Linux one block per core with a ``Features`` line (the kernel's
  names: ``atomics`` is FEAT_LSE, ``fphp``/``asimdhp`` fp16 arithmetic, ``asimddp`` the dot
  product, ``sve``, ``i8mm``, ``bf16``) and ``CPU part`` (0xd03 Cortex-A53, 0xd08 A72, 0xd0b A76).
- ``AT_HWCAP``/``AT_HWCAP2`` in the process's auxiliary vector (``/proc/self/auxv``): the same
  feature bits as a number. This is what libraries test at run time (``getauxval``), and it is
  also what an emulator such as qemu-user reports for the CPU it emulates, whereas its
  ``/proc/cpuinfo`` may be the host's. When the two disagree the auxiliary vector wins.

Everything here is a pure function of those texts and numbers except the two readers at the end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# Linux arch/arm64/include/uapi/asm/hwcap.h: bit i of AT_HWCAP is HWCAP_NAMES[i] (the names are
# the ones /proc/cpuinfo prints), likewise for AT_HWCAP2.
HWCAP_NAMES = (
    "fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp",
    "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4",
    "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb",
    "paca", "pacg",
)
HWCAP2_NAMES = (
    "dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
    "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte",
)
AT_HWCAP = 16
AT_HWCAP2 = 26

# MIDR part numbers of ARM Ltd. (implementer 0x41) cores a user may run a node on.
ARM_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
    0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1", 0xD40: "Neoverse-V1", 0xD49: "Neoverse-N2", 0xD4F: "Neoverse-V2",
}

# Features an ARM version makes mandatory and the kernel reports, newest first. LSE atomics
# ("atomics") are the line between ARMv8.0 and everything later: code built for ARMv8.1+ uses
# them for every atomic add or compare-and-swap, so that is where such code dies on an A53/A72.
ARM_LEVELS = (
    ("armv8.2", frozenset({"atomics", "asimdrdm", "dcpop"})),
    ("armv8.1", frozenset({"atomics", "asimdrdm"})),
)


@dataclass(frozen=True)
class CpuFacts:
    """One machine's CPU as the kernel describes it (one entry per core for ``parts``)."""

    arch: str  # "aarch64", "armv7" (a 32-bit ARM kernel or OS), "x86_64" or "other"
    features: frozenset[str]
    parts: tuple[str, ...] = ()  # core names from "CPU part", e.g. ("Cortex-A53",) * 4
    model: str = ""  # the board, from the "Model" line when the firmware gives one

    @property
    def arm_level(self) -> str:
        """"armv8.0", "armv8.1", "armv8.2" on 64-bit ARM (from the features), "" elsewhere."""
        if self.arch != "aarch64":
            return ""
        for level, needs in ARM_LEVELS:
            if needs <= self.features:
                return level
        return "armv8.0"

    @property
    def baseline_arm(self) -> bool:
        """True on a 64-bit ARMv8.0 core (Pi Zero 2W, Pi 3, Pi 4): no LSE atomics, no fp16, no
        dot product."""
        return self.arm_level == "armv8.0"


def parse_cpuinfo(text: str) -> CpuFacts:
    """Facts from a ``/proc/cpuinfo`` text (any architecture; unknown lines are ignored).

    A feature counts only when every core lists it (big.LITTLE systems list per core); a 32-bit
    ARM kernel shows ``CPU architecture: 7`` and ``half thumb ... neon`` instead.
    """
    feature_sets: list[frozenset[str]] = []
    parts: list[str] = []
    arch_field = ""
    flags: frozenset[str] | None = None
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "features":
            feature_sets.append(frozenset(value.split()))
        elif key == "flags" and flags is None:  # x86: the first core's flags
            flags = frozenset(value.split())
        elif key == "cpu architecture" and not arch_field:
            arch_field = value
        elif key == "cpu part":
            try:
                part = int(value, 16)
            except ValueError:
                continue
            parts.append(ARM_PARTS.get(part, f"0x{part:03x}"))
        elif key == "model" and not value.isdigit():  # x86 "model : 85" is a number
            model = value
    if feature_sets:
        features = frozenset.intersection(*feature_sets)
        arch = "aarch64" if arch_field in ("8", "AArch64") and "asimd" in features else "armv7"
        return CpuFacts(arch=arch, features=features, parts=tuple(parts), model=model)
    if flags is not None:
        return CpuFacts(arch="x86_64" if "lm" in flags else "other", features=flags, model=model)
    return CpuFacts(arch="other", features=frozenset(), model=model)


def hwcap_features(hwcap: int, hwcap2: int = 0) -> frozenset[str]:
    """The kernel's feature names for arm64 ``AT_HWCAP``/``AT_HWCAP2`` bits."""
    names = {name for bit, name in enumerate(HWCAP_NAMES) if hwcap >> bit & 1}
    names |= {name for bit, name in enumerate(HWCAP2_NAMES) if hwcap2 >> bit & 1}
    return frozenset(names)


def parse_auxv(data: bytes) -> dict[int, int]:
    """``/proc/self/auxv`` of a 64-bit little-endian process: pairs of (type, value) words."""
    words = struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8])
    return {words[i]: words[i + 1] for i in range(0, len(words) - 1, 2) if words[i]}


def with_hwcaps(facts: CpuFacts, auxv: dict[int, int]) -> CpuFacts:
    """``facts`` with its features replaced by the auxiliary vector's, when that has them.

    Under qemu-user ``/proc/cpuinfo`` can be the x86 host's, while ``AT_HWCAP`` is the emulated
    core's: that is the view every library inside the emulator acts on, so it wins.
    """
    if not auxv.get(AT_HWCAP):
        return facts
    features = hwcap_features(auxv[AT_HWCAP], auxv.get(AT_HWCAP2, 0))
    if "asimd" not in features:  # not an arm64 process (the numbers mean other things)
        return facts
    return CpuFacts(arch="aarch64", features=features, parts=facts.parts if facts.arch == "aarch64" else (),
                    model=facts.model)


def read_cpu(proc: Path = Path("/proc")) -> CpuFacts:
    """This machine's CPU: ``/proc/cpuinfo`` corrected by this process's ``AT_HWCAP``."""
    try:
        facts = parse_cpuinfo((proc / "cpuinfo").read_text(errors="replace"))
    except OSError:
        facts = CpuFacts(arch="other", features=frozenset())
    try:
        auxv = parse_auxv((proc / "self" / "auxv").read_bytes())
    except OSError:
        return facts
    import platform

    if platform.machine() not in ("aarch64", "arm64"):
        return facts
    return with_hwcaps(facts, auxv)


@dataclass(frozen=True)
class TorchSettings:
    """How a node must run torch on this CPU: set ``env`` before torch is imported (OpenMP and
    BLAS read it once, and it is what every thread starts with), then use ``threads``."""

    threads: int  # torch intra-op threads; 0: the node's own choice (all cores)
    env: dict[str, str]
    reason: str = ""


def torch_settings(facts: CpuFacts, requested_threads: int = 0) -> TorchSettings:
    """The threads and environment that keep torch inside this CPU's instruction set.

    On ARMv8.0 (Pi Zero 2W, Pi 3, Pi 4) a node runs torch on one thread. torch 2.13 from PyPI
    (``+cu130``) loads and computes there (its own libraries use outline atomics that test
    AT_HWCAP), but the BLAS bundled with it (NVIDIA's NVPL) joins its worker threads at a barrier
    made of an LSE atomic (``ldaddal``), an ARMv8.1 instruction these cores lack and that kills
    the process with SIGILL when reached; on one thread that barrier is skipped. Whether an op
    reaches it depends on torch's dispatch, not on anything the node controls, so one thread is
    the setting that cannot reach it. OpenMP's thread count is per thread
    (``torch.set_num_threads`` binds only its caller), so ``OMP_NUM_THREADS=1`` must be in the
    environment before torch loads for every thread to start with it. Elsewhere nothing changes.
    """
    if not facts.baseline_arm:
        return TorchSettings(threads=requested_threads, env={})
    reason = (f"{facts.arm_level} CPU ({', '.join(sorted(set(facts.parts))) or 'ARM'}, no LSE atomics): "
              "torch's bundled BLAS has an ARMv8.1 barrier (SIGILL) on 2+ threads, so one thread")
    return TorchSettings(threads=1, env={"OMP_NUM_THREADS": "1"}, reason=reason)


def describe(facts: CpuFacts) -> str:
    """One line for logs and ``python -m mesh.cpu``."""
    level = facts.arm_level or facts.arch
    parts = ", ".join(sorted(set(facts.parts)))
    notable = [f for f in ("atomics", "fphp", "asimddp", "i8mm", "bf16", "sve") if f in facts.features]
    return (f"{level}{f' ({parts})' if parts else ''}{f' on {facts.model}' if facts.model else ''}; "
            f"features: {' '.join(notable) if facts.arch == 'aarch64' else '-'}"
            f"{' (none of atomics/fp16/dot product: ARMv8.0)' if facts.baseline_arm else ''}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mesh.cpu", description="this CPU and the torch settings it needs")
    p.add_argument("--threads", action="store_true", help="print only the torch thread count a node must use")
    p.add_argument("--env", action="store_true", help="print KEY=value lines to set before torch loads")
    p.add_argument("--verbose", action="store_true", help="also print every feature the kernel reports")
    args = p.parse_args(argv)
    facts = read_cpu()
    settings = torch_settings(facts)
    if args.threads:
        print(settings.threads)
    elif args.env:
        for key, value in settings.env.items():
            print(f"{key}={value}")
    else:
        print(describe(facts))
        if settings.reason:
            print(settings.reason)
        if args.verbose:
            print("features:", " ".join(sorted(facts.features)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
