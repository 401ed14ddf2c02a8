"""Shared pieces of the handler fuzz tests: a tiny random-weight model with a real tokenizer, and
generators of garbage that looks like each kind of mesh message.

The model has SmolLM2's architecture (LLaMA) and its real tokenizer, with two small layers of
random weights: handlers tokenize, route, slice neuron groups and serve KV chunks exactly as on
a real node, in milliseconds.

Generators take a ``random.Random`` that hypothesis draws (``st.randoms()``), so hypothesis owns
the randomness (reproducible, shrinkable) while a payload costs microseconds to build: composite
hypothesis strategies cost ~10 ms per example on this machine, which 19 handlers x 10,000
examples cannot afford. Payloads mix five sources so most get past the CBOR layer and reach the
handler's own checks: a valid envelope with meaningful field values for its kind, or one field
replaced by an arbitrary CBOR value, removed, or added; a valid envelope of another kind; a valid
envelope with one value replaced by hostile structure (:data:`HOSTILE`: value sharing, semantic
tags, deep nesting, huge declared lengths, indefinite lengths, non-text keys); a valid envelope
with byte-level damage (flips, cuts, insertions, splices); plain random bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from mesh import topics, wire
from mesh.cache.catalog import Catalog
from mesh.model import LoadedModel

Rnd = random.Random
Gen = Callable[[Rnd], Any]


def tiny_loaded(model_dir: Any, seed: int = 0) -> LoadedModel:
    """SmolLM2's architecture and tokenizer, 2 layers of random weights (MLP: two groups of 64)."""
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 64, 128, 2
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    meta = {"gguf_sha256": f"{seed:064x}", "format": "tiny-random"}
    return LoadedModel(key="tiny-smollm2", model=model, tokenizer=tok, meta=meta,
                       eos_ids=frozenset({int(cfg.eos_token_id)}))


# -- small building blocks -------------------------------------------------------------------------

def pick(r: Rnd, *choices: Any) -> Any:
    """One of ``choices``; a callable choice is called with ``r`` (a generator)."""
    c = r.choice(choices)
    return c(r) if callable(c) else c


def rbytes(r: Rnd, n: int) -> bytes:
    return r.randbytes(r.randint(0, n))


_ALPHABET = "ab z09_-./+#\0\n\té€😀\u200b"


def rtext(r: Rnd, n: int = 24) -> str:
    return "".join(r.choice(_ALPHABET) for _ in range(r.randint(0, n)))


SPECIAL_NUMBERS = (0, 1, -1, 2 ** 31, 2 ** 63, 2 ** 64, 4096, 4097, 1024, 1025, 32_000, 32_001, 2 ** 1100,
                   -(10 ** 400), 1e308, 1e-300, float("inf"), float("-inf"), float("nan"), -0.0, 0.5)
SPECIAL_TEXTS = ("", "\n", "x" * 65, "mesh/v1/node/n/status", "fp16", "int8", "json", "online", "\0")


def leaf(r: Rnd) -> Any:
    return pick(r, None, True, False, lambda r: r.randint(-(2 ** 70), 2 ** 70), lambda r: r.randint(-3, 70),
                lambda r: r.choice(SPECIAL_NUMBERS), lambda r: r.uniform(-1e6, 1e6), rtext,
                lambda r: rbytes(r, 24), lambda r: r.choice(SPECIAL_TEXTS))


def cbor_value(r: Rnd, depth: int = 0) -> Any:
    """Any CBOR value: leaves, and lists and maps nested up to 3 deep."""
    kind = r.random()
    if depth >= 3 or kind < 0.7:
        return leaf(r)
    if kind < 0.85:
        return [cbor_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {pick(r, rtext, lambda r: r.randint(0, 9)): cbor_value(r, depth + 1) for _ in range(r.randint(0, 3))}


# Reply topics worth trying: allowed ones, control topics a forged ask must not make a node write,
# wildcards, empty and oversized.
REPLY_TOPICS = (None, "mesh/v1/reply/fuzz", "mesh/v1/answer", "home/answer", "mesh/v1/node/n1/status",
                "mesh/v1/node/n1/heartbeat", "homeassistant/status", "mesh/v1/route", "a/+/b", "#", "",
                "$SYS/x", "x" * 300, "a\0b")


def reply_topic(r: Rnd) -> Any:
    return r.choice(REPLY_TOPICS) if r.random() < 0.8 else cbor_value(r)


def envelope_dict(kind: wire.Kind, body: dict[str, Any], corr: Any = "c0",
                  reply_to: Any = "mesh/v1/reply/fuzz", sender: Any = "fuzz") -> dict[str, Any]:
    return {"v": wire.WIRE_VERSION, "k": kind.value, "s": sender, "c": corr, "r": reply_to, "b": dict(body)}


def dumps(obj: Any) -> bytes:
    try:
        return cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, TypeError, ValueError):  # a value cbor2 cannot encode: its repr is garbage too
        return repr(obj).encode()


def damaged(r: Rnd, base: bytes) -> bytes:
    """``base`` with byte flips, a cut, an insertion or a splice."""
    data = bytearray(base)
    how = r.randrange(4)
    if how == 0:
        for _ in range(r.randint(1, 6)):
            data[r.randrange(len(data))] = r.randrange(256)
    elif how == 1:
        del data[r.randrange(len(data)):]
    elif how == 2:
        i = r.randint(0, len(data))
        data[i:i] = r.randbytes(r.randint(1, 12))
    else:
        i, j = sorted((r.randint(0, len(data)), r.randint(0, len(data))))
        data[i:j] = rbytes(r, 24)
    return bytes(data)


# -- hostile structure: what a bounded decoder must refuse in bounded time ----------------------------

def cbor_head(major: int, n: int) -> bytes:
    """A CBOR item header: major type and argument, in the shortest form."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(f"{n} does not fit a CBOR header")


def shared_dag(r: Rnd, levels: int | None = None, fan: int | None = None) -> bytes:
    """The review's C1 structure: shareable #i is a list (or map) of ``fan`` references to #i-1, so
    a walk without a visited set visits ``fan ** (levels - 1)`` nodes."""
    levels = levels if levels is not None else r.randint(2, 24)
    fan = fan if fan is not None else r.randint(2, 8)
    as_map = r.random() < 0.2
    items = [b"\xd8\x1c" + cbor_head(4, 1) + b"\x00"]  # shareable #0 = [0]
    for i in range(1, levels):
        ref = b"\xd8\x1d" + cbor_head(0, i - 1)
        if as_map:
            items.append(b"\xd8\x1c" + cbor_head(5, fan) + b"".join(cbor_head(3, 1) + bytes([97 + j]) + ref
                                                                  for j in range(fan)))
        else:
            items.append(b"\xd8\x1c" + cbor_head(4, fan) + ref * fan)
    return cbor_head(4, len(items)) + b"".join(items)


def _tagged(r: Rnd) -> bytes:
    from mesh.cbor_bounds import BUILTIN_TAGS

    tag = pick(r, lambda r: r.choice(BUILTIN_TAGS), lambda r: r.randrange(1 << r.choice((5, 8, 16, 32, 64))))
    inner = dumps(pick(r, leaf, lambda r: [1, 2], lambda r: {"a": 1}, b"\0" * 9, "2026-12-06T00:00:00Z"))
    return cbor_head(6, tag) + inner


def _deep(r: Rnd) -> bytes:
    depth = r.randint(17, 3000)
    if r.random() < 0.5:
        return b"\x81" * depth + b"\x00"
    return (b"\xa1\x61a") * depth + b"\x00"


def _huge_length(r: Rnd) -> bytes:
    major = r.choice((2, 3, 4, 5))
    n = r.choice((2**63, 2**64 - 1, 2**32, 2**31 - 1, 10**9, 65_536, r.randint(17, 1 << 20)))
    return cbor_head(major, n) + r.randbytes(r.randint(0, 16))


def _indefinite(r: Rnd) -> bytes:
    start = r.choice((b"\x9f", b"\xbf", b"\x5f", b"\x7f"))
    body = {b"\x9f": b"\x01\x02", b"\xbf": b"\x61a\x01", b"\x5f": b"\x41a", b"\x7f": b"\x61a"}[start]
    return start + body * r.randint(0, 4) + (b"\xff" if r.random() < 0.7 else b"")


def _bad_keys(r: Rnd) -> bytes:
    keys = pick(r, lambda r: [i * (2**61 - 1) for i in range(1, r.randint(2, 64))],  # one hash for all
                lambda r: [r.randint(-9, 9)], lambda r: [1.5, -0.0], lambda r: [b"k", b"j"])
    return cbor_head(5, len(keys)) + b"".join(dumps(k) + b"\x00" for k in keys)


def shared_heartbeat(levels: int, fan: int = 4, sender: str = "zz") -> bytes:
    """The security review's ``dag.py`` byte for byte: a heartbeat envelope whose body shares one
    list ``levels`` deep (``levels`` 13: 219 bytes, 14: 234 bytes)."""
    head = cbor_head

    def text(t: str) -> bytes:
        return head(3, len(t.encode())) + t.encode()

    elems = [b"\xd8\x1c" + head(4, 1) + b"\x00"]  # shareable #0 = [0]
    for i in range(1, levels):  # shareable #i = [#(i-1)] * fan
        elems.append(b"\xd8\x1c" + head(4, fan) + (b"\xd8\x1d" + head(0, i - 1)) * fan)
    body = head(5, 1) + text("pad") + head(4, len(elems)) + b"".join(elems)
    return (head(5, 6) + text("v") + b"\x01" + text("k") + text("heartbeat") + text("s") + text(sender)
            + text("c") + b"\xf6" + text("r") + b"\xf6" + text("b") + body)


HOSTILE = {"shared": shared_dag, "tag": _tagged, "deep": _deep, "huge-length": _huge_length,
           "indefinite": _indefinite, "bad-key": _bad_keys}


def hostile_value(r: Rnd, family: str | None = None) -> bytes:
    """The raw CBOR bytes of one value the mesh never sends, of ``family`` (one of HOSTILE) or any."""
    return HOSTILE[family or r.choice(sorted(HOSTILE))](r)


_MARK = b"\x5a\x17" * 8  # 16 bytes no generator produces: spliced out for the hostile bytes


def hostile_payload(r: Rnd, kind: wire.Kind, body: dict[str, Any], family: str | None = None) -> bytes:
    """A canonical envelope of ``kind`` where one value (a body field, an extra field, the body
    itself, or an envelope field) is replaced by :func:`hostile_value` bytes."""
    env = envelope_dict(kind, body)
    where = r.random()
    if where < 0.15:
        env["b"] = _MARK
    elif where < 0.25:
        env[r.choice(("s", "c", "r"))] = _MARK
    else:
        key = r.choice([*sorted(body), "zz"])
        env["b"] = {**body, key: _MARK}
    data = cbor2.dumps(env, canonical=True)
    return data.replace(cbor_head(2, len(_MARK)) + _MARK, hostile_value(r, family), 1)


def paths(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) of the maps and lists nested in ``obj``, depth first: the
    places a structured mutation may change."""
    out: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        c = stack.pop()
        items = c.items() if isinstance(c, dict) else enumerate(c) if isinstance(c, list) else ()
        for k, v in items:
            out.append((c, k))
            if isinstance(v, dict | list):
                stack.append(v)
    return out


def hostile_at(r: Rnd, env: dict[str, Any], family: str | None = None) -> bytes:
    """The canonical CBOR of ``env`` (an envelope dict) with one value at any depth replaced by
    :func:`hostile_value` bytes: hostile structure deep inside an otherwise valid message."""
    import copy

    env = copy.deepcopy(env)
    container, key = r.choice(paths(env))
    container[key] = _MARK
    data = cbor2.dumps(env, canonical=True)
    return data.replace(cbor_head(2, len(_MARK)) + _MARK, hostile_value(r, family), 1)


def raw_envelope(kind: wire.Kind, body: dict[str, Any], sender: str = "t", corr: str | None = None,
                 reply_to: str | None = None) -> bytes:
    """An envelope laid out as the mesh's encoder does it, without the encoder's own checks."""
    return cbor2.dumps({"v": wire.WIRE_VERSION, "k": kind.value, "s": sender, "c": corr, "r": reply_to,
                        "b": body}, canonical=True)


def of_size(kind: wire.Kind, size: int, body: dict[str, Any] | None = None, exact: bool = True,
            **env: Any) -> bytes:
    """A valid envelope of ``kind`` exactly ``size`` bytes long (unknown body fields pad it). With
    ``exact=False``, the shortest one of at least ``size`` bytes when none is exactly that long
    (a few sizes just above the unpadded envelope cannot be reached). ``env``: sender, corr, reply_to."""
    base = dict(body if body is not None else _BODIES[kind])
    candidates = [raw_envelope(kind, base, **env)]
    for extra in ({}, {"zy": b""}, {"zy": b"", "zx": b""}):
        n0 = size - len(raw_envelope(kind, {**base, **extra, "zz": b""}, **env))
        for n in range(max(0, n0 - 12), max(0, n0) + 1):
            candidates.append(raw_envelope(kind, {**base, **extra, "zz": b"\0" * n}, **env))
    for data in candidates:
        if len(data) == size:
            return data
    if not exact:
        return min((d for d in candidates if len(d) >= size), key=len, default=candidates[0])
    raise AssertionError(f"no {kind} envelope of exactly {size} bytes")


def of_items(kind: wire.Kind, items: int, body: dict[str, Any] | None = None, **env: Any) -> bytes:
    """A valid envelope of ``kind`` holding exactly ``items`` CBOR items (an unknown list field)."""
    from mesh.cbor_bounds import scan

    base = dict(body if body is not None else _BODIES[kind])
    n = items - scan(raw_envelope(kind, {**base, "zz": []}, **env), 1 << 30).items
    data = raw_envelope(kind, {**base, "zz": [0] * n}, **env)
    assert scan(data, 1 << 30).items == items
    return data


def field_mutated(r: Rnd, env: dict[str, Any], body_fields: Gen | None = None) -> bytes:
    """A valid envelope with fields from ``body_fields`` (meaningful values for the kind), or one
    envelope or body field replaced by an arbitrary value, removed, or added."""
    env = {**env, "b": dict(env["b"])}
    if body_fields is not None and r.random() < 0.5:
        env["b"].update(body_fields(r))
        if r.random() < 0.25:
            env["r"] = reply_topic(r)
        return dumps(env)
    target = env if r.random() < 0.33 else env["b"]
    keys = sorted(target, key=str)
    op = r.randrange(4)
    if op == 0 or not keys:
        target[rtext(r, 6)] = cbor_value(r)
    elif op == 1:
        del target[r.choice(keys)]
    else:
        key = r.choice(keys)
        target[key] = reply_topic(r) if key == "r" else cbor_value(r)
    return dumps(env)


def optional_fields(r: Rnd, fields: dict[str, Gen]) -> dict[str, Any]:
    """A random subset of ``fields``, each value drawn from its generator."""
    return {k: g(r) for k, g in fields.items() if r.random() < 0.5}


def valid_bodies() -> dict[wire.Kind, dict[str, Any]]:
    return {
        wire.Kind.HEARTBEAT: {"seq": 1, "model": "tiny-smollm2", "model_key": "k", "queue": 0, "load": 0.1,
                              "prefill_tps": 9.0},
        wire.Kind.ASK: {"text": "hi", "max_new_tokens": 4, "stop": ["\n"]},
        wire.Kind.TOKEN: {"i": 0, "text": "a"},
        wire.Kind.ANSWER: {"text": "a", "node": "n", "prompt_tokens": 1, "new_tokens": 1, "ttft_s": 0.1,
                           "ttlt_s": 0.2},
        wire.Kind.ERROR: {"reason": "busy", "message": "m"},
        wire.Kind.PING: {"t": 1.0},
        wire.Kind.CATALOG: Catalog.from_keys(b"m" * 16, 16, [bytes([i]) * 16 for i in range(5)],
                                             capacity=64).to_dict(),
        wire.Kind.KV_FETCH: {"keys": [b"k" * 16], "codec": "fp16", "model": b"m" * 16},
        wire.Kind.KV_CHUNKS: {"chunks": [], "part": 0, "last": True},
        wire.Kind.HALO_PLAN: {"epoch": 1, "plan": {}},
        wire.Kind.HALO_ACK: {"epoch": 1},
        wire.Kind.ROUTED: {"node": "n1"},
        wire.Kind.KV_EVIDENCE: {"ids": [1, 2, 3], "unit": 0, "chunk": {}},
    }


_BODIES = valid_bodies()
_KINDS = sorted(_BODIES)


def cbor_payload(kind: wire.Kind, body: dict[str, Any] | None = None, body_fields: Gen | None = None,
                 corr: Gen = lambda r: "c0", sender: Gen = lambda r: "fuzz") -> Gen:
    """A generator of garbage for a handler that expects ``kind``: mostly near-valid envelopes."""
    base_body = body if body is not None else _BODIES[kind]
    base = dumps(envelope_dict(kind, base_body))

    def gen(r: Rnd) -> bytes:
        how = r.random()
        if how < 0.55:
            return field_mutated(r, envelope_dict(kind, base_body, corr=corr(r), sender=sender(r)), body_fields)
        if how < 0.65:
            k = r.choice(_KINDS)
            return dumps(envelope_dict(k, _BODIES[k], corr=corr(r), sender=sender(r)))
        if how < 0.8:
            return hostile_payload(r, kind, base_body)
        if how < 0.93:
            return damaged(r, base)
        return rbytes(r, 64)

    return gen


def json_ask(r: Rnd) -> bytes:
    """Garbage for ``mesh/v1/ask``: near-valid JSON objects, damaged JSON, random bytes."""
    base = {"text": "turn on the light", "reply_to": "homeassistant-mesh/answer", "max_new_tokens": 8, "id": "a1"}
    how = r.random()
    if how < 0.1:
        return rbytes(r, 64)
    if how < 0.3:
        return damaged(r, json.dumps(base).encode())
    obj: dict[str, Any] = dict(base)
    for _ in range(r.randint(1, 3)):
        key = r.choice([*base, "extra"])
        if key in obj and r.random() < 0.3:
            del obj[key]
        else:
            obj[key] = pick(r, reply_topic, lambda r: r.randint(-5, 2000), rtext, None, 1.5, [1, 2],
                            lambda r: "x" * r.choice([1, 32_000, 70_000]), " ", {"a": 1}, True)
    try:
        return json.dumps(obj).encode()
    except (TypeError, ValueError):
        return repr(obj).encode()


def text_ask(r: Rnd) -> bytes:
    return pick(r, lambda r: rbytes(r, 64), lambda r: rtext(r, 40).encode(), b"", b"   ", b"\xff\xfe",
                b"hello", b"x" * 70_000, b"\x00")


STATUS_PAYLOADS = (topics.ONLINE, topics.OFFLINE, b"", b"Online", b"online\n", b"offline ", b"\x00", b"garbage")


def status_payload(r: Rnd) -> bytes:
    return r.choice(STATUS_PAYLOADS) if r.random() < 0.7 else rbytes(r, 16)


# What a broker can deliver on ``mesh/v1/node/+/<leaf>``: one level, no wildcard, no NUL.
NODE_NAMES = ("peer1", "a", "zz", "n-1_2", "fuzznode", "coordinator", "bad.name", "", "x" * 65, "é")


def node_name(r: Rnd) -> str:
    if r.random() < 0.7:
        return r.choice(NODE_NAMES)
    return "".join(r.choice("ab09_-.é €") for _ in range(r.randint(0, 8)))


def node_topic(leaf_name: str) -> Gen:
    return lambda r: f"{topics.ROOT}/node/{node_name(r)}/{leaf_name}"


def one_of(*gens: Gen) -> Gen:
    return lambda r: r.choice(gens)(r)


def choice(values: Sequence[Any]) -> Gen:
    return lambda r: r.choice(values)
