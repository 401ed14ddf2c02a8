"""The prompt cache's conversation with peers: ask one for chunks, read and verify its answer as
it arrives, and serve the chunks this node holds.

Wire (``mesh.wire`` envelopes; chunk and logits forms in ``mesh.cache.codec``)::

    KV_FETCH  -> topics.node_kv(peer), corr, reply_to = the asker's inbox
              {"keys": [16 B chunk key, ... at most 4096], "codec": "fp16" | "int8" | "fp32",
               "model": 16 B model-key digest, "prompt_key"?: 16 B (asked on a full match)}
    KV_CHUNKS -> reply_to, same corr, one envelope per part, parts numbered from 0:
              {"part": i, "last": bool, "chunks": [chunk, ...],
               "logits"?: last logits (part 0 of a full match, before any chunk),
               "prompt"?: {"tail": chunk, "len": tail tokens, "prov"?: proof}  (last part of a full match)}

A keyed node's chunks and logits carry ``"prov"``: the computing node's signature over them
(``mesh.cache.provenance``), whoever serves them.

The asker reads the parts in order and verifies each one as it comes (:class:`Reading`): the
first failed check ends the transfer as *bad*; a gap, a timeout or the peer going offline ends it
early. Nothing here knows the agent: :class:`PeerTransfer` is handed a bus, an inbox, who is
online, a stop event and what to serve.

With a keyring (``mesh.auth``), a fetch is sealed by the requesting node and each part by the
serving one: a node serves only a fetch sealed by a node or the coordinator (so the reply-topic
rule of ``mesh.cache.quota`` binds a certified name), and its inbox (keyed too) opens each part,
which counts only from the peer asked. That proves who served a part, not who computed its
chunks: with a keyring, every chunk, tail and logits also carries its computer's proof
(``mesh.cache.provenance``), which the asker checks over the bytes it received (a missing or
failed proof makes the part bad) and keeps with the chunk, so it travels on when re-served.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.cache import codec
from mesh.cache.kv import ChunkKV
from mesh.cache.provenance import Proof, Provenance, data_digest, logits_digest
from mesh.cache.quota import ByteBuckets, fetch_reply_ok, pick_codec
from mesh.errors import ProtocolError
from mesh.model import bind_threads

log = logging.getLogger(__name__)

PART_BYTES = 1 << 20  # chunk bytes per reply part: the asker verifies one while the next travels
MAX_KEYS = 4096  # chunk keys one KV_FETCH may ask for

# What a fetch yields: the peer's reply bodies (KV_CHUNKS) in arrival order, each with its payload
# bytes, ending after the one marked last, or early when the peer stops answering, goes offline
# or the timeout passes; None when nothing could be asked.
Part = tuple[dict[str, Any], int]
Fetch = Callable[[str, list[bytes], bytes | None, float], Iterable[Part] | None]
# What serving needs from the node's cache: (keys, prompt key, codec, max message bytes) -> bodies
Serve = Callable[[list[bytes], bytes | None, str, int], Iterable[dict[str, Any]]]


@dataclass(frozen=True)
class KVCheck:
    """What verifying a peer's parts needs to know about this node's cache."""

    layout: tuple[tuple[int, int], ...]  # (H_kv, D) per decoder layer
    chunk_size: int
    model: bytes  # the model-key digest every chunk and logits must carry
    vocab: int
    provenance: Provenance | None = None  # with a keyring: every chunk's computer must be proven


# -- serving -------------------------------------------------------------------------------------


def proven_chunk(chunk: ChunkKV, codec_name: str, key: bytes, model: bytes,
                  proof: Proof | None) -> dict[str, Any] | None:
    """``chunk`` in wire form with its proof, in a codec whose signed bytes this node reproduces;
    None when the bytes no longer match what was signed (the entry went bad in our memory)."""
    if proof is None:
        return codec.encode_chunk(chunk, codec_name, key=key, model=model)
    name = proof.serve_codec(codec_name)
    enc = codec.encode_chunk(chunk, name, key=key, model=model)
    if data_digest(enc["layers"]) != proof.manifest.digests[name]:
        return None
    enc["prov"] = proof.sealed
    return enc


def serve_parts(keys: Sequence[bytes], chunks: Sequence[ChunkKV], pkey: bytes | None,
                prompt: dict[str, Any] | None, codec_name: str, model: bytes, max_bytes: int,
                part_bytes: int = PART_BYTES, proofs: Sequence[Proof | None] | None = None,
                prompt_proof: Proof | None = None,
                spoiled: list[bytes] | None = None) -> Iterator[tuple[dict[str, Any], int]]:
    """Reply bodies for the ``chunks`` held for ``keys`` (a leading run), each with its chunk
    bytes, encoded one part at a time so the first part leaves before the last is encoded.

    With ``prompt`` (a full match) the first part carries only the prompt's last logits (top k):
    the asker can emit its first token from them while the KV follows. Chunk parts stay under
    ``part_bytes`` (and half of ``max_bytes``); the last part carries the prompt's tail.

    ``proofs`` (per chunk) and ``prompt_proof``: each entry goes out with its computer's proof
    (``mesh.cache.provenance``), in a codec whose signed bytes it reproduces, and only if it
    still encodes to them: the run ends before the first entry that does not (a bit flipped in
    memory since), and its key is appended to ``spoiled`` for the owner to drop.
    """
    limit = max(1, min(part_bytes, max_bytes // 2))
    proven = proofs is not None
    part = 0
    if prompt is not None and pkey is not None:
        logits = codec.encode_logits(prompt["logits"], key=pkey, model=model)
        if proven and (prompt_proof is None or logits_digest(logits) != prompt_proof.manifest.logits):
            prompt = None
            if spoiled is not None:
                spoiled.append(bytes(pkey))
        else:
            if prompt_proof is not None:
                logits["prov"] = prompt_proof.sealed
            yield {"chunks": [], "part": part, "last": False, "logits": logits}, 0
            part += 1
    batch: list[Any] = []
    size = 0
    for i, (key, chunk) in enumerate(zip(keys, chunks)):
        proof = proofs[i] if proofs is not None else None
        enc = None if proven and proof is None else proven_chunk(chunk, codec_name, key, model, proof)
        if enc is None:
            if spoiled is not None:
                spoiled.append(bytes(key))
            prompt = None
            break
        n = sum(len(t["data"]) for layer in enc["layers"] for t in (layer["k"], layer["v"])) + 512
        if batch and size + n > limit:
            yield {"chunks": batch, "part": part, "last": False}, size
            part, batch, size = part + 1, [], 0
        batch.append(enc)
        size += n
    last: dict[str, Any] = {"chunks": batch, "part": part, "last": True}
    if prompt is not None and pkey is not None:
        tail = proven_chunk(prompt["tail"], codec_name, pkey, model, prompt_proof)
        if tail is None or (proven and prompt_proof is None):
            if spoiled is not None:
                spoiled.append(bytes(pkey))
        else:
            last["prompt"] = {"tail": tail, "len": prompt["tail"].length}
            if prompt_proof is not None:
                last["prompt"]["prov"] = prompt_proof.sealed
    yield last, size


def valid_fetch(env: wire.Envelope) -> bool:
    """A KV_FETCH worth serving: a reply topic we may answer on, and at most MAX_KEYS 16-byte keys."""
    keys = env.body["keys"]
    return (env.reply_to is not None and topics.reply_allowed(env.reply_to) and len(keys) <= MAX_KEYS
            and all(isinstance(k, bytes) and len(k) == 16 for k in keys))


# -- reading an answer ---------------------------------------------------------------------------


class Reading:
    """One fetch in flight: reads the peer's parts in order and verifies each as it comes.

    ``bad`` is set (and reading stops) at the first part that fails a check; ``ended`` says why
    reading stopped early when the last part never came (timeout, peer offline, a gap).
    ``capped``: the last part said the peer's byte budget for us ran out (``mesh.cache.quota``),
    so fewer chunks than asked is what it promised, not a broken promise.
    """

    def __init__(self, check: KVCheck, peer: str, want: list[bytes], pkey: bytes, full: bool,
                 parts: Iterable[Part] | None, started: float, rtt_s: float, epoch: int) -> None:
        self.check, self.peer, self.want, self.pkey, self.full = check, peer, want, pkey, full
        self.started, self.rtt_s, self.epoch = started, rtt_s, epoch
        self.parts = iter(parts) if parts is not None else iter(())
        self.got: list[ChunkKV] = []
        self.proofs: list[Proof | None] = []  # per chunk in got: its computer's proof (keyed nodes)
        self.tail: ChunkKV | None = None
        self.prompt_proof: Proof | None = None  # the prompt entry's (tail and logits)
        self.logits: torch.Tensor | None = None
        self.codec: str | None = None  # the wire codec the chunks came in (the audit's tolerance)
        self.nbytes = 0
        self.next_part = 0
        self.complete = False
        self.open = True
        self.bad: str | None = None
        self.capped = False
        self.ended = "no answer"
        self.seconds = 0.0

    def stop(self) -> None:
        self.open = False
        self.seconds = time.perf_counter() - self.started
        close = getattr(self.parts, "close", None)
        if close is not None:
            close()  # FetchReplies or a generator: releases the reply slot

    def read(self) -> bool:
        """Read and check one part; False once the transfer is over."""
        if not self.open:
            return False
        try:
            body, n = next(self.parts)
        except StopIteration:
            self.stop()
            return False
        c = self.check
        try:
            if body.get("part") != self.next_part:
                self.ended = f"part {body.get('part')!r} where {self.next_part} was due"
                self.stop()
                return False
            if not body["last"] and not body["chunks"] and "logits" not in body:
                # serve_parts never sends one: with it, a peer could number empty parts up to
                # the deadline and hold the fetch open for nothing (review L3)
                raise ProtocolError("bad-chunk", f"empty part {self.next_part}")
            self.next_part += 1
            self.nbytes += n
            if "logits" in body:
                if not self.full or self.logits is not None:
                    raise ProtocolError("bad-logits", "logits not asked for")
                self._take_logits(body["logits"])
            raw_chunks = body["chunks"]
            if len(self.got) + len(raw_chunks) > len(self.want):
                raise ProtocolError("bad-chunk", "more chunks than asked for")
            for raw in raw_chunks:
                key = self.want[len(self.got)]
                chunk = codec.decode_chunk(raw, c.layout, c.chunk_size, key=key, model=c.model)
                self._note_codec(raw)
                self.proofs.append(c.provenance.check_chunk(raw, key) if c.provenance is not None else None)
                self.got.append(chunk)
            raw_prompt = body.get("prompt")
            if raw_prompt is not None:
                if not self.full or not body["last"] or not isinstance(raw_prompt, dict):
                    raise ProtocolError("bad-chunk", "prompt entry not asked for")
                length = raw_prompt.get("len")
                if not isinstance(length, int) or not 0 <= length < c.chunk_size:
                    raise ProtocolError("bad-chunk", "prompt tail length")
                tail = codec.decode_chunk(raw_prompt["tail"], c.layout, length, key=self.pkey, model=c.model)
                self._note_codec(raw_prompt["tail"])
                if "logits" in raw_prompt and self.logits is None:  # a peer that sends them last
                    self._take_logits(raw_prompt["logits"])
                if c.provenance is not None:
                    self.prompt_proof = c.provenance.check_tail(raw_prompt, self.pkey, length, self.prompt_proof)
                self.tail = tail
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            self.bad = f"part: {exc}"
            log.warning("part from %s rejected: %s", self.peer, exc)
            self.stop()
            return False
        if body["last"]:
            self.complete = True
            self.capped = body.get("capped") is True
            self.stop()
            return False
        return True

    def _note_codec(self, raw: Any) -> None:
        """The lossiest codec of the transfer (decode_chunk checked the name)."""
        name = raw["codec"]
        order = ("fp32", "fp16", "int8")
        if self.codec is None or order.index(name) > order.index(self.codec):
            self.codec = name

    def _take_logits(self, raw: Any) -> None:
        """Decode (and, keyed, prove) the prompt's last logits: nothing unproven is ever emitted."""
        c = self.check
        logits = codec.decode_logits(raw, c.vocab, key=self.pkey, model=c.model)
        if c.provenance is not None:
            self.prompt_proof = c.provenance.check_logits(raw, self.pkey)
        self.logits = logits

    def first_logits(self) -> torch.Tensor | None:
        """The prompt's last logits if they come before any chunk (reads up to that point)."""
        while self.logits is None and not self.got and self.read():
            pass
        return self.logits if self.bad is None else None

    def finish(self) -> None:
        while self.read():
            pass
        if self.open:
            self.stop()
        if not self.complete and self.bad is None and self.ended == "no answer" and self.nbytes:
            self.ended = "stopped mid-transfer"


class FetchReplies:
    """The parts of one KV fetch's answer, in arrival order: iteration stops after the last one,
    at the timeout (monotonic, from the request), or as soon as ``online(peer)`` turns False or
    ``stop`` is set. ``close`` (also called at the end) releases the reply slot, read or not.

    The timeout is a deadline: past it, nothing more is returned, not even parts already queued
    (review L3: a peer that queued parts faster than we check them would otherwise hold the fetch
    past its deadline, which the fetch-or-recompute decision priced). The reply slot's queue is
    bounded (``mesh.mqtt.inbox.Replies``)."""

    def __init__(self, inbox: Any, peer: str, corr: str, replies: queue.Queue[wire.Envelope], timeout: float,
                 online: Callable[[str], bool], stop: threading.Event, poll_s: float = 0.05) -> None:
        self.inbox, self.peer, self.corr, self.replies, self.timeout = inbox, peer, corr, replies, timeout
        self.online, self.stop, self.poll_s = online, stop, poll_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.done = False

    def __iter__(self) -> FetchReplies:
        return self

    def __next__(self) -> Part:
        while not self.done:
            left = self.deadline - time.monotonic()
            if left <= 0:
                log.info("KV fetch from %s timed out after %.2f s", self.peer, self.timeout)
                break
            try:
                reply = self.replies.get(timeout=min(left, self.poll_s))
            except queue.Empty:
                if not self.online(self.peer) or self.stop.is_set():
                    log.info("KV fetch from %s abandoned after %.2f s: peer offline", self.peer,
                             time.monotonic() - self.t0)
                    break
                continue
            if reply.kind is not wire.Kind.KV_CHUNKS or reply.sender != self.peer:
                continue
            if reply.body["last"]:
                self.close()
            return dict(reply.body), payload_bytes(reply.body)
        self.close()
        raise StopIteration

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.inbox.close(self.corr)


def payload_bytes(obj: Any) -> int:
    """Bytes of tensor data in a decoded reply (what crossed the wire, near enough)."""
    if isinstance(obj, bytes):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(payload_bytes(v) for v in obj)
    return 0


# -- the node's side of it -----------------------------------------------------------------------


class PeerTransfer:
    """A node's KV traffic with its peers: serves KV_FETCH requests from a thread of its own and
    sends this node's requests (:meth:`fetch`, the ``Fetch`` that ``NodeCache.prepare`` takes).

    The network thread only validates and queues a request (:meth:`handle`); the serve thread
    encodes and publishes the parts. It runs until ``stop`` is set (the owner's stop event).
    """

    def __init__(self, bus: Any, inbox: Any, name: str, serve: Serve, model: bytes, *, kv_wire: str,
                 online: Callable[[str], bool], stop: threading.Event, rejects: wire.RejectCounter,
                 max_message_bytes: int, queue_size: int = 64, quota: ByteBuckets | None = None,
                 window_bytes: int = 4 << 20, publish_timeout_s: float = 10.0,
                 keyring: Keyring | None = None) -> None:
        self.bus, self.inbox, self.name, self.serve, self.model = bus, inbox, name, serve, model
        self.keys = keyring
        self.kv_wire, self.online, self.stop, self.rejects = kv_wire, online, stop, rejects
        self.max_message_bytes = max_message_bytes
        # mesh.cache.quota: bytes per requester and in all (defaults: CacheConfig's), bytes in flight
        self.quota = quota or ByteBuckets(8 << 20, 32 << 20, 32 << 20, 64 << 20)
        self.window_bytes, self.publish_timeout_s = window_bytes, publish_timeout_s
        self.jobs: queue.Queue[wire.Envelope] = queue.Queue(maxsize=queue_size)
        self.thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        """Subscribe to this node's KV topic and start the serve thread (returned, for joining)."""
        self.bus.subscribe(topics.node_kv(self.name), self.handle, qos=1)
        self.thread = threading.Thread(target=self._serve_loop, name=f"{self.name}-kv-serve", daemon=True)
        self.thread.start()
        return self.thread

    def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        """KV_FETCH handler (network thread): check and queue, never encode."""
        try:
            role, env = senders.decode(self.keys, payload, topic, self.max_message_bytes, retained)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            log.info("dropped KV fetch: %s", exc)
            return
        if env.kind is not wire.Kind.KV_FETCH:
            self.rejects.add("unexpected-kind")
            return
        if role is not None and role not in senders.FORWARDER_ROLES:  # only nodes ask for chunks
            self.rejects.add("wrong-role")
            return
        if not valid_fetch(env):
            self.rejects.add("bad-kv-fetch")
            return
        if env.body["model"] != self.model:  # nothing we hold is of use to it (mesh.cache.quota)
            self.rejects.add("bad-kv-model")
            return
        if not fetch_reply_ok(env.sender, env.reply_to):  # only to the requester's own inbox
            self.rejects.add("bad-kv-reply")
            return
        try:
            self.jobs.put_nowait(env)
        except queue.Full:
            self.rejects.add("kv-busy")

    def serve_one(self, env: wire.Envelope) -> None:
        """Answer one queued request in a codec we pick (``mesh.cache.quota``), each part published
        as soon as it is encoded, within the requester's byte budget and the in-flight window."""
        pkey = env.body.get("prompt_key")
        accept = env.body.get("accept")
        accepted = [str(env.body["codec"]), *(a for a in accept if isinstance(a, str))] \
            if isinstance(accept, list) else [str(env.body["codec"])]
        codec_name = pick_codec(accepted, self.kv_wire)
        allowed = self.quota.available(env.sender, time.monotonic()) if codec_name is not None else 0.0
        if allowed <= 0:
            self.rejects.add("kv-rate-limited" if codec_name is not None else "bad-kv-codec")
            self._publish(env, {"chunks": [], "part": 0, "last": True, "capped": True})  # nobody need wait
            return
        sent, flight = 0, deque()
        for b in self.serve(list(env.body["keys"]), pkey if isinstance(pkey, bytes) else None,
                            codec_name, self.max_message_bytes):
            n, info = self._publish(env, b)
            sent += n
            self.quota.charge(env.sender, n, time.monotonic())
            flight.append((info, n))
            if not self._drain(flight):
                self.rejects.add("kv-stalled")
                return
            if b["last"]:
                return
            if sent >= allowed:  # the leading run that fits; the requester computes the rest
                self.rejects.add("kv-rate-limited")
                self._publish(env, {"chunks": [], "part": b["part"] + 1, "last": True, "capped": True})
                return

    def _publish(self, env: wire.Envelope, body: dict[str, Any]) -> tuple[int, Any]:
        reply = wire.Envelope(wire.Kind.KV_CHUNKS, self.name, body, corr=env.corr)
        payload = senders.encode(self.keys, reply, env.reply_to, self.max_message_bytes)
        return len(payload), self.bus.publish(env.reply_to, payload, qos=1)

    def _drain(self, flight: deque[tuple[Any, int]]) -> bool:
        """Wait until at most ``window_bytes`` are in flight to the broker; False if it stalls."""
        while flight and sum(n for _, n in flight) > self.window_bytes:
            info, _ = flight.popleft()
            if info is None:  # a bus that publishes synchronously
                continue
            try:
                info.wait_for_publish(self.publish_timeout_s)
            except (RuntimeError, ValueError):
                return False
            if not info.is_published():
                return False
        return True

    def _serve_loop(self) -> None:
        bind_threads()
        while not self.stop.is_set():
            try:
                env = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.serve_one(env)
            except Exception:
                log.exception("serving KV chunks failed")

    def fetch(self, peer: str, keys: list[bytes], pkey: bytes | None, timeout: float) -> FetchReplies:
        """One request to ``peer`` for ``keys``, sent now; its parts are read as they arrive."""
        corr, replies = self.inbox.open()
        body: dict[str, Any] = {"keys": keys, "codec": self.kv_wire, "model": self.model}
        if pkey is not None:
            body["prompt_key"] = pkey
        env = wire.Envelope(wire.Kind.KV_FETCH, self.name, body, corr=corr, reply_to=self.inbox.topic)
        reading = FetchReplies(self.inbox, peer, corr, replies, timeout, self.online, self.stop)
        try:
            topic = topics.node_kv(peer)
            self.bus.publish(topic, senders.encode(self.keys, env, topic), qos=1)
        except BaseException:
            reading.close()
            raise
        return reading
