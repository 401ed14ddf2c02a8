"""Evidence of a lie about KV, which any node can re-check (issue 15: "shunned mesh-wide on
evidence any node can re-check").

When a node's audit (``mesh.cache.audit``) finds a unit that a recomputation from the first
token contradicts, it publishes what it holds of that unit *as its computer signed it*, with the
prompt's token ids up to it::

    KV_EVIDENCE -> topics.node_kv_evidence(<auditor>), retained, QoS 1, sealed by the auditor
      {"ids": [token id, ...]     the prompt up to the end of the unit (all of it for the prompt entry),
       "unit": i                  the chunk index, or -1: the prompt entry,
       "chunk": wire chunk        (unit >= 0) mesh.cache.codec form with "prov", the computer's proof,
       "prompt": {"tail": wire chunk, "len": n, "prov": proof, "logits": wire logits with "prov"}}  (unit -1)

A receiving node (:meth:`mesh.cache.node_cache.NodeCache.take_evidence`, then
:meth:`~mesh.cache.node_cache.NodeCache.judge` in its idle time) derives the unit's key from the
ids with its own model key, checks the proof over the bytes (so the signer is the node that
computed them, whoever reports them: an unsigned, re-signed or altered unit is refused), recomputes
the prompt from the first token and, only if its own recomputation also disagrees beyond the
codec's bound, shuns the signer and drops what it computed. So a report cannot frame an honest
node: an honest node's signed chunk agrees with every recomputation. The auditor's own name is
not trusted for anything but sealing (it could be the liar itself).

Re-checking costs a receiver one prefill of the ids; each (signer, key) is judged once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError

log = logging.getLogger(__name__)


def build(ids: Sequence[int], unit: int, chunk: Mapping[str, Any] | None = None,
          prompt: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body of a KV_EVIDENCE envelope (module docstring)."""
    body: dict[str, Any] = {"ids": [int(i) for i in ids], "unit": int(unit)}
    if unit >= 0:
        assert chunk is not None
        body["chunk"] = dict(chunk)
    else:
        assert prompt is not None
        body["prompt"] = dict(prompt)
    return body


def parse(body: Mapping[str, Any], vocab: int, chunk_size: int, max_tokens: int) -> tuple[list[int], int]:
    """(ids, unit) of a received body, checked for shape (untrusted: ProtocolError
    ``bad-kv-evidence``); the unit's bytes and proof are the node cache's to check."""
    ids, unit = body.get("ids"), body.get("unit")
    if not isinstance(ids, list) or not isinstance(unit, int) or not 0 < len(ids) <= max_tokens \
            or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
        raise ProtocolError("bad-kv-evidence", "ids")
    if unit >= 0:
        if len(ids) != (unit + 1) * chunk_size or not isinstance(body.get("chunk"), Mapping):
            raise ProtocolError("bad-kv-evidence", "a chunk's evidence: its chunk and the ids up to its end")
    elif unit != -1 or not isinstance(body.get("prompt"), Mapping):
        raise ProtocolError("bad-kv-evidence", "a prompt entry's evidence: its tail, logits and the ids")
    return list(ids), unit


class EvidenceSync:
    """Publishes this node's evidence (:meth:`publish`) and hands every other node's to
    ``cache.take_evidence`` (network thread: checks only; the recomputation waits for the
    worker's idle time)."""

    def __init__(self, bus: Any, cache: Any, name: str, *, rejects: wire.RejectCounter,
                 max_message_bytes: int, keyring: Keyring | None = None) -> None:
        self.bus, self.cache, self.name, self.rejects = bus, cache, name, rejects
        self.keys, self.max_message_bytes = keyring, max_message_bytes

    def start(self) -> None:
        self.bus.subscribe(topics.ALL_KV_EVIDENCE, self.handle, qos=topics.KV_EVIDENCE.qos)

    def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if parsed[0] == self.name or not payload:
            return
        if self.keys is None:  # nobody's proof can be checked without identities
            return
        env = senders.decode_kind(self.keys, payload, topic, wire.Kind.KV_EVIDENCE, self.rejects,
                                  self.max_message_bytes, retained)
        if env is None:
            return
        try:
            self.cache.take_evidence(dict(env.body))
        except ProtocolError as exc:
            if not getattr(exc, "counted", False):  # a refused proof is counted where it is checked
                self.rejects.add(exc.reason)
            log.info("KV evidence from %s refused: %s", parsed[0], exc)
        except (KeyError, TypeError, ValueError) as exc:  # untrusted input never crashes the handler
            self.rejects.add("bad-kv-evidence")
            log.info("KV evidence from %s refused: %s", parsed[0], exc)

    def publish(self, body: dict[str, Any]) -> None:
        env = wire.Envelope(wire.Kind.KV_EVIDENCE, self.name, body)
        topic = topics.node_kv_evidence(self.name)
        self.bus.publish(topic, senders.encode(self.keys, env, topic, self.max_message_bytes),
                         qos=topics.KV_EVIDENCE.qos, retain=topics.KV_EVIDENCE.retain)
