"""What KV provenance (mesh.cache.provenance) costs per chunk, for a real SmolLM2-135M chunk (16
tokens, 30 layers, 3 KV heads of 64: 720 KiB in fp32, 360 KiB as fp16 on the wire), one thread.

- sign: what the computing node pays once per chunk (the chunk encoded in fp16, int8 and fp32,
  three BLAKE2b-256 digests, one Ed25519 seal of the 172-byte manifest); a node signs fp16 and
  int8 only (``sign_chunk_fp16_int8_us``); fp16 alone for scale
- check: what a receiver pays per received chunk (one digest of the bytes it got, open the
  seal: a cached certificate, one Ed25519 verification)
- serve check: what a server adds per chunk it serves (a digest of the bytes it encoded)
- encode fp16: the encoding every serve already paid before provenance, for scale
Medians of many runs. Run: PYTHONPATH=. .venv/bin/python results/2026-12-07/provenance_cost.py (HF_HUB_OFFLINE=1;
writes provenance_cost.json beside it)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mesh.auth import store as identities
from mesh.cache import codec
from mesh.cache.node_cache import NodeCache
from mesh.cache.provenance import Provenance, data_digest
from mesh.config import CacheConfig
from mesh.model import Decoder, load_model
from tests.conftest import CACHE_ROOT

torch.set_num_threads(1)
N = 300


def median_us(f, n: int = N) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 1)


loaded = load_model(CACHE_ROOT, "smollm2-135m", threads=1)
cache = NodeCache(loaded, CacheConfig(), Decoder(loaded))
ids = cache.decoder.encode("The following are multiple choice questions (with answers) about astronomy.\n\n"
                           "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:")
cache.prepare_local(ids)
keys, pkey = cache.keys(ids)
chunk = cache.store.get_chain(keys[:1])[0]
entry = cache.store.get_prompt(pkey)

with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp)
    for name in ("b", "c"):
        identities.issue(d, name, "node")
    signer = Provenance(identities.load_keyring(d, "b", enrol=False), cache.digest)
    checker = Provenance(identities.load_keyring(d, "c", enrol=False), cache.digest)
    node_signer = Provenance(signer.keys, cache.digest, codecs=("fp16", "int8"))
    fp16_signer = Provenance(signer.keys, cache.digest, codecs=("fp16",))

proof = signer.sign_chunk(keys[0], chunk)
wire = codec.encode_chunk(chunk, "fp16", key=keys[0], model=cache.digest)
wire["prov"] = proof.sealed
checker.check_chunk(wire, keys[0])  # the signer's certificate verified once, then cached

out = {
    "chunk": {"tokens": chunk.length, "stored_bytes": chunk.nbytes, "stored_dtype": str(chunk.keys[0].dtype),
              "fp16_wire_bytes": sum(len(t["data"]) for layer in wire["layers"] for t in layer.values())},
    "proof_bytes": len(proof.sealed),
    "sign_chunk_us": median_us(lambda: signer.sign_chunk(keys[0], chunk)),
    # what a node signs for (its wire codec fp16, and int8; not fp32: mesh.cache.node_cache)
    "sign_chunk_fp16_int8_us": median_us(lambda: node_signer.sign_chunk(keys[0], chunk)),
    "sign_chunk_fp16_only_us": median_us(lambda: fp16_signer.sign_chunk(keys[0], chunk)),
    "sign_prompt_us": median_us(lambda: signer.sign_prompt(pkey, entry["tail"], entry["logits"])),
    "check_chunk_fp16_us": median_us(lambda: checker.check_chunk(wire, keys[0])),
    "digest_fp16_us": median_us(lambda: data_digest(wire["layers"])),
    "serve_check_fp16_us": median_us(lambda: data_digest(wire["layers"]) == proof.manifest.digests["fp16"]),
    "encode_fp16_us": median_us(lambda: codec.encode_chunk(chunk, "fp16", key=keys[0], model=cache.digest)),
    "seal_manifest_us": median_us(lambda: signer.keys.seal(proof.manifest.pack(), "mesh/v1/kv-chunk")),
    "runs": N, "threads": 1,
}
print(json.dumps(out, indent=1))
(Path(__file__).with_suffix(".json")).write_text(json.dumps(out, indent=1) + "\n")
