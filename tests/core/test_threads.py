"""Torch's intra-op thread count reaches every thread that runs torch ops (mesh.model.bind_threads).

``torch.set_num_threads`` binds OpenMP and MKL only in its caller; a matmul in another thread
(paho's network thread serving HALO partials) then started an OpenMP pool of one thread per core,
which spun and waited for time slices: 7 ms per 0.2 ms partial with one-thread processes sharing
two cores. Each case runs in a fresh interpreter, so no earlier test has touched OpenMP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    import torch
    from mesh.model import bind_threads
    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    a @ b  # the main thread's own pool (none with one thread)
    extra = []
    def work():
        before = len(os.listdir("/proc/self/task"))
        if sys.argv[1] == "bind":
            bind_threads()
        for _ in range(20):
            a @ b
        extra.append(len(os.listdir("/proc/self/task")) - before)  # counted while the pool lives
    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(json.dumps({"extra": extra[0]}))
""")


def _extra_threads(mode: str, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs two cores and /proc")
def test_a_bound_thread_starts_no_openmp_pool() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # The failure this guards against is real on this torch: unbound, the thread's matmuls
    # start pool threads; bound, they run on the thread itself.
    assert _extra_threads("free", env) >= 1
    assert _extra_threads("bind", env) == 0


def test_cli_threads_flag_sets_the_openmp_environment_before_torch_loads() -> None:
    code = ("import os, sys\nfrom nodes import cli\ncli.threads_env(1)\nloaded = 'torch' in sys.modules\n"
            "import torch\n"
            "print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], loaded, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=True)
    assert out.stdout.split()[-4:] == ["1", "1", "False", "1"], out.stdout


def test_mesh_main_sets_the_openmp_environment_before_its_parser_loads_torch(tmp_path) -> None:
    """``main`` used to call ``threads_env`` after ``build_parser``, whose modules load torch: the
    variables came too late, so ``--threads`` and an ARMv8.0 Pi's one-thread override never
    reached OpenMP (the Pi's BLAS dies with SIGILL on two threads)."""
    code = ("import os, sys\nfrom nodes import cli\n"
            "rc = cli.main(['node', '--threads', '1', '--model', 'no-such-model', '--home', sys.argv[1]])\n"
            "import torch\nprint(os.environ.get('OMP_NUM_THREADS'), rc, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env, check=True)
    assert out.stdout.split()[-3:] == ["1", "2", "1"], out.stdout + out.stderr


def test_the_threads_flag_is_read_without_the_parser() -> None:
    from nodes.cli import _threads_flag

    assert _threads_flag(["node", "--threads", "3", "--name", "a"]) == 3
    assert _threads_flag(["node", "--threads=2"]) == 2
    assert _threads_flag(["bench", "load", "--node-threads", "2"]) is None
    assert _threads_flag(["node", "--threads", "many"]) is None  # the full parser says why
