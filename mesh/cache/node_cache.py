"""A node's prompt cache: the shell around mesh.cache.store / catalog / lookup / kv / codec.

It owns the node's KV store (behind one lock: the worker, the serving thread and the network
thread all reach it), the catalog it publishes, the peer catalogs it has heard, and the per-peer
link estimates measured from real fetches. The owner calls :meth:`prepare` on its worker thread
for every ask; fetching from a peer goes through a ``fetch`` callable it provides
(``mesh.cache.transfer.PeerTransfer.fetch`` on a node); without one the cache is local only.

With a keyring (``mesh.auth``) every entry in the store carries a proof of who computed it
(``mesh.cache.provenance``): its own prefills are signed as they are stored, fetched entries keep
the proof they were checked with, persisted ones are checked again when loaded, and a peer is
served an entry only with its proof and only while it still encodes to the signed bytes.

Fetched entries are audited (``mesh.cache.audit``): :meth:`NodeCache.prepare` stores them
*pending* (``mesh.cache.store``) and queues the fetch; this node uses them for its own asks at
once (the answer that fetched them, and any after it), but advertises, serves and persists them,
and anything it computes over them, only once :meth:`NodeCache.audit` (the owner's idle time,
after the answer) recomputed one of them and found it honest (:class:`mesh.cache.auditor.AuditDuty`,
mixed in). What this node computes over its own or confirmed entries is signed, stored, advertised
and persisted on a thread beside the decoder, and :meth:`Prepared.finish` waits for it before the
answer goes out: an answer means those chunks are stored and advertised (routing, fetching peers
and ``--cache-dir`` rely on it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mesh.cache import audit as audits
from mesh.cache.auditor import MAX_EVIDENCE_TOKENS, AuditDuty  # noqa: F401  (MAX_EVIDENCE_TOKENS: re-exported)
from mesh.cache import codec
from mesh.cache import kv as kvstate
from mesh.cache.catalog import Catalog, key_id, leading_matches
from mesh import wire
from mesh.auth.keyring import Keyring
from mesh.cache import provenance as prov
from mesh.cache.keys import ChunkHash, ModelKey, chunk_keys, prompt_key
from mesh.cache.lookup import (BAD, LIED, RECOMPUTE, REMOTE, SHORT, CostModel, Decision, LinkEstimate,
                               PenaltyPolicy, Strike, decide, fetch_timeout, shunned, strike)
from mesh.cache.store import KVStore, StoreChange, load_dir, save_dir
from mesh.cache.transfer import PART_BYTES, Fetch, KVCheck, Reading, serve_parts
from mesh.config import CacheConfig
from mesh.model import Decoder, Deferred, LoadedModel

log = logging.getLogger(__name__)

MAX_PEER_CATALOGS = 64  # peers whose catalog one node keeps (a home mesh has a handful)


@dataclass
class CacheFigures:
    asks: int = 0
    hits: int = 0  # asks that reused at least one cached token (local or fetched)
    full_hits: int = 0  # asks whose first token needed no forward pass
    fetches: int = 0
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    wasted_fetches: int = 0  # a peer sent fewer chunks than its catalog promised, or bad ones, or stopped
    recomputes: int = 0  # a peer held more, but recomputing was estimated faster
    served_requests: int = 0
    served_chunks: int = 0
    served_bytes: int = 0
    wasted_by_peer: dict[str, int] = field(default_factory=dict)
    audits_passed: int = 0
    audits_failed: int = 0  # the audited unit disagreed with a recomputation from the first token
    audits_inconclusive: int = 0  # it agreed from the first token: the prefix held was wrong
    audits_dropped: int = 0  # fetches dropped unaudited (MAX_AUDITS)
    audit_s: float = 0.0  # the last audit's recomputation time
    evidence_upheld: int = 0  # other nodes' reports this node's recomputation confirmed
    evidence_unfounded: int = 0  # ... and contradicted (the reported unit is honest)


@dataclass
class Prepared:
    """What :meth:`NodeCache.prepare` hands the decoder, and the record for ``mesh ask --json``."""

    logits: torch.Tensor
    cache: Any  # a transformers cache, or a mesh.model.Deferred one (see NodeCache.prepare)
    info: dict[str, Any]
    storing: threading.Thread | None = None  # signing and storing what this ask computed (defer_store)

    def finish(self) -> None:
        """Complete a deferred transfer the decoder did not need (an answer of one token), and
        wait until what the ask computed is signed and stored (before the answer goes out: a
        client that asks a peer next finds it in the catalog)."""
        if isinstance(self.cache, Deferred):
            self.cache.get()
        if self.storing is not None:
            self.storing.join()


def _tokenizer_id(loaded: LoadedModel) -> str:
    tok = loaded.tokenizer
    # mesh.text tokenizers name their tables by digest; a transformers one (reference tests) by class.
    name = getattr(tok, "digest", None)
    name = f"mesh-text/{name[:16]}" if isinstance(name, str) else type(tok).__name__
    return f"{name}/{len(tok)}/gguf:{loaded.digest[:16]}"


class NodeCache(AuditDuty):
    def __init__(self, loaded: LoadedModel, config: CacheConfig, decoder: Decoder,
                 penalty: PenaltyPolicy = PenaltyPolicy(), fetch_floor_s: float = 0.25,
                 keyring: Keyring | None = None, rejects: wire.RejectCounter | None = None) -> None:
        """``keyring``: this node's identity (None: no provenance, as a keyless process);
        ``rejects``: where refused proofs and failed audits are counted (the heartbeat's counter)."""
        self.config = config
        self.loaded = loaded
        self.decoder = decoder
        self.model_config = loaded.model.config
        self.chunk_size = config.chunk_size
        kv_dtype = str(getattr(self.model_config, "kv_dtype", "float32"))  # what the model's cache stores
        self.kv_dtype = getattr(torch, kv_dtype)
        self.model_key = ModelKey(model_digest=loaded.digest, tokenizer=_tokenizer_id(loaded),
                                  kv_dtype=kv_dtype, chunk_size=config.chunk_size)
        self.digest = self.model_key.digest()
        self.layout = kvstate.kv_layout(self.model_config)
        self.bytes_per_chunk = codec.wire_bytes_per_token(self.model_config, config.kv_wire,
                                                            self.chunk_size) * self.chunk_size
        mem_per_chunk = sum(2 * h * d * self.kv_dtype.itemsize for h, d in self.layout) * self.chunk_size
        budget = int(config.budget_mb * 1024 * 1024)
        # Capacity for the Bloom sizing: every chunk the budget can hold, plus as many prompt keys.
        self.capacity = max(256, 2 * budget // max(mem_per_chunk, 1))
        self.store = KVStore(budget, self.digest)
        self.lock = threading.RLock()
        self.vocab = int(self.model_config.get_text_config(decoder=True).vocab_size
                         if hasattr(self.model_config, "get_text_config") else self.model_config.vocab_size)
        # signed for: our wire codec, and the others quota.pick_codec may serve in (fp32 only as our own)
        signed = (config.kv_wire, *(c for c in ("fp16", "int8") if c != config.kv_wire))
        self.rejects = rejects if rejects is not None else wire.RejectCounter()
        self.provenance = prov.Provenance(keyring, self.digest, self.rejects, codecs=signed) \
            if keyring is not None else None
        self.check = KVCheck(tuple(self.layout), self.chunk_size, self.digest, self.vocab, self.provenance)
        # the mesh's catalog key (node identities carry it): our catalog and our queries of the
        # peers' are keyed, so testing a candidate prompt against them needs it (mesh.cache.catalog)
        self.catalog_key = keyring.catalog_key if keyring is not None else None
        self.penalty = penalty
        self.fetch_floor_s = fetch_floor_s
        self.strikes: dict[str, Strike] = {}
        self.peers: dict[str, Catalog] = {}
        self.unreadable: set[str] = set()  # peers whose catalog is keyed under a key we lack
        self.links: dict[str, LinkEstimate] = {}
        self.figures = CacheFigures()
        self.audits: deque[audits.Pending] = deque()  # fetches awaiting their audit, oldest first
        self.reports: deque[dict[str, Any]] = deque()  # other nodes' evidence awaiting its re-check
        self.judged: set[tuple[str, bytes]] = set()
        self.epoch = 0
        self.dirty = threading.Event()
        self.dirty.set()
        if config.persist_dir is not None:
            report = load_dir(self.store, config.persist_dir, self._decode_record, size=codec.record_size,
                              check_proof=self._check_stored if self.provenance is not None else None)
            for name, why in report.skipped:
                log.warning("cache file %s skipped: %s", name, why)
            log.info("prompt cache restored %d entries from %s", len(report.change.added), config.persist_dir)

    def _as_stored(self, chunk: Any) -> Any:
        """A fetched chunk in the dtype computed ones are kept in (float16 on a node: half the
        memory), where that loses nothing (an fp16 wire's values); an int8 wire's dequantised
        values stay float32, so the chunk re-encodes to the very bytes its proof covers."""
        if chunk.keys[0].dtype == self.kv_dtype:
            return chunk
        same = chunk.to(self.kv_dtype)
        exact = all(torch.equal(a.to(b.dtype), b) for a, b in zip([*same.keys, *same.values],
                                                                  [*chunk.keys, *chunk.values]))
        return same if exact else chunk

    def _decode_record(self, data: bytes) -> Any:
        return codec.decode_record(data, self.layout, self.chunk_size)

    def _check_stored(self, key: bytes, payload: Any, blob: bytes | None) -> prov.Proof:
        """A persisted entry's proof, checked again (signature, today's CRL, the bytes)."""
        assert self.provenance is not None
        sealed, codecs = prov.decode_stored(blob)
        return self.provenance.recheck(sealed, codecs, key, payload)

    def _changed(self, change: StoreChange) -> None:
        if change.changed:
            self.dirty.set()
            if self.config.persist_dir is not None:
                save_dir(self.store, self.config.persist_dir, codec.encode_record, prov.encode_stored)

    # -- catalogs -----------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        """The catalog of what this node holds now, rebuilt from the live keys."""
        with self.lock:
            self.epoch += 1
            self.dirty.clear()
            keys = self.store.confirmed_keys()  # fetched entries wait for their audit
            return Catalog.from_keys(self.digest, self.chunk_size, keys, capacity=max(self.capacity, len(keys)),
                                     fp_rate=self.config.fp_rate, epoch=self.epoch, secret=self.catalog_key)

    def set_peer_catalog(self, node: str, body: dict[str, Any] | None) -> None:
        """A peer's catalog (None drops it: the peer went offline or cleared it)."""
        with self.lock:
            if body is None:
                self.peers.pop(node, None)
                return
        cat = Catalog.from_dict(body, secret=self.catalog_key)  # raises ProtocolError
        with self.lock:
            # a keyed catalog under a key we do not hold (we have none, or a rotation is half way)
            # tells us nothing: dropped like another model's, so no hits and no fetches
            if cat.model == self.digest and cat.chunk_size == self.chunk_size and cat.readable:
                self.unreadable.discard(node)
                if node not in self.peers and len(self.peers) >= MAX_PEER_CATALOGS:
                    return  # review M10: made-up names cannot hold catalogs (up to 16 MiB each) without bound
                self.peers[node] = cat
            else:
                self.peers.pop(node, None)
                if not cat.readable and node not in self.unreadable and len(self.unreadable) < MAX_PEER_CATALOGS:
                    self.unreadable.add(node)  # said once per peer: an operator's hint, not an error
                    log.warning("%s's catalog is keyed with catalog key %s, which this node does not hold (%s): "
                                "no KV is shared with it until both hold the same key (mesh identity issue)",
                                node, cat.kid.hex() if cat.kid else "?",
                                "none" if self.catalog_key is None else f"ours is {key_id(self.catalog_key).hex()}")

    def keys(self, ids: Sequence[int]) -> tuple[list[ChunkHash], ChunkHash]:
        return chunk_keys(self.model_key, ids), prompt_key(self.model_key, ids)

    def depths(self, ids: Sequence[int], nodes: Sequence[str], me: str) -> dict[str, int]:
        """Advertised cached-prefix depth (chunks) per node, for cache-aware routing."""
        keys, _ = self.keys(ids)
        with self.lock:
            out = {n: leading_matches(self.peers[n], keys) for n in nodes if n in self.peers and n != me}
            if me in nodes:
                out[me] = self.store.peek_prefix(keys)
        return out

    def note_link(self, node: str, nbytes: int, seconds: float, rtt_s: float) -> None:
        """Achieved bandwidth of a real fetch, smoothed per peer."""
        if nbytes < 64 * 1024 or seconds <= 0:
            return
        bw = nbytes / max(seconds - rtt_s, seconds * 0.1)
        with self.lock:
            old = self.links.get(node)
            self.links[node] = LinkEstimate(bw if old is None else 0.7 * old.bytes_per_s + 0.3 * bw, rtt_s)

    # -- serving a peer -----------------------------------------------------------------------
    def serve(self, keys: list[bytes], pkey: bytes | None, codec_name: str, max_bytes: int,
              part_bytes: int = PART_BYTES) -> Iterator[dict[str, Any]]:
        """Reply bodies (``mesh.cache.transfer.serve_parts``) with the chunks we really hold."""
        if codec_name not in codec.CODECS:
            codec_name = self.config.kv_wire
        with self.lock:
            chunks = self.store.serve_chain(keys)  # never a fetched entry before its audit
            prompt = self.store.get_prompt(pkey) if pkey is not None and len(chunks) == len(keys) \
                and pkey not in self.store.unconfirmed() else None
            proven = self.provenance is not None
            proofs = self.store.proofs(keys)[:len(chunks)] if proven else None
            entry = self.store.entry(pkey) if proven and prompt is not None and pkey is not None else None
            self.figures.served_requests += 1
            self.figures.served_chunks += len(chunks)
        sent = 0
        spoiled: list[bytes] = []
        try:
            for body, n in serve_parts(keys, chunks, pkey, prompt, codec_name, self.digest, max_bytes, part_bytes,
                                       proofs=proofs, prompt_proof=entry.proof if entry is not None else None,
                                       spoiled=spoiled):
                sent += n
                if body["last"]:
                    with self.lock:
                        self.figures.served_bytes += sent
                yield body
        finally:  # the reader may close us after the last part
            if spoiled:  # its bytes changed since they were signed (or it has no proof): not ours to keep
                log.warning("dropping %d cache entries whose bytes no longer match their proof", len(spoiled))
                with self.lock:
                    change = StoreChange()
                    for key in spoiled:
                        change = change + self.store.discard(key)
                    self._changed(change)

    # -- the ask path ------------------------------------------------------------------------
    def _cost(self, prefill_tps: float, link: LinkEstimate) -> CostModel:
        return CostModel(prefill_tokens_per_s=max(prefill_tps, 1e-3), bytes_per_chunk=self.bytes_per_chunk,
                         default_link=link, margin=self.config.fetch_margin)

    def prepare_local(self, ids: Sequence[int], defer_store: bool = False,
                      stop: Callable[[], bool] | None = None) -> Prepared:
        """:meth:`prepare` from this node's store alone: no peer is looked at or asked."""
        return self.prepare(ids, defer_store=defer_store, stop=stop)

    def prepare(self, ids: Sequence[int], prefill_tps: float = 0.0, default_link: LinkEstimate | None = None,
                fetch: Fetch | None = None, peer_links: dict[str, LinkEstimate] | None = None,
                defer_store: bool = False, stop: Callable[[], bool] | None = None) -> Prepared:
        """Restore what the cache (local, then one peer) holds, prefill the rest, store the new chunks.

        Peers are considered only with a ``fetch`` and a ``default_link``; ``prefill_tps`` (this
        node's measured prefill speed) is what fetching must beat.

        Links: a peer's bandwidth measured on earlier fetches wins over ``peer_links`` (estimated
        from heartbeats), which wins over ``default_link``. Peers that wasted a fetch recently are
        skipped (``mesh.cache.lookup.shunned``). On a remote full hit whose peer sends the last logits
        first, the returned cache is a :class:`~mesh.model.Deferred`: the rest of the transfer,
        its checks and the restore run when the decoder needs the second token. ``defer_store``:
        after a prefill, cutting the new chunks into the store waits for the first token too (the
        caller must then :meth:`Prepared.finish`). ``stop``: the prefill's hook (an abandoned ask
        ends it between decoder layers, ``mesh.model.Interrupted``)."""
        C = self.chunk_size
        t_lookup = time.perf_counter()
        keys, pkey = self.keys(ids)
        n_full = len(keys)
        info: dict[str, Any] = {"local_tokens": 0, "remote_tokens": 0, "peer": None, "fetch_bytes": 0,
                                "fetch_s": 0.0, "decision": "no-match", "full_hit": False, "chunk_size": C}
        now = time.monotonic()
        with self.lock:
            self.figures.asks += 1
            local = self.store.match_prefix(keys)
            prompt = self.store.get_prompt(pkey) if local == n_full else None
            peers = dict(self.peers)
            links = {**(peer_links or {}), **self.links}
            skip = shunned(self.strikes, {n: c.epoch for n, c in peers.items()}, now)
        if prompt is None and (fetch is None or default_link is None):
            info["decision"] = "local" if local else "no-match"
        elif prompt is None:
            extra_bytes = int(self.bytes_per_chunk / C * (len(ids) - n_full * C)) + 8 * codec.LOGITS_TOP_K + 256
            decision = decide(keys, local, peers, self.digest, C, self._cost(prefill_tps, default_link),
                              links=links, extra_bytes=extra_bytes, extra_tokens=len(ids) - n_full * C + 1,
                              exclude=skip)
            info.update(decision=decision.decision, est_transfer_s=decision.est_transfer_s,
                        peer=str(decision.peer) if decision.peer is not None else None,
                        est_recompute_s=decision.est_recompute_s, peers_considered=decision.peers_considered,
                        peers_skipped=list(decision.peers_skipped))
            info["lookup_s"] = round(time.perf_counter() - t_lookup, 6)  # the decision's own cost
            if decision.decision == RECOMPUTE:
                with self.lock:
                    self.figures.recomputes += 1
            if decision.decision == REMOTE and decision.peer is not None:
                rtt = links.get(str(decision.peer), default_link).rtt_s
                transfer = self._open(keys, local, decision, pkey, fetch, info, rtt,
                                      peers[str(decision.peer)].epoch)
                early = transfer.first_logits() if transfer.full else None
                if early is not None:
                    info["first_token"] = "peer-logits"
                    start = local

                    def rest() -> Any:
                        got, entry = self._close(transfer, info, ids, keys, start, pkey)
                        late = self._build(ids, keys, pkey, start + got, entry, info, stop=stop)
                        if int(torch.argmax(late.logits)) != int(torch.argmax(early)):
                            # only a peer forging consistent logits gets here; the checks cannot see it
                            log.warning("first token from %s's logits differs from the restored prompt's",
                                        transfer.peer)
                            info["first_token_mismatch"] = True
                        return late.cache

                    return Prepared(early, Deferred(rest), info)
                got, prompt = self._close(transfer, info, ids, keys, local, pkey)
                local += got
        else:
            info["decision"] = "local"
        return self._build(ids, keys, pkey, local, prompt, info, defer_store, stop)

    def _build(self, ids: Sequence[int], keys: list[ChunkHash], pkey: ChunkHash, local: int,
               prompt: dict[str, Any] | None, info: dict[str, Any], defer_store: bool = False,
               stop: Callable[[], bool] | None = None) -> Prepared:
        """Restore ``local`` chunks (and the prompt entry on a full hit), prefill the rest, store it."""
        C = self.chunk_size
        n_full = len(keys)
        info["local_tokens"] = local * C - info["remote_tokens"]
        with self.lock:
            chunks = self.store.get_chain(keys[:local]) if local else []
        if len(chunks) != local:  # evicted between lookup and use: recompute from what is left
            local, prompt = len(chunks), None
        if prompt is not None and local < n_full:
            prompt = None
        if prompt is None and local * C >= len(ids):
            # Every position is cached but not the last logits: recompute the last chunk for them.
            local -= 1
            chunks = chunks[:-1]
        if prompt is not None:
            # A full hit: every position's KV is here and so is the first token's distribution.
            cache = kvstate.restore_cache(self.model_config, [*chunks, prompt["tail"]])
            if info["remote_tokens"]:  # the peer sent the tail with the prompt entry
                info["remote_tokens"] = len(ids) - info["local_tokens"]
            else:
                info["local_tokens"] = len(ids)
            info["full_hit"] = True
            self._count(True, True)
            return Prepared(prompt["logits"].to(torch.float32), cache, info)
        cache = kvstate.restore_cache(self.model_config, chunks, capture=True)
        t0 = time.perf_counter()
        logits, cache = self.decoder.prefill(ids, cache, start=local * C, stop=stop)
        # The forward alone: what the node's prefill-speed estimate may learn from.
        info.update(compute_s=time.perf_counter() - t0, computed_tokens=len(ids) - local * C)
        self._count(local > 0, False)
        start = local

        def store() -> Any:
            """Cut the new chunks and the tail (before the cache decodes on). Deferred, signing
            and storing them runs on its own thread while the decoder goes on (on a Pi Zero,
            signing a long prompt's chunks held the second token for seconds), and
            :meth:`Prepared.finish` waits for it."""
            new = kvstate.cut_chunks(cache, start, n_full - start, C)
            tail = kvstate.cut_span(cache, n_full * C, len(ids))
            kvstate.end_capture(cache)
            entry = {"tail": tail, "logits": logits.detach().clone()}
            if defer_store:
                prepared.storing = threading.Thread(target=keep_logged, args=(new, tail, entry), daemon=True,
                                                    name="kv-store")
                prepared.storing.start()
            else:
                keep(new, tail, entry)
            return cache

        def keep(new: list[kvstate.ChunkKV], tail: kvstate.ChunkKV, entry: dict[str, Any]) -> None:
            t1 = time.perf_counter()
            proofs, proof = None, None
            if self.provenance is not None:  # ours: signed once, the proof goes wherever they go
                proofs = [self.provenance.sign_chunk(k, c) for k, c in zip(keys[start:], new)]
                proof = self.provenance.sign_prompt(pkey, tail, entry["logits"])
            with self.lock:
                change = self.store.put_chain(keys[start:], new, [c.nbytes for c in new],
                                              parent=keys[start - 1] if start else None, proofs=proofs)
                if n_full == 0 or keys[-1] in self.store:
                    change = change + self.store.put_prompt(pkey, keys[-1] if keys else None, entry,
                                                            codec.record_size(entry), proof)
                self._changed(change)
            info["store_s"] = round(time.perf_counter() - t1, 6)

        def keep_logged(*args: Any) -> None:
            try:
                keep(*args)
            except Exception:  # the answer goes on; this ask's KV is just not kept
                log.exception("storing the KV of an ask failed")

        # Deferred: the first token goes out before the store copies the new KV (TTFT pays nothing).
        prepared = Prepared(logits, None, info)
        prepared.cache = Deferred(store) if defer_store else store()
        return prepared

    def _count(self, hit: bool, full: bool) -> None:
        with self.lock:
            self.figures.hits += int(hit)
            self.figures.full_hits += int(full)

    def _open(self, keys: list[ChunkHash], local: int, decision: Decision, pkey: ChunkHash, fetch: Fetch,
              info: dict[str, Any], rtt_s: float, epoch: int) -> Reading:
        """Send the request for keys[local:local+remote] (and the prompt entry on a full match)."""
        peer = str(decision.peer)
        want = keys[local:local + decision.remote_chunks]
        full = local + decision.remote_chunks == len(keys)
        timeout = fetch_timeout(decision, self.fetch_floor_s, self.config.fetch_timeout_s)
        info["fetch_timeout_s"] = round(timeout, 3)
        with self.lock:
            self.figures.fetches += 1
        started = time.perf_counter()  # before the request leaves: fetch_s covers all of it
        parts = fetch(peer, list(want), pkey if full else None, timeout)
        return Reading(self.check, peer, list(want), pkey, full, parts, started, rtt_s, epoch)

    def _close(self, t: Reading, info: dict[str, Any], ids: Sequence[int], keys: list[ChunkHash], local: int,
               pkey: ChunkHash) -> tuple[int, dict[str, Any] | None]:
        """Read the rest of a transfer, keep what verified (pending its audit), and settle the
        peer's record."""
        t.finish()
        got, peer = t.got, t.peer
        prompt = None
        if t.full and t.tail is not None and t.logits is not None and len(got) == len(t.want):
            prompt = {"tail": t.tail, "logits": t.logits}
        proofs = t.proofs[:len(got)] if self.provenance is not None else None
        info.update(fetch_bytes=t.nbytes, fetch_s=round(t.seconds, 6))
        wasted = None
        if t.bad is not None:
            wasted = f"{BAD}: {t.bad}"
        elif t.capped and got:  # the leading run its budget for us allowed: we compute the rest
            info["capped"] = True
        elif len(got) < len(t.want) or (t.full and prompt is None):
            wasted = SHORT if t.complete else f"{SHORT}: {t.ended}"
        now = time.monotonic()
        with self.lock:
            if wasted is not None:
                self.figures.wasted_fetches += 1
                self.figures.wasted_by_peer[peer] = self.figures.wasted_by_peer.get(peer, 0) + 1
                self.strikes[peer] = strike(self.strikes.get(peer), BAD if t.bad else SHORT, t.epoch, now,
                                            self.penalty)
            elif peer in self.strikes and self.strikes[peer].kind != LIED:  # a liar stays shunned
                self.strikes.pop(peer, None)
        if wasted is not None:
            info["wasted"] = wasted
            log.warning("fetch from %s wasted (%s): %d of %d chunks kept", peer, wasted, len(got), len(t.want))
        if got and t.complete:
            # What a fetch really costs this node: the peer's encoding, the link and our decoding,
            # so the next decision compares recompute with all of it, not with the link alone.
            self.note_link(peer, t.nbytes, t.seconds, t.rtt_s)
        got = [self._as_stored(c) for c in got]
        with self.lock:
            change = self.store.put_chain(t.want[:len(got)], got, [c.nbytes for c in got],
                                          parent=keys[local - 1] if local else None, proofs=proofs, pending=True)
            if prompt is not None:
                change = change + self.store.put_prompt(pkey, keys[-1] if keys else None, prompt,
                                                        codec.record_size(prompt), t.prompt_proof, pending=True)
            self._changed(change)
            self.figures.fetched_chunks += len(got)
            self.figures.fetched_bytes += t.nbytes
            if got:
                info["audit"] = "pending"  # used here at once; shared once audited (NodeCache.audit)
                self._queue_audit(audits.Pending(tuple(ids), tuple(keys), local, len(got),
                                                 pkey if prompt is not None else None, peer, t.codec or "fp32"))
        info.update(peer=peer, remote_tokens=len(got) * self.chunk_size)
        if not got:
            info["decision"] = "recompute" if local == 0 else "local"
        return len(got), prompt

    def snapshot(self) -> dict[str, Any]:
        """Cache figures for the heartbeat."""
        with self.lock:
            st = self.store.stats()
            f = self.figures
            return {
                "chunks": st.chunks, "prompts": st.prompts, "bytes": st.bytes, "budget": st.budget,
                "asks": f.asks, "hits": f.hits, "full_hits": f.full_hits,
                "misses": f.asks - f.hits, "hit_rate": round(f.hits / f.asks, 3) if f.asks else 0.0,
                "chunk_hits": st.hits, "chunk_misses": st.misses, "evictions": st.evictions,
                "fetches": f.fetches, "fetched_chunks": f.fetched_chunks, "fetched_bytes": f.fetched_bytes,
                "wasted_fetches": f.wasted_fetches, "wasted_by_peer": dict(f.wasted_by_peer),
                "shunned": sorted(shunned(self.strikes, {n: c.epoch for n, c in self.peers.items()},
                                          time.monotonic())),
                "lookups": f.asks, "recompute_decisions": f.recomputes, "served_requests": f.served_requests,
                "served_chunks": f.served_chunks, "served_bytes": f.served_bytes, "peers": len(self.peers), "epoch": self.epoch,
                "peer_catalogs": {n: [c.epoch, c.count] for n, c in self.peers.items()},  # what we hold of whom
                "catalogs_unreadable": len(self.unreadable),  # keyed under a catalog key we lack
                "kv_wire": self.config.kv_wire, "chunk_size": self.chunk_size,
                "audits_passed": f.audits_passed, "audits_failed": f.audits_failed,
                "audits_inconclusive": f.audits_inconclusive, "audits_pending": len(self.audits),
                "audits_dropped": f.audits_dropped, "audit_s": round(f.audit_s, 4),
                "evidence_upheld": f.evidence_upheld, "evidence_unfounded": f.evidence_unfounded,
                "evidence_pending": len(self.reports),
            }
