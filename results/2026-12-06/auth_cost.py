"""What authentication costs per message (mesh.auth): a sealed envelope (Ed25519 sign on the
sender, certificate lookup + verify + replay guard on the receiver) and a HALO frame's pairwise
MAC (keyed BLAKE2b tags on an MLP input for K workers and on a partial), beside the alternatives
the design rejected (an Ed25519 signature per frame, HMAC-SHA256 per frame) and beside the frame
encode/decode it rides on. Writes JSON and a PNG next to this file.

    nice -n 19 .venv/bin/python results/2026-12-06/auth_cost.py [--reps 2000] [--out results/2026-12-06/auth-cost]

Each figure is the median (with the batches' min and max in ``spread_us``) over ``--batches`` batches of ``--reps`` calls (microseconds per call),
measured in this one process on this machine (an x86 box: the Pi Zero 2W / 3 / 4 have no ARMv8
crypto extensions, so SHA-256 there is slower against BLAKE2b than here).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mesh import topics, wire  # noqa: E402
from mesh.auth.certs import CertificateAuthority  # noqa: E402
from mesh.auth.keyring import Keyring  # noqa: E402
from mesh.halo import frame as halo_wire  # noqa: E402

HIDDEN = 576  # SmolLM2-135M: the HALO model
LAYERS = 30


SPREAD: dict[str, tuple[float, float]] = {}  # figure -> (min, max) over its batches


def per_call_us(label: str, fn: Callable[[], object], reps: int, batches: int) -> float:
    fn()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps * 1e6)
    SPREAD[label] = (min(samples), max(samples))
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--workers", type=int, default=3, help="tags on an MLP input (one per plan worker)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("auth-cost")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps, b = args.reps, args.batches

    ca = CertificateAuthority.create()
    node, peer = Keyring(ca.issue("pi1", "node"), ca.cert), Keyring(ca.issue("pi2", "node"), ca.cert)
    coord = Keyring(ca.issue("coordinator", "coordinator"), ca.cert)
    hb = wire.encode(wire.Envelope(wire.Kind.HEARTBEAT, "pi1", {
        "seq": 1, "model": "smollm2-135m", "model_key": "smollm2-135m@b179c9523d0e6a0f/fp32", "queue": 0,
        "load": 0.1, "prefill_tps": 500.0, "rtt_ms": 3.2, "served": 10, "rejects": {}}))
    token = wire.encode(wire.Envelope(wire.Kind.TOKEN, "pi1", {"i": 3, "text": " Paris"}, corr="c" * 16))
    results: dict[str, float] = {}

    # -- sealed envelopes -------------------------------------------------------------------------
    for label, inner in (("heartbeat", hb), ("token", token)):
        topic = topics.reply("pi2")
        results[f"seal_{label}"] = per_call_us(f"seal_{label}", lambda: node.seal(inner, topic), reps, b)
        sealed = [node.seal(inner, topic) for _ in range(reps * (b + 1) + 1)]
        it = iter(sealed)  # each open sees a fresh message (the replay guard refuses a repeat)
        results[f"open_{label}"] = per_call_us(f"open_{label}", lambda: peer.open(next(it), topic), reps, b)
    one = node.seal(hb, topics.reply("pi2"))
    results["open_retained_cached_cert"] = per_call_us("open_retained_cached_cert", lambda: peer.open(one, topics.reply("pi2"), True), reps, b)

    def cold() -> None:
        fresh = Keyring(peer.identity, ca.cert)  # an empty certificate cache: the first message of a sender
        fresh.open(one, topics.reply("pi2"), True)
    results["open_first_from_a_sender"] = per_call_us("open_first_from_a_sender", cold, max(reps // 10, 50), b)
    results["sizes_bytes"] = {"heartbeat": len(hb), "heartbeat_sealed": len(one), "token": len(token),  # type: ignore[assignment]
                              "token_sealed": len(node.seal(token, "t")), "cert": len(node.identity.cert_der)}

    # -- HALO frames ------------------------------------------------------------------------------
    w_keys = [coord.pair_key(coord.peer(Keyring(ca.issue(f"w{i}", "node"), ca.cert).identity.cert_der))
              for i in range(args.workers)]
    k = w_keys[0]
    for label, tokens in (("decode", 1), ("prefill64", 64)):
        x = torch.randn(1, tokens, HIDDEN).half()
        reply = topics.halo_link("coordinator")
        plain = halo_wire.encode(halo_wire.MLP, "coordinator", 1, 2, 3, x, reply_to=reply)
        tagged = halo_wire.encode(halo_wire.MLP, "coordinator", 1, 2, 3, x, reply_to=reply, keys=w_keys)
        results[f"mlp_{label}_encode_plain"] = per_call_us(f"mlp_{label}_encode_plain", 
            lambda: halo_wire.encode(halo_wire.MLP, "coordinator", 1, 2, 3, x, reply_to=reply), reps, b)
        results[f"mlp_{label}_encode_tagged_{args.workers}w"] = per_call_us(f"mlp_{label}_encode_tagged_{args.workers}w", 
            lambda: halo_wire.encode(halo_wire.MLP, "coordinator", 1, 2, 3, x, reply_to=reply, keys=w_keys), reps, b)
        results[f"mlp_{label}_decode_plain"] = per_call_us(f"mlp_{label}_decode_plain", lambda: halo_wire.decode(plain, 1 << 24), reps, b)
        f = halo_wire.decode(tagged, 1 << 24)
        results[f"mlp_{label}_check_tag"] = per_call_us(f"mlp_{label}_check_tag", lambda: f.tag_ok(k, 0), reps, b)
        body = tagged[:-16 * args.workers]
        results[f"mlp_{label}_hmac_sha256"] = per_call_us(f"mlp_{label}_hmac_sha256", lambda: hmac.new(k, body, hashlib.sha256).digest(), reps, b)
        sig = coord.identity.signing_key
        pub = sig.public_key()
        s = sig.sign(body)
        results[f"mlp_{label}_ed25519_sign"] = per_call_us(f"mlp_{label}_ed25519_sign", lambda: sig.sign(body), max(reps // 4, 50), b)
        results[f"mlp_{label}_ed25519_verify"] = per_call_us(f"mlp_{label}_ed25519_verify", lambda: pub.verify(s, body), max(reps // 4, 50), b)
        results[f"mlp_{label}_bytes"] = len(plain)  # type: ignore[assignment]
    y = torch.randn(1, 1, HIDDEN).half()
    results["partial_encode_plain"] = per_call_us("partial_encode_plain", lambda: halo_wire.encode(halo_wire.PARTIAL, "w0", 1, 2, 3, y), reps, b)
    results["partial_encode_tagged"] = per_call_us("partial_encode_tagged", 
        lambda: halo_wire.encode(halo_wire.PARTIAL, "w0", 1, 2, 3, y, keys=[k]), reps, b)
    p = halo_wire.decode(halo_wire.encode(halo_wire.PARTIAL, "w0", 1, 2, 3, y, keys=[k]), 1 << 24)
    results["partial_check_tag"] = per_call_us("partial_check_tag", lambda: p.tag_ok(k), reps, b)

    # Per decoded token of SmolLM2 (30 layer steps): the coordinator tags one input for K workers
    # and checks K partials; each worker checks its input's tag and tags its partial.
    tag_added = results[f"mlp_decode_encode_tagged_{args.workers}w"] - results["mlp_decode_encode_plain"]
    part_added = results["partial_encode_tagged"] - results["partial_encode_plain"]
    per_token = {
        "coordinator_us": LAYERS * (tag_added + args.workers * results["partial_check_tag"]),
        "each_worker_us": LAYERS * (results["mlp_decode_check_tag"] + part_added),
        "if_ed25519_per_frame_coordinator_us": LAYERS * (results["mlp_decode_ed25519_sign"]
                                                         + args.workers * results["mlp_decode_ed25519_verify"]),
    }
    out = {"what": "mesh.auth cost per message, microseconds per call (median of batches)",
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "torch_threads": 1},
           "reps": reps, "batches": b, "workers": args.workers, "us": results, "per_token_smollm2": per_token,
           "spread_us": {k: [round(lo, 3), round(hi, 3)] for k, (lo, hi) in SPREAD.items()},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out + ".json").write_text(json.dumps(out, indent=2))
    plot(out, Path(args.out + ".png"))
    print(json.dumps({"per_token_smollm2": per_token, **{k: round(v, 2) for k, v in results.items()
                                                          if isinstance(v, float)}}, indent=1))
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    us = out["us"]
    w = out["workers"]
    fig, (a, c) = plt.subplots(1, 2, figsize=(12, 4.8))
    env = ["seal_heartbeat", "open_heartbeat", "seal_token", "open_token", "open_retained_cached_cert",
           "open_first_from_a_sender"]
    a.barh(env, [us[k] for k in env], color="#4c72b0")
    a.set_xlabel("µs per message")
    a.set_title("sealed envelope (Ed25519 + attached certificate)")
    frame = [f"mlp_decode_encode_plain", f"mlp_decode_encode_tagged_{w}w", "mlp_decode_check_tag",
             "partial_check_tag", "mlp_decode_hmac_sha256", "mlp_decode_ed25519_sign", "mlp_decode_ed25519_verify"]
    colors = ["#999999", "#55a868", "#55a868", "#55a868", "#c44e52", "#c44e52", "#c44e52"]
    c.barh(frame, [us[k] for k in frame], color=colors)
    c.set_xlabel("µs per frame (decode step, 1x1x576 fp16)")
    c.set_title(f"HALO frame: keyed BLAKE2b tags ({w} workers) vs alternatives")
    for ax in (a, c):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"per token (30 layers): coordinator +{out['per_token_smollm2']['coordinator_us']:.0f} µs, "
                 f"each worker +{out['per_token_smollm2']['each_worker_us']:.0f} µs "
                 f"(Ed25519 per frame: {out['per_token_smollm2']['if_ed25519_per_frame_coordinator_us']:.0f} µs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
