"""The honest audit difference (mesh.cache.audit.chunk_error / logits_error) on SmolLM2-135M.

A peer NodeCache computes six prompts; an asker fetches each (a full hit) in each wire codec, then
recomputes every fetched chunk over the prefix it holds before it (the audit's one-chunk prefill)
and the prompt's last position, and compares. The poisoned line: the KV of the same prompt with
its first token changed, under the same keys (the liar of tests/cache/test_provenance.py).
Prints the largest error per codec, the poisoned errors' smallest, and an audit's cost.

    HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/audit_tolerance.py
"""

from __future__ import annotations

import time

import torch

from mesh.cache import audit, kv as kvstate
from mesh.cache.node_cache import NodeCache
from mesh.cache.transfer import payload_bytes
from mesh.config import CacheConfig
from mesh.model import Decoder, load_model
from tests.cache.kit import FAST, Q1, Q2, SLOW_CPU
from tests.conftest import CACHE_ROOT

PROMPTS = [Q1, Q2, Q1.replace("astronomy", "botany"), "The quick brown fox " * 12,
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3,
           "Question: What is the capital of France? Answer with one word. " * 5]


def main() -> None:
    loaded = load_model(CACHE_ROOT, "smollm2-135m")
    dec = Decoder(loaded)
    cfg = loaded.model.config
    C = 16
    worst: dict[str, float] = {}
    worst_logits: dict[str, float] = {}
    errs: list[float] = []
    poisoned_min = float("inf")
    times: list[float] = []
    for codec_name in ("fp32", "fp16", "int8"):
        config = CacheConfig(kv_wire=codec_name, fetch_timeout_s=5.0)
        peer = NodeCache(loaded, config, dec)
        for text in PROMPTS:
            ids = dec.encode(text)
            peer.prepare_local(ids)
            asker = NodeCache(loaded, config, dec)
            asker.set_peer_catalog("b", peer.catalog().to_dict())

            def fetch(p: str, keys: list[bytes], pkey: bytes | None, timeout: float):  # type: ignore[no-untyped-def]
                return ((b, payload_bytes(b)) for b in peer.serve(keys, pkey, codec_name, 1 << 30, part_bytes=1))

            got = asker.prepare(ids, SLOW_CPU, FAST, fetch)
            got.finish()
            keys, pkey = asker.keys(ids)
            held = asker.store.get_chain(keys)
            assert len(held) == len(keys), (len(held), len(keys))
            for i, chunk in enumerate(held):
                t0 = time.perf_counter()
                cache = kvstate.restore_cache(cfg, held[:i], capture=True)
                dec.prefill(ids[:(i + 1) * C], cache, start=i * C)
                mine = kvstate.cut_chunks(cache, i, 1, C)[0]
                times.append(time.perf_counter() - t0)
                err = audit.chunk_error(chunk, mine)
                worst[codec_name] = max(worst.get(codec_name, 0.0), err)
                if codec_name == "int8":
                    errs.append(err)
            prompt = asker.store.get_prompt(pkey)
            n = len(keys)
            cache = kvstate.restore_cache(cfg, held, capture=True)
            logits, _ = dec.prefill(ids, cache, start=n * C) if len(ids) > n * C else \
                dec.prefill(ids, kvstate.restore_cache(cfg, held[:-1], capture=True), start=(n - 1) * C)
            worst_logits[codec_name] = max(worst_logits.get(codec_name, 0.0), audit.logits_error(prompt["logits"], logits))
            if codec_name == "int8":  # the liar: the same prompt with another first token
                other = [ids[1] if ids[0] != ids[1] else ids[0] + 1, *ids[1:]]
                donor = NodeCache(loaded, config, dec)
                donor.prepare_local(other)
                lie = donor.store.get_chain(donor.keys(other)[0])
                for i, chunk in enumerate(held):
                    cache = kvstate.restore_cache(cfg, held[:i], capture=True)
                    dec.prefill(ids[:(i + 1) * C], cache, start=i * C)
                    mine = kvstate.cut_chunks(cache, i, 1, C)[0]
                    poisoned_min = min(poisoned_min, audit.chunk_error(lie[i], mine))
    times.sort()
    print("honest chunk_error max per codec:", {k: round(v, 5) for k, v in worst.items()})
    print("honest logits_error max per codec:", {k: round(v, 5) for k, v in worst_logits.items()})
    errs.sort()
    print("int8 honest chunk_error median, p90:", round(errs[len(errs) // 2], 5), round(errs[9 * len(errs) // 10], 5))
    print("poisoned chunk_error min:", round(poisoned_min, 4))
    print(f"one-chunk recompute: median {1e3 * times[len(times) // 2]:.1f} ms, max {1e3 * times[-1]:.1f} ms "
          f"over {len(times)} chunks")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
