"""The mesh on the Pi's CPU: mesh/cpu.py on captured boards' texts, and the emulated arm64 root.

The fast tests read /proc/cpuinfo texts published from real boards and the AT_HWCAP values qemu
reports for the Pi cores, and this machine's own /proc. The slow ones need the arm64 root that
``deploy/aarch64/emulate.sh build`` makes (tens of minutes under qemu) and run only with
MESH_SLOW_AARCH64=1: torch runs on the emulated Cortex-A53 (1 and 2 threads) only when the
root has the board's view of its CPU (not the x86 host's /sys), and one ask in the root is
answered with x86's tokens.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest

from mesh.cpu import (
    AT_HWCAP,
    CpuFacts,
    hwcap_features,
    parse_auxv,
    parse_cpuinfo,
    read_cpu,
    torch_settings,
    with_hwcaps,
)

REPO = Path(__file__).resolve().parents[2]
EMULATE = REPO / "deploy" / "aarch64" / "emulate.sh"

# Raspberry Pi Zero 2 W, 64-bit Raspberry Pi OS: published trimmed to one core as a test fixture
# ("Trimmed from a real Pi Zero 2 W") in a public GitHub C++ project (search index file 61353894100).
PI_ZERO_2W = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd03
CPU revision\t: 4

Hardware\t: BCM2835
Revision\t: 902120
Serial\t\t: 00000000a3f1b2c4
Model\t\t: Raspberry Pi Zero 2 W Rev 1.0
"""

# Raspberry Pi 4 Model B Rev 1.1, 64-bit kernel: a full system dump in a public GitHub repository
# (search index file 34311617829), all four cores as printed.
_PI4_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
PI_4 = "\n".join(_PI4_CORE.format(n=n) for n in range(4)) + """
Revision\t: c03111
Serial\t\t: 10000000bafb5028
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
"""

# Raspberry Pi 5 (16 GB, Debian 13, kernel 6.12.75+rpt-rpi-2712): `cat /proc/cpuinfo` as recorded
# in a public GitHub document (search index file 52453894757); processor 0's block is the one
# published whole.
PI_5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""

# A Pi 4 under 32-bit Raspberry Pi OS (search index file 40708522446): the kernel speaks ARMv7.
PI_4_32BIT = """processor\t: 3
model name\t: ARMv7 Processor rev 3 (v7l)
BogoMIPS\t: 108.00
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer\t: 0x41
CPU architecture: 7
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2711
Revision\t: c03111
Serial\t\t: 10000000032c4bda
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
"""

# AT_HWCAP inside the arm64 root under qemu-aarch64 7.2 (read from /proc/self/auxv, 2026-12-06).
QEMU_HWCAP = {"cortex-a53": 0x8FB, "cortex-a72": 0x8FB, "cortex-a76": 0x119FFB}


def test_pi_zero_2w_is_armv8_0_and_runs_torch_on_one_thread() -> None:
    facts = parse_cpuinfo(PI_ZERO_2W)
    assert facts.arch == "aarch64"
    assert facts.parts == ("Cortex-A53",)
    assert facts.model == "Raspberry Pi Zero 2 W Rev 1.0"
    assert facts.arm_level == "armv8.0" and facts.baseline_arm
    assert "atomics" not in facts.features and "asimddp" not in facts.features
    settings = torch_settings(facts, requested_threads=4)
    assert settings.threads == 1
    assert settings.env == {"OMP_NUM_THREADS": "1"}
    assert "SIGILL" in settings.reason


def test_pi_4_is_armv8_0_on_every_core() -> None:
    facts = parse_cpuinfo(PI_4)
    assert facts.parts == ("Cortex-A72",) * 4
    assert facts.arm_level == "armv8.0"
    assert torch_settings(facts, 0).threads == 1


def test_pi_5_is_armv8_2_and_keeps_its_threads() -> None:
    facts = parse_cpuinfo(PI_5)
    assert facts.parts == ("Cortex-A76",)
    assert facts.arm_level == "armv8.2" and not facts.baseline_arm
    assert {"atomics", "fphp", "asimdhp", "asimddp"} <= facts.features
    assert not {"i8mm", "bf16", "sve"} & facts.features
    assert torch_settings(facts, 3) == torch_settings(facts, 3).__class__(threads=3, env={})


def test_a_32_bit_os_is_not_aarch64() -> None:
    facts = parse_cpuinfo(PI_4_32BIT)
    assert facts.arch == "armv7"
    assert facts.arm_level == "" and not facts.baseline_arm


def test_a_feature_counts_only_when_every_core_has_it() -> None:
    # big.LITTLE: an A55 (no dot product in this listing) beside an A76 that has one.
    little = PI_5.replace("asimddp", "").replace("0xd0b", "0xd05")
    facts = parse_cpuinfo(PI_5 + "\n" + little)
    assert "asimddp" not in facts.features
    assert facts.parts == ("Cortex-A76", "Cortex-A55")


def test_hwcap_bits_are_the_kernels_names() -> None:
    assert hwcap_features(1 << 8) == {"atomics"}
    assert hwcap_features(0, 1 << 13) == {"i8mm"}
    a53 = hwcap_features(QEMU_HWCAP["cortex-a53"])
    # qemu's Cortex-A53 has the crypto extension the Pi Zero 2W's BCM2710A1 lacks; the ISA level
    # (no LSE atomics, no fp16, no dot product) is the board's.
    assert a53 == {"fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid"}
    a76 = hwcap_features(QEMU_HWCAP["cortex-a76"])
    assert parse_cpuinfo(PI_5).features - a76 == {"evtstrm"}


@pytest.mark.parametrize("cpu,level", [("cortex-a53", "armv8.0"), ("cortex-a72", "armv8.0"), ("cortex-a76", "armv8.2")])
def test_the_auxiliary_vector_wins_over_a_hosts_cpuinfo(cpu: str, level: str) -> None:
    # Under qemu-user without the fake /proc/cpuinfo a process reads the x86 host's text.
    host = CpuFacts(arch="x86_64", features=frozenset({"fpu", "avx2", "lm"}))
    facts = with_hwcaps(host, {AT_HWCAP: QEMU_HWCAP[cpu], 6: 4096})
    assert facts.arch == "aarch64" and facts.arm_level == level
    assert facts.parts == ()  # the host's cores say nothing about the emulated ones


def test_this_machines_auxv_and_cpu() -> None:
    auxv = parse_auxv(Path("/proc/self/auxv").read_bytes())
    assert auxv[6] == os.sysconf("SC_PAGE_SIZE")  # AT_PAGESZ
    facts = read_cpu()
    if platform.machine() == "x86_64":
        assert facts.arch == "x86_64" and "lm" in facts.features
        assert torch_settings(facts, 2) == torch_settings(facts, 2).__class__(threads=2, env={})
    else:
        assert facts.arch == "aarch64"


# ---- slow: the arm64 root under qemu (deploy/aarch64/emulate.sh build must have run) ----

slow = pytest.mark.skipif(os.environ.get("MESH_SLOW_AARCH64") != "1",
                          reason="slow (tens of minutes under qemu): set MESH_SLOW_AARCH64=1, after "
                                 "`deploy/aarch64/emulate.sh build`")

MATMUL = ("import torch, threading; torch.set_num_threads({threads}); x = torch.randn(64, 576); "
          "w = torch.randn(1536, 576); out = []; "
          "t = threading.Thread(target=lambda: out.append(float((x @ w.T).sum()))); t.start(); t.join(); "
          "print('ok', torch.get_num_threads(), len(out))")


def _in_root(cpu: str, *argv: str, view: str = "board") -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, mounts)")
    return subprocess.run([str(EMULATE), "run", *argv], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "MESH_AARCH64_CPU": cpu, "MESH_AARCH64_VIEW": view})


@slow
def test_what_the_root_sees_decides_whether_torch_runs() -> None:
    python = "/opt/mesh/.venv/bin/python"
    # The board's view (the Pi's /proc/cpuinfo and CPU tree): torch runs, on 1 and 2 threads.
    for threads in (1, 2):
        done = _in_root("cortex-a53", python, "-c", MATMUL.format(threads=threads))
        assert done.returncode == 0 and done.stdout.split() == ["ok", str(threads), "1"], done.stderr
    # The x86 host's /sys: oneDNN's probe finds no MIDR_EL1 and the process segfaults, an
    # artefact of emulation (a board's kernel has that file).
    host = _in_root("cortex-a53", python, "-c", MATMUL.format(threads=1), view="host")
    assert host.returncode in (139, -11) and "MIDR_EL1" in host.stderr, host.stderr


@slow
def test_one_ask_in_the_root_has_x86s_tokens() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, mounts)")
    done = subprocess.run([str(EMULATE), "check"], capture_output=True, text=True, timeout=7200)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["same_weights"] and result["same_tokens"] and result["same_answer"]
    assert result["arm_threads"] == 1


def test_the_cli_applies_the_cpus_thread_setting_before_torch_loads() -> None:
    """``mesh`` (nodes.cli.threads_env) asks mesh.cpu before torch loads: on a Pi Zero 2W a
    request for 4 threads becomes 1, in torch's count and in OpenMP's environment; on a Pi 5 the
    request stands; once torch is loaded nothing is touched (it would be too late)."""
    from nodes.cli import threads_env

    env: dict[str, str] = {}
    assert threads_env(4, parse_cpuinfo(PI_ZERO_2W), env, modules={}) == 1
    assert env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env = {}
    assert threads_env(None, parse_cpuinfo(PI_4), env, modules={}) == 1 and env["OMP_NUM_THREADS"] == "1"
    env = {}
    assert threads_env(3, parse_cpuinfo(PI_5), env, modules={}) == 3
    assert env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    env = {}
    assert threads_env(None, parse_cpuinfo(PI_5), env, modules={}) is None and env == {}
    env = {}
    assert threads_env(4, parse_cpuinfo(PI_ZERO_2W), env, modules={"torch": object()}) == 4 and env == {}
