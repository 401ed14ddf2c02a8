"""An ARM board's view of its CPU, for a root run under qemu-user on an x86 host.

qemu-user translates instructions, not files: a process in the root that reads /proc/cpuinfo or
/sys/devices/system/cpu gets the x86 host's, which no arm64 library expects (pytorch's cpuinfo
then finds no CPU list, oneDNN's probe of the host's /sys crashed). This writes what a Raspberry
Pi's kernel shows, for emulate.sh to bind-mount in the root:

    OUT/cpuinfo                    /proc/cpuinfo of the board, one block per core
    OUT/cpu/{possible,present,online,kernel_max}
    OUT/cpu/cpuN/{online,topology/*,regs/identification/midr_el1,cpufreq/cpuinfo_{max,min}_freq}

The texts follow the boards' own (captured /proc/cpuinfo of a Pi Zero 2W, Pi 4 and Pi 5, see
tests/testbed/test_aarch64.py). One core per host CPU, so thread counts stay honest. The
instruction set itself is qemu's CPU model (QEMU_CPU): its AT_HWCAP can list a few features the
board lacks (qemu's cortex-a53 has the crypto extension, the Pi Zero 2W's BCM2710A1 does not).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# QEMU_CPU model -> (board, Features line, variant, part, revision, BogoMIPS, max kHz, min kHz)
BOARDS = {
    "cortex-a53": ("Raspberry Pi Zero 2 W Rev 1.0", "fp asimd evtstrm crc32 cpuid",
                   0x0, 0xD03, 4, "38.40", 1000000, 600000),
    "cortex-a72": ("Raspberry Pi 4 Model B Rev 1.1", "fp asimd evtstrm crc32 cpuid",
                   0x0, 0xD08, 3, "108.00", 1500000, 600000),
    "cortex-a76": ("Raspberry Pi 5 Model B Rev 1.0",
                   "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                   "lrcpc dcpop asimddp", 0x4, 0xD0B, 1, "108.00", 2400000, 1500000),
}


def cpuinfo_text(cpu: str, cores: int) -> str:
    board, features, variant, part, revision, bogomips, _, _ = BOARDS[cpu]
    blocks = [
        f"processor\t: {n}\nBogoMIPS\t: {bogomips}\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: 0x{variant:x}\nCPU part\t: 0x{part:03x}\n"
        f"CPU revision\t: {revision}\n"
        for n in range(cores)
    ]
    return "\n".join(blocks) + f"\nModel\t\t: {board}\n"


def midr(cpu: str) -> int:
    _, _, variant, part, revision, _, _, _ = BOARDS[cpu]
    return 0x41 << 24 | variant << 20 | 0xF << 16 | part << 4 | revision


def write_tree(cpu: str, cores: int, out: Path) -> None:
    """Write ``out/cpuinfo`` and ``out/cpu/`` afresh (a replaced tree, never a merged one).

    An existing tree with the same text is left alone: a running root has it bind-mounted, and
    replacing the directory would leave that mount on a deleted one."""
    if cpu not in BOARDS:
        raise SystemExit(f"fakecpu: no board for QEMU_CPU={cpu}; one of {', '.join(BOARDS)}")
    stamp = out / "cpu" / f"cpu{cores - 1}" / "online"
    if stamp.exists() and (out / "cpuinfo").exists() and (out / "cpuinfo").read_text() == cpuinfo_text(cpu, cores):
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tree = tmp / "cpu"
    last = cores - 1
    span = f"0-{last}" if last else "0"
    files = {"possible": span, "present": span, "online": span, "offline": "", "kernel_max": "3"}
    *_, max_khz, min_khz = BOARDS[cpu]
    for n in range(cores):
        core = f"cpu{n}"
        files.update({
            f"{core}/online": "1",
            f"{core}/topology/core_id": str(n),
            f"{core}/topology/cluster_id": "0",
            f"{core}/topology/physical_package_id": "0",
            f"{core}/topology/thread_siblings_list": str(n),
            f"{core}/topology/core_cpus_list": str(n),
            f"{core}/topology/core_siblings_list": span,
            f"{core}/topology/package_cpus_list": span,
            f"{core}/topology/cluster_cpus_list": span,
            f"{core}/regs/identification/midr_el1": f"0x{midr(cpu):016x}",
            f"{core}/regs/identification/revidr_el1": f"0x{0:016x}",
            f"{core}/cpufreq/cpuinfo_max_freq": str(max_khz),
            f"{core}/cpufreq/cpuinfo_min_freq": str(min_khz),
        })
    for name, text in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    (tmp / "cpuinfo").write_text(cpuinfo_text(cpu, cores))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", default="cortex-a53", choices=sorted(BOARDS))
    p.add_argument("--cores", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    write_tree(args.cpu, max(1, args.cores), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
