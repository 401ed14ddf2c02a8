"""Who may send what on the ask path: asks, a router's forwards, and the replies an asker takes.

Every function takes the process's :class:`~mesh.auth.keyring.Keyring`, or None for a process
with no identity, which behaves as before identities: it sends plain envelopes and takes every
claimed sender at its word (a sealed message is unwrapped unchecked, so a keyless process still
reads a keyed one). A process with keys refuses plain bytes (``unauthenticated``) and:

- takes an ask from an ``asker`` principal (a CLI, a benchmark), sealed for the topic it came on;
- takes a forwarded ask only from a node or the coordinator that says it routed it, and only with
  the asker's own sealed ask inside (:data:`ASKED`, checked against ``mesh/v1/route``): a node
  that reads the routed topic may copy an ask, never change its text, corr or reply topic. A Home
  Assistant ask (JSON, unsigned by design) is forwarded with no seal inside and answered as JSON;
- as an asker (:class:`ReplyGate`), takes the replies to one ask only from the node it asked, or
  from the nodes the router's sealed :attr:`wire.Kind.ROUTED` notices name, and an error from the
  router itself. Everything else is held back (the notice may lag) and counted if never vouched
  (``wrong-sender``). A rogue on the reply topic, keyless or holding another principal's key, is
  refused: its forged answer never reaches the caller (review finding H1, experiment E3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh import topics, wire
from mesh.auth import seal
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError

ASKER = "asker"  # a forward's field: the original ask's sender
ASKED = "asked"  # a forward's field: the asker's sealed ask, as it came on mesh/v1/route
FORWARD_FIELDS = (ASKER, ASKED)
ASKER_ROLES = frozenset({"asker"})
FORWARDER_ROLES = frozenset({"node", "coordinator"})
SEAL_OVERHEAD = 4096  # header, certificate and signature around a sealed envelope (~400 bytes)
HELD_MAX = 256  # replies an asker holds back per ask until a notice vouches for their sender


def unwrap(payload: bytes, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> bytes:
    """The inner bytes of a sealed message, unchecked (a keyless process reads a keyed one as it
    reads everything: at the claimed sender's word); plain bytes as they are."""
    if not seal.is_sealed(payload):
        return payload
    return seal.parse(payload, max_bytes + SEAL_OVERHEAD).inner


def encode(keys: Keyring | None, env: wire.Envelope, topic: str, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> bytes:
    """``env`` for publication on ``topic``: sealed with ``keys``, plain without."""
    if keys is None:
        return wire.encode(env, max_bytes)
    return keys.seal_envelope(env, topic, max_bytes)


def decode(keys: Keyring | None, payload: bytes, topic: str, max_bytes: int = wire.DEFAULT_MAX_BYTES,
           retained: bool = False) -> tuple[str | None, wire.Envelope]:
    """Untrusted bytes received on ``topic`` -> (the sender's certified role, or None without
    keys; the envelope), or ProtocolError with a counted reason."""
    if keys is None:
        return None, wire.decode(unwrap(payload, max_bytes), max_bytes)
    opened, env = keys.open_envelope(payload, topic, max_bytes, retained)
    return opened.sender.role, env


def decode_kind(keys: Keyring | None, payload: bytes, topic: str, kind: wire.Kind, rejects: Any,
                max_bytes: int = wire.DEFAULT_MAX_BYTES, retained: bool = False) -> wire.Envelope | None:
    """:func:`decode` for a handler that takes one ``kind``: None (the reason counted in
    ``rejects``) for anything it must drop."""
    try:
        _, env = decode(keys, payload, topic, max_bytes, retained)
    except ProtocolError as exc:
        rejects.add(exc.reason)
        return None
    if env.kind is not kind:
        rejects.add("unexpected-kind")
        return None
    return env


def forward(keys: Keyring | None, env: wire.Envelope, original: bytes | None, router: str,
            reason: str) -> wire.Envelope:
    """The router's copy of ``env`` for the node it picked. Without keys: as before (the asker's
    name, the routing fields). With keys: in the router's own name (it seals it), naming the asker
    and carrying the asker's sealed bytes (``original``; None for a JSON ask, which has none)."""
    body: dict[str, Any] = {k: v for k, v in env.body.items() if k not in FORWARD_FIELDS}
    body.update(routed_by=router, routed_reason=reason)
    if keys is None:
        return wire.Envelope(wire.Kind.ASK, env.sender, body, corr=env.corr, reply_to=env.reply_to)
    body[ASKER] = env.sender
    if original is not None:
        body[ASKED] = original
    return wire.Envelope(wire.Kind.ASK, keys.name, body, corr=env.corr, reply_to=env.reply_to)


def open_ask(keys: Keyring | None, payload: bytes, topic: str, max_bytes: int, json_sender: str) -> wire.Envelope:
    """An ask received on ``topic`` (a node's ask topic or ``mesh/v1/route``) -> the asker's
    envelope (a forward's routing fields kept, its :data:`FORWARD_FIELDS` gone), or ProtocolError:
    ``wrong-role`` (a node's ask it did not route, a node's seal inside), ``unauthenticated`` (a
    forward without the asker's seal, unless a JSON ask), ``forged-forward`` (the seal inside is
    another ask), or the reasons of ``Keyring.open``."""
    role, env = decode(keys, payload, topic, max_bytes)
    if env.kind is not wire.Kind.ASK:
        return env  # the caller counts the kind
    body = dict(env.body)
    if keys is None:
        if ASKER in body and isinstance(body[ASKER], str):  # a keyed router's forward
            sender = body[ASKER]
            return wire.Envelope(wire.Kind.ASK, sender, _strip(body), corr=env.corr, reply_to=env.reply_to)
        return env
    if role in ASKER_ROLES:
        return wire.Envelope(wire.Kind.ASK, env.sender, _strip(body), corr=env.corr, reply_to=env.reply_to)
    if role not in FORWARDER_ROLES or body.get("routed_by") != env.sender:
        raise ProtocolError("wrong-role", f"an ask sealed by {env.sender!r} ({role}) that it did not route")
    routing = {k: body[k] for k in ("routed_by", "routed_reason") if k in body}
    asked = body.get(ASKED)
    if asked is None:
        if body.get(ASKER) == json_sender and body.get("reply_format") == "json":
            return wire.Envelope(wire.Kind.ASK, json_sender, _strip(body), corr=env.corr, reply_to=env.reply_to)
        raise ProtocolError("unauthenticated", f"a forward by {env.sender!r} without its asker's seal")
    if not isinstance(asked, bytes):
        raise ProtocolError("malformed", "a forward's asker seal is not bytes")
    # retained=True: no replay guard (two routers overlapping in a hand-over forward the same ask;
    # the dedupe drops the second, and the forward's own seal was guarded).
    opened, inner = keys.open_envelope(asked, topics.ROUTE, max_bytes, retained=True)
    if opened.sender.role not in ASKER_ROLES:
        raise ProtocolError("wrong-role", f"a forwarded ask sealed by {inner.sender!r} ({opened.sender.role})")
    if inner.kind is not wire.Kind.ASK or inner.corr != env.corr or inner.reply_to != env.reply_to:
        raise ProtocolError("forged-forward", f"{env.sender!r} forwarded another ask than its asker's")
    return wire.Envelope(wire.Kind.ASK, inner.sender, dict(_strip(dict(inner.body)), **routing),
                         corr=inner.corr, reply_to=inner.reply_to)


def _strip(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in FORWARD_FIELDS}


def routed_notice(keys: Keyring, env: wire.Envelope, node: str) -> wire.Envelope:
    """The router's word to the asker of ``env``: ``node`` took it."""
    return wire.Envelope(wire.Kind.ROUTED, keys.name, {"node": node}, corr=env.corr)


@dataclass
class ReplyGate:
    """Which replies to one ask an asker with keys acts on (see the module docstring).

    ``node``: the node asked, or None for a routed ask; ``keyed``: whether the asker holds keys
    (without, every reply passes, as before, and notices are dropped); ``router``: who routes now,
    in the asker's own view (``mesh.routing.router_of`` over the live nodes).

    Views differ for a while: a node known only from a retained heartbeat counts as live for one
    staleness window after the asker subscribed, though it may have died long ago (the router,
    which heard it live, knows better). So a notice or an error not from the router of the moment
    is held, not refused, and :meth:`recheck` (called while the asker waits) takes it once the
    views agree; what is still held when the ask ends is counted.
    """

    node: str | None
    keyed: bool
    router: Callable[[], str | None]
    answerers: set[str] = field(default_factory=set)
    held: list[wire.Envelope] = field(default_factory=list)
    refused: int = 0  # notices to an ask sent to one node, and anything past HELD_MAX

    def __post_init__(self) -> None:
        if self.node is not None:
            self.answerers.add(self.node)

    def take(self, env: wire.Envelope) -> list[wire.Envelope]:
        """The replies to act on now, in order: ``env`` itself, replies a notice vouched for, or none."""
        if not self.keyed:
            return [] if env.kind is wire.Kind.ROUTED else [env]
        if env.kind is wire.Kind.ROUTED and self.node is not None:
            self.refused += 1  # nobody routed an ask sent to one node
            return []
        if len(self.held) >= HELD_MAX:
            self.refused += 1
            return []
        self.held.append(env)
        return self.recheck()

    def recheck(self) -> list[wire.Envelope]:
        """What the held replies and notices vouch for now (the router's view may have moved)."""
        if not self.keyed or not self.held:
            return []
        router = self.router() if self.node is None else None
        out: list[wire.Envelope] = []
        changed = True
        while changed:  # a notice taken may release replies held before it
            changed = False
            keep: list[wire.Envelope] = []
            for env in self.held:
                if env.kind is wire.Kind.ROUTED:
                    if router is not None and env.sender == router:
                        changed |= str(env.body["node"]) not in self.answerers
                        self.answerers.add(str(env.body["node"]))
                        continue
                elif env.sender in self.answerers or (env.kind is wire.Kind.ERROR and router is not None
                                                      and env.sender == router):
                    out.append(env)  # the router's own refusal (no node, a bad ask) counts too
                    continue
                keep.append(env)
            self.held = keep
        return out

    def unvouched(self) -> int:
        """Replies and notices never vouched for, and those refused: what the asker counts as
        ``wrong-sender``."""
        return len(self.held) + self.refused
