"""What bounded decoding costs, side by side with the decoder of fa5dc84 (before it).

    .venv/bin/python results/2026-12-06/decode_bounds_cost.py [--reps 31] [--out decode-bounds.json]

Payloads: a real node's heartbeat body; KV_CHUNKS parts of SmolLM2-135M's layout (30 layers, 3 KV
heads, head dim 64, 16-token chunks, fp16 and int8) as ``mesh.cache.transfer.serve_parts`` builds
them; and the security review's shared-list heartbeat (E1) at a few sizes the old decoder can still
finish. Old and new decode the same bytes, alternating, ``reps`` times each; the medians are kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mesh import wire  # noqa: E402
from mesh.cache.kv import ChunkKV  # noqa: E402
from mesh.cache.transfer import serve_parts  # noqa: E402
from mesh.errors import ProtocolError  # noqa: E402
from tests.fuzz.fuzzkit import shared_heartbeat  # noqa: E402


def old_wire():  # type: ignore[no-untyped-def]
    src = subprocess.run(["git", "-C", str(REPO), "show", "fa5dc84:mesh/wire.py"], check=True,
                         capture_output=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_wire.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("old_wire", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_wire"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def timed(decode, payload: bytes) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    try:
        decode(payload)
    except ProtocolError:
        pass
    return time.perf_counter() - t0


def kv_parts(codec: str) -> list[bytes]:
    layout = [(3, 64)] * 30
    torch.manual_seed(0)
    chunks = [ChunkKV(keys=tuple(torch.randn(h, 16, d) for h, d in layout),
                      values=tuple(torch.randn(h, 16, d) for h, d in layout)) for _ in range(8)]
    keys = [bytes([i]) * 16 for i in range(8)]
    out = []
    for body, _ in serve_parts(keys, chunks, None, None, codec, b"m" * 16, wire.DEFAULT_MAX_BYTES):
        out.append(wire.encode(wire.Envelope(wire.Kind.KV_CHUNKS, "peer", body, corr="c")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--out", default=str(Path(__file__).with_name("decode-bounds.json")))
    args = ap.parse_args()
    old = old_wire()
    hb = {"seq": 1, "time": 1.0, "uptime_s": 1.0, "model": "smollm2-135m", "model_key": "k" * 32, "queue": 0,
          "queue_max": 32, "load": 0.1, "prefill_tps": 900.0, "prefill_tps_from": "asks", "decode_tps": 30.0,
          "served": 10, "failed": 0, "last_ttft_s": 0.2, "pid": 1, "roles": ["answer"], "cpu_load1": 1.0,
          "rejects": {"malformed": 1}, "rtt_ms": 1.0, "cache": {f"f{i}": i for i in range(30)},
          "link": {f"l{i}": 0.5 for i in range(18)}}
    cases = {"heartbeat": wire.encode(wire.Envelope(wire.Kind.HEARTBEAT, "node1", hb))}
    for codec in ("fp16", "int8"):
        for i, p in enumerate(kv_parts(codec)):
            cases[f"kv-{codec}-part{i}"] = p
    for levels in (8, 9, 10):
        cases[f"e1-shared-{levels}"] = shared_heartbeat(levels)
    rows = {}
    for name, payload in cases.items():
        t_old, t_new = [], []
        for _ in range(args.reps):
            t_old.append(timed(old.decode, payload))
            t_new.append(timed(wire.decode, payload))
        rows[name] = {"bytes": len(payload), "old_median_s": statistics.median(t_old),
                      "new_median_s": statistics.median(t_new),
                      "new_over_old": statistics.median(t_new) / statistics.median(t_old)}
        print(f"{name:>18} {len(payload):>9} B  old {rows[name]['old_median_s'] * 1e6:10.1f} us  "
              f"new {rows[name]['new_median_s'] * 1e6:10.1f} us  new/old {rows[name]['new_over_old']:.3f}")
    load = Path("/proc/loadavg").read_text().split()[:3]
    Path(args.out).write_text(json.dumps({"reps": args.reps, "loadavg": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
