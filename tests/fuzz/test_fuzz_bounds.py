"""Hostile structure through the real decoders: 10,000 payloads per message kind, each a valid
envelope of that kind with one value replaced by something the mesh never sends (``fuzzkit.HOSTILE``:
value sharing, semantic tags, deep nesting, huge declared lengths, indefinite lengths, non-text keys).

Every one must be refused with a structural reason (nothing else escapes, nothing is accepted),
and refusing must cost no more than decoding a harmless payload of the same size: the decode time
of each family is compared, as a ratio measured side by side, with valid envelopes of the same
kind and byte length (at most ``MAX_RATIO``), never with an absolute time. (A payload over its
kind's byte cap is refused by its length before any scan; those are not timed. The few sizes
just above a kind's unpadded envelope that no padding reaches are compared with the next size.) The handlers see the
same generators through ``fuzzkit.cbor_payload`` (test_fuzz_handlers.py).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.cache import codec as kvcodec
from mesh.cache.catalog import Catalog
from mesh.errors import ProtocolError
from mesh.halo.placement import Plan
from tests.fuzz import fuzzkit

EXAMPLES = 10_000  # payloads per kind
BATCH = 20  # payloads per hypothesis example (hypothesis owns the seeds)
TIMED = 40  # payloads per family and kind whose decode time is compared
REPS = 7  # best of REPS for each timing, hostile and harmless alike
MAX_RATIO = 10.0
STRUCTURAL = {"shared-value", "cbor-tag", "too-deep", "too-many-items", "malformed", "indefinite-length",
              "bad-key", "oversized"}
FUZZ = settings(max_examples=EXAMPLES // BATCH, deadline=None, suppress_health_check=list(HealthCheck),
                database=None, phases=(Phase.explicit, Phase.generate))
BODIES = {**fuzzkit.valid_bodies(),  # a plan that Plan.from_dict accepts: harmless payloads decode fully
          wire.Kind.HALO_PLAN: {"epoch": 1, "plan": Plan(1, "k", 64, 2, {"w1": ((0,), (1,))}, ((1,), (0,))).to_dict()}}


def decode_all(payload: bytes) -> None:
    """What a node does with a payload: the envelope, then the kind's own decoder."""
    env = wire.decode(payload)
    body = dict(env.body)
    if env.kind is wire.Kind.CATALOG:
        Catalog.from_dict(body)
    elif env.kind is wire.Kind.KV_CHUNKS:
        for chunk in body["chunks"]:
            kvcodec.decode_chunk(chunk, [(2, 4)] * 2, 16)
    elif env.kind is wire.Kind.HALO_PLAN:
        Plan.from_dict(body["plan"])


def best_ns(payload: bytes) -> int:
    best = 1 << 62
    for _ in range(REPS):
        t0 = time.perf_counter_ns()
        try:
            decode_all(payload)
        except ProtocolError:
            pass
        best = min(best, time.perf_counter_ns() - t0)
    return best


@pytest.mark.parametrize("kind", list(wire.Kind), ids=str)
def test_hostile_structure_is_refused_in_bounded_time(kind: wire.Kind) -> None:
    reasons: Counter[str] = Counter()
    timed: dict[str, list[bytes]] = defaultdict(list)
    families = sorted(fuzzkit.HOSTILE)

    @FUZZ
    @given(st.integers(0, 2**64))
    def run(seed: int) -> None:
        rnd = fuzzkit.Rnd(seed)
        for i in range(BATCH):
            family = families[i % len(families)]
            payload = fuzzkit.hostile_payload(rnd, kind, BODIES[kind], family)
            assert b"\x5a\x17" * 8 not in payload  # the hostile value was spliced in
            with pytest.raises(ProtocolError) as refused:
                decode_all(payload)
            assert refused.value.reason in STRUCTURAL, (family, refused.value, payload[:120])
            reasons[refused.value.reason] += 1
            # Beyond the kind's byte cap a payload is refused by its length alone; below it, the
            # scan runs: those are the ones whose cost is compared.
            if len(timed[family]) < TIMED and len(payload) <= wire.KIND_CAPS[kind].bytes:
                timed[family].append(payload)

    run()
    assert sum(reasons.values()) >= EXAMPLES
    assert {"shared-value", "cbor-tag", "too-deep", "malformed", "indefinite-length", "bad-key"} <= set(reasons)
    for family, payloads in timed.items():
        hostile = sum(best_ns(p) for p in payloads)
        harmless_payloads = [fuzzkit.of_size(kind, len(p), BODIES[kind], exact=False) for p in payloads]
        for h in harmless_payloads:
            decode_all(h)  # harmless indeed: it decodes
        harmless = sum(best_ns(h) for h in harmless_payloads)
        assert hostile <= MAX_RATIO * harmless, (
            f"{family}: refusing {len(payloads)} hostile {kind} payloads took {hostile / harmless:.1f}x "
            f"the time of harmless ones of the same sizes")


@pytest.mark.parametrize("levels", [13, 14, 16, 20, 24])
def test_the_review_heartbeat_costs_no_more_than_a_harmless_one(levels: int) -> None:
    """The review's payload at 219 bytes and beyond (each level multiplied the old walk by 4)."""
    payload = fuzzkit.shared_heartbeat(levels)
    harmless = fuzzkit.of_size(wire.Kind.HEARTBEAT, len(payload))
    assert len(harmless) == len(payload)
    with pytest.raises(ProtocolError) as refused:
        decode_all(payload)
    assert refused.value.reason == "shared-value"
    assert best_ns(payload) <= MAX_RATIO * best_ns(harmless)
