"""One ask answered by a real node: a broker and a node on loopback, one ask, both stopped.

For emulate.sh's check inside the arm64 root (no systemd there, so the processes the units
would start are started here with the same commands). Prints one JSON line: the answer and the
ask's figures. Every process it starts is stopped before it returns, also on failure.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompt", nargs="+")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the node to start and answer")
    args = p.parse_args(argv)

    from mesh.config import BrokerAddress
    from nodes.client import MeshClient

    port = free_port()
    mesh = [sys.executable, "-m", "nodes.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([*mesh, "broker", "--host", "127.0.0.1", "--port", str(port)]))
        t0 = time.monotonic()
        procs.append(subprocess.Popen([*mesh, "node", "--name", "pi0", "--broker", f"127.0.0.1:{port}",
                                       "--model", args.model, "--home", str(args.home),
                                       "--threads", str(args.threads), "--no-cache", "--heartbeat", "5"]))
        deadline = time.monotonic() + args.timeout
        while True:  # the broker binds in a few seconds under emulation; retry until it does
            try:
                client = MeshClient(BrokerAddress("127.0.0.1", port), connect_timeout=30.0)
                client.start()
                break
            except Exception:
                if time.monotonic() > deadline or any(pr.poll() is not None for pr in procs):
                    raise
                time.sleep(2)
        try:
            client.wait_online(["pi0"], timeout=max(1.0, deadline - time.monotonic()))
            start_s = time.monotonic() - t0
            result = client.ask(" ".join(args.prompt), node="pi0", max_new_tokens=args.tokens,
                                timeout=max(1.0, deadline - time.monotonic()), no_cache=True)
        finally:
            client.stop()
        out = result.as_json()
        out["node_start_s"] = round(start_s, 1)
        print(json.dumps(out))
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
