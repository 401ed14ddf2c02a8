"""The wire format: one versioned CBOR envelope for every mesh message.

Layout (a CBOR map, encoded canonically so the same envelope always gives the same bytes)::

    {"v": 1,            # WIRE_VERSION; anything else is rejected
     "k": "ask",        # message kind, one of Kind
     "s": "node1",      # sender name
     "c": "4f1c...",    # correlation id (str) or null
     "r": "mesh/v1/reply/cli-1" or null,   # reply topic: MQTT 3.1.1 has no response topic
     "b": {...}}        # body, checked against the kind's schema

Tensors travel inside bodies as ``{"dtype": "float16", "shape": [2, 3], "data": <bytes>}``,
little-endian, C order. Every payload is capped (``Limits.max_message_bytes``, then its kind's
:class:`Cap` in bytes and CBOR items) and decoded only within those bounds (``mesh.cbor_bounds``:
no semantic tags, no value sharing, no indefinite lengths; see :func:`decode`). Receivers turn every defect into a :class:`ProtocolError` whose ``reason`` keys the
rejection counters published in heartbeats; nothing from the network raises anything else.

The user-facing JSON ask on ``mesh/v1/ask`` (for Home Assistant and ``mosquitto_pub``) is the
one JSON format; :func:`decode_json_ask` checks it with the same discipline.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cbor2

from mesh import budget, cbor_bounds
from mesh.config import Limits
from mesh.errors import ProtocolError

WIRE_VERSION = 1
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class Kind(StrEnum):
    HEARTBEAT = "heartbeat"
    ASK = "ask"  # a prompt to answer (to a node, or to the router)
    TOKEN = "token"  # one streamed piece of an answer
    ANSWER = "answer"  # the final answer with its figures
    ERROR = "error"  # a request failed; body has reason and message
    PING = "ping"  # round-trip probe; echoed by the broker to its sender
    CATALOG = "catalog"  # a node's Bloom catalog of cached chunk keys (mesh.cache.catalog)
    KV_FETCH = "kv-fetch"  # ask a peer for KV chunks by key
    KV_CHUNKS = "kv-chunks"  # a peer's answer: the chunks it really holds (mesh.cache.kv codec)
    HALO_PLAN = "halo-plan"  # the coordinator's neuron-group placement (mesh.halo.placement.Plan)
    HALO_ACK = "halo-ack"  # a worker holds the weights of a plan epoch
    ROUTED = "routed"  # the router's word to an asker: which node took its ask (mesh.auth.senders)
    KV_EVIDENCE = "kv-evidence"  # a signed chunk and its prompt: a lie any node can re-check (mesh.cache.evidence)


# Body schemas: field -> (type or tuple of types, required). Unknown extra fields are allowed
# (forward compatibility within a version); known fields must have the right type.
_STR, _INT, _NUM, _BOOL = str, int, (int, float), bool
CACHE_FIGURES = "cache_figures"  # an ask's flag: its answer carries the cache block (mesh.member.shows_cache)
_SCHEMAS: dict[Kind, dict[str, tuple[Any, bool]]] = {
    Kind.HEARTBEAT: {"seq": (_INT, True), "model": (_STR, True), "model_key": (_STR, True),
                     "queue": (_INT, True), "load": (_NUM, True), "prefill_tps": (_NUM, True),
                     "rtt_ms": (_NUM, False), "served": (_INT, False), "rejects": (dict, False),
                     "answered": (list, False)},
    Kind.ASK: {"text": (_STR, True), "max_new_tokens": (_INT, True), "stop": (list, False),
               "reply_format": (_STR, False), "ask_id": (_STR, False), "model": (_STR, False), "routed_by": (_STR, False),
               "no_cache": (_BOOL, False), CACHE_FIGURES: (_BOOL, False), "stream_every_s": (_NUM, False)},
    Kind.TOKEN: {"i": (_INT, True), "text": (_STR, True)},
    Kind.ANSWER: {"text": (_STR, True), "node": (_STR, True), "prompt_tokens": (_INT, True),
                  "new_tokens": (_INT, True), "ttft_s": (_NUM, True), "ttlt_s": (_NUM, True)},
    Kind.ERROR: {"reason": (_STR, True), "message": (_STR, True)},
    Kind.PING: {"t": (_NUM, True), "pad": (bytes, False)},
    Kind.CATALOG: {"v": (_INT, True), "model": (bytes, True), "chunk": (_INT, True), "epoch": (_INT, True),
                   "n": (_INT, True), "m": (_INT, True), "k": (_INT, True), "bits": (bytes, True),
                   "kid": (bytes, False)},
    Kind.KV_FETCH: {"keys": (list, True), "prompt_key": (bytes, False), "codec": (_STR, True),
                    "model": (bytes, True)},
    Kind.KV_CHUNKS: {"chunks": (list, True), "prompt": (dict, False), "part": (_INT, True),
                     "last": (_BOOL, True)},
    Kind.HALO_PLAN: {"epoch": (_INT, True), "plan": (dict, True)},
    Kind.HALO_ACK: {"epoch": (_INT, True)},
    Kind.ROUTED: {"node": (_STR, True)},
    Kind.KV_EVIDENCE: {"ids": (list, True), "unit": (_INT, True), "chunk": (dict, False), "prompt": (dict, False)},
}


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    sender: str
    body: Mapping[str, Any] = field(default_factory=dict)
    corr: str | None = None
    reply_to: str | None = None
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class Cap:
    """What one envelope of a kind may cost on the wire: bytes and CBOR items (``mesh.cbor_bounds``)."""

    bytes: int
    items: int


_KIB, _MIB = 1024, 1024 * 1024
MAX_EVAL_IDS = 4_096  # token ids an evaluation ask (``halo_eval``, mesh.halo.evaluate) may carry


def kind_caps(limits: Limits) -> dict[Kind, Cap]:
    """Each kind's cap, from what the mesh really sends (one line each); ``limits.max_message_bytes``
    caps them all on top."""
    return {
        # one node's figures (load, link, cache, HALO, reject counters) plus a few fields per peer it
        # knows (peer catalogs, wasted fetches): room for hundreds of peers.
        Kind.HEARTBEAT: Cap(64 * _KIB, 4_096),
        # the prompt at 4 UTF-8 bytes per character, plus 8 stop strings and the fields; twice, for
        # a router's forward carries the asker's sealed ask inside (mesh.auth.senders); or an
        # evaluation's token ids (5 bytes each at most) and the four MMLU letters.
        Kind.ASK: Cap(8 * limits.max_prompt_chars + 32 * _KIB, 256 + MAX_EVAL_IDS + 4),
        # one streamed piece of text: a few tokens.
        Kind.TOKEN: Cap(16 * _KIB, 64),
        # max_new_tokens tokens of text (<= 128 B each) and their ids, plus the timing and cache figures.
        Kind.ANSWER: Cap(160 * limits.max_new_tokens + 64 * _KIB, limits.max_new_tokens + 1_024),
        # a reason and an exception's message.
        Kind.ERROR: Cap(16 * _KIB, 64),
        # a bandwidth probe pads a ping to mesh.uplink_probe.BANDWIDTH_PROBE_BYTES (256 KiB).
        Kind.PING: Cap(256 * _KIB + 4 * _KIB, 64),
        # a Bloom filter of at most mesh.cache.catalog.MAX_BITS bits (16 MiB of filter) and 8 fields.
        Kind.CATALOG: Cap(16 * _MIB + 4 * _KIB, 64),
        # at most mesh.cache.transfer.MAX_KEYS (4,096) 16-byte keys.
        Kind.KV_FETCH: Cap(4_096 * 17 + 4 * _KIB, 4_096 + 64),
        # a part of chunks (half the message cap at most; one big chunk travels alone): a chunk holds
        # ~20 items per layer beside its tensor bytes, so items stay far below bytes / 16.
        Kind.KV_CHUNKS: Cap(limits.max_message_bytes, 1 << 18),
        # a partition of every layer's neuron groups among the workers (ints in lists).
        Kind.HALO_PLAN: Cap(1 * _MIB, 1 << 17),
        # an epoch and a group count.
        Kind.HALO_ACK: Cap(4 * _KIB, 64),
        # a node's name.
        Kind.ROUTED: Cap(4 * _KIB, 64),
        # one chunk (or a prompt's tail and top-k logits) as it was signed, fp32 at worst (SmolLM2:
        # 0.7 MiB, Gemma-3 270M: 0.6 MiB), and the prompt's token ids up to it (5 bytes, 1 item each).
        Kind.KV_EVIDENCE: Cap(4 * _MIB, 1 << 16),
    }


KIND_CAPS: dict[Kind, Cap] = kind_caps(Limits())


def _check_body(kind: Kind, body: Any) -> None:
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "body is not a map")
    for key, (types, required) in _SCHEMAS[kind].items():
        if key not in body:
            if required:
                raise ProtocolError("missing-field", f"{kind} body lacks {key!r}")
            continue
        value = body[key]
        if isinstance(value, bool) and types is not _BOOL:
            raise ProtocolError("bad-field", f"{kind}.{key} is a bool")
        if not isinstance(value, types):
            raise ProtocolError("bad-field", f"{kind}.{key} has type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("bad-field", f"{kind}.{key} is not finite")


def encode(env: Envelope, max_bytes: int = DEFAULT_MAX_BYTES, caps: Mapping[Kind, Cap] | None = None) -> bytes:
    """Envelope -> canonical CBOR bytes; raises ProtocolError if it breaks the contract (a body
    over its kind's byte cap included: receivers would refuse it)."""
    if env.version != WIRE_VERSION:
        raise ProtocolError("bad-version", f"cannot encode version {env.version}")
    kind = Kind(env.kind)
    _check_body(kind, dict(env.body))
    data = cbor2.dumps({"v": env.version, "k": kind.value, "s": env.sender, "c": env.corr,
                        "r": env.reply_to, "b": dict(env.body)}, canonical=True)
    limit = min(max_bytes, (caps or KIND_CAPS)[kind].bytes)
    if len(data) > limit:
        raise ProtocolError("oversized", f"{kind} of {len(data)} bytes > {limit}")
    return data


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES, caps: Mapping[Kind, Cap] | None = None) -> Envelope:
    """Untrusted bytes -> Envelope, or ProtocolError with a counted reason.

    Bounded before anything is built: the raw bytes are scanned (``mesh.cbor_bounds.scan``: no
    tags, no indefinite lengths, text keys, bounded depth and items) with the largest item budget
    a payload of this length may have; the scan yields the version and kind, so the kind's own
    caps (``caps``, default :data:`KIND_CAPS`; ``max_bytes`` on top) apply before cbor2 decodes;
    then the decoded value is walked with a visited set and the kind's item budget."""
    caps = caps or KIND_CAPS
    if len(payload) > max_bytes:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {max_bytes}")
    budget = max((c.items for c in caps.values() if c.bytes >= len(payload)), default=0)
    if budget == 0:
        raise ProtocolError("oversized", f"{len(payload)} bytes: more than any kind may have")
    scanned = cbor_bounds.scan(payload, budget)
    if payload[0] >> 5 != 5:  # CBOR major type 5: a map
        raise ProtocolError("malformed", "envelope is not a map")
    version, kind_name = scanned.top.get("v"), scanned.top.get("k")
    if version != WIRE_VERSION:
        raise ProtocolError("bad-version", f"version {version!r}")
    try:
        kind = Kind(kind_name)
    except ValueError:
        raise ProtocolError("unknown-kind", f"kind {kind_name!r}") from None
    cap = caps[kind]
    if len(payload) > min(cap.bytes, max_bytes):
        raise ProtocolError("oversized", f"{kind} of {len(payload)} bytes > {min(cap.bytes, max_bytes)}")
    if scanned.items > cap.items:
        raise ProtocolError("too-many-items", f"{kind} of {scanned.items} items > {cap.items}")
    raw = cbor_bounds.cbor2_loads(payload)
    cbor_bounds.walk(raw, cap.items)
    if not isinstance(raw, dict):
        raise ProtocolError("malformed", "envelope is not a map")
    if raw.get("v") != WIRE_VERSION or isinstance(raw.get("v"), bool) or raw.get("k") != kind.value:
        raise ProtocolError("malformed", "version or kind differ between the scan and the decoder")
    sender, corr, reply_to = raw.get("s"), raw.get("c"), raw.get("r")
    if not isinstance(sender, str) or not sender:
        raise ProtocolError("malformed", "sender is not a string")
    if corr is not None and not isinstance(corr, str):
        raise ProtocolError("malformed", "correlation id is not a string")
    if reply_to is not None:
        check_reply_topic(reply_to)
    body = raw.get("b")
    _check_body(kind, body)
    return Envelope(kind=kind, sender=sender, body=body, corr=corr, reply_to=reply_to)


def check_reply_topic(topic: Any) -> str:
    """A reply topic must be a plain topic a client may publish to: no wildcards, no NUL."""
    if not isinstance(topic, str) or not topic or len(topic) > 256:
        raise ProtocolError("bad-reply-topic", "reply topic missing or too long")
    if any(c in topic for c in "+#\0") or topic.startswith("$"):
        raise ProtocolError("bad-reply-topic", f"reply topic {topic[:64]!r} is not publishable")
    return topic


# --- tensors -------------------------------------------------------------------------------

_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}


def pack_tensor(tensor: Any) -> dict[str, Any]:
    """A torch tensor -> ``{"dtype", "shape", "data"}`` (little-endian, C order)."""
    import torch

    if sys.byteorder != "little":  # pragma: no cover - every target (x86, ARM) is little-endian
        raise ProtocolError("unsupported", "big-endian host")
    t = tensor.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ProtocolError("bad-tensor", f"dtype {name} not allowed on the wire")
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": name, "shape": list(t.shape), "data": data}


def unpack_tensor(obj: Any, max_elements: int = 1 << 28) -> Any:
    """``{"dtype", "shape", "data"}`` from the network -> torch tensor, with every field checked."""
    import torch

    if not isinstance(obj, dict):
        raise ProtocolError("bad-tensor", "tensor is not a map")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype, str) or dtype not in _DTYPES:  # a list or map is unhashable: no `in` on it
        raise ProtocolError("bad-tensor", f"dtype {dtype[:32]!r}" if isinstance(dtype, str)
                            else f"dtype is a {type(dtype).__name__}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)):
        raise ProtocolError("bad-tensor", "shape is not a list of non-negative ints")
    count = math.prod(shape)
    # Bound the product of the non-zero dims too: an empty tensor whose other dims are huge
    # (``[0, 2**63]``) overflows torch's size or stride arithmetic.
    if math.prod(max(d, 1) for d in shape) > max_elements:
        raise ProtocolError("bad-tensor", f"shape {shape} holds more than {max_elements} elements")
    if not isinstance(data, bytes) or len(data) != count * _DTYPES[dtype]:
        raise ProtocolError("bad-tensor", "data length does not match dtype and shape")
    if count == 0:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


# --- the user-facing JSON ask --------------------------------------------------------------

@dataclass(frozen=True)
class JsonAsk:
    text: str
    reply_to: str | None
    max_new_tokens: int
    ask_id: str | None
    deadline_s: float | None = None  # the asker's budget in seconds (mesh.budget)


MAX_STOPS, MAX_STOP_CHARS = 8, 64


def ask_problem(env: Envelope, max_prompt_chars: int, max_new_tokens: int) -> str | None:
    """Why a decoded ASK's body cannot be answered (a counted reason), or None if it can. The reply
    topic is the caller's check (``mesh.topics.reply_allowed``)."""
    body = env.body
    stop = body.get("stop", [])
    if not body["text"] or len(body["text"]) > max_prompt_chars:
        return "bad-prompt"
    if not 1 <= body["max_new_tokens"] <= max_new_tokens:
        return "bad-max-new-tokens"
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop):
        return "bad-stop"
    return None


def decode_json_ask(payload: bytes, max_bytes: int, default_tokens: int, max_tokens: int) -> JsonAsk:
    """``{"text": ..., "reply_to": TOPIC, "max_new_tokens": N, "id": ..., "deadline_s": S}`` from
    any MQTT client (Home Assistant's automations among them)."""
    if len(payload) > max_bytes:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {max_bytes}")
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("malformed", f"not JSON: {type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError("malformed", "JSON ask is not an object")
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("missing-field", "JSON ask needs a non-empty 'text'")
    reply_to = raw.get("reply_to")
    if reply_to is not None:
        check_reply_topic(reply_to)
    tokens = raw.get("max_new_tokens", default_tokens)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= max_tokens:
        raise ProtocolError("bad-field", f"max_new_tokens must be an int in 1..{max_tokens}")
    ask_id = raw.get("id")
    if ask_id is not None and (not isinstance(ask_id, str) or len(ask_id) > 128):
        raise ProtocolError("bad-field", "id must be a short string")
    if budget.deadline_problem(raw) is not None:
        raise ProtocolError(budget.BAD_DEADLINE, f"deadline_s must be seconds in (0, {budget.MAX_DEADLINE_S:g}]")
    deadline = raw.get("deadline_s")
    return JsonAsk(text=text, reply_to=reply_to, max_new_tokens=tokens, ask_id=ask_id,
                   deadline_s=None if deadline is None else float(deadline))


# --- rejection counters --------------------------------------------------------------------

class RejectCounter:
    """Counts dropped payloads by reason; thread-safe, snapshot for heartbeats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
