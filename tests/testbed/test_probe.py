"""The CPU probe's command line, run as a plain process (no root, no namespaces)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nodes.testbed.shell import REPO_ROOT


def test_the_probe_looks_for_its_model_under_mesh_home(tmp_path: Path) -> None:
    # the probe runs in a namespace or as the calibration's child: it must honour the caller's
    # MESH_HOME as every mesh process does, not a home directory of its own
    env = {**os.environ, "MESH_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "nodes.testbed", "probe", "--model", "gemma3-270m",
                        "--tokens", "4"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"no model cache at {tmp_path / 'models' / 'gemma3-270m'}" in r.stderr, r.stderr
