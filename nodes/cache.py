"""A node's prompt cache: the shell around mesh.kvstore / catalog / lookup / kvstate.

It owns the node's KV store (behind one lock: the worker, the serving thread and the network
thread all reach it), the catalog it publishes, the peer catalogs it has heard, and the per-peer
link estimates measured from real fetches. The agent calls :meth:`prepare` on its worker thread
for every ask; fetching from a peer goes through a ``fetch`` callable the agent provides (MQTT).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import torch

from mesh import kvstate, wire
from mesh.catalog import Catalog, leading_matches
from mesh.chunks import ChunkHash, ModelKey, chunk_keys, prompt_key
from mesh.config import CacheConfig
from mesh.errors import ProtocolError
from mesh.kvstore import KVStore, StoreChange, load_dir, save_dir
from mesh.lookup import RECOMPUTE, REMOTE, CostModel, Decision, LinkEstimate, decide
from mesh.model import Decoder, LoadedModel

log = logging.getLogger(__name__)

# What fetch returns: the peer's chunk dicts in order, its prompt entry dict (or None), the bytes
# received and the seconds it took; None when the peer did not answer in time.
FetchResult = tuple[list[Any], dict[str, Any] | None, int, float]
Fetch = Callable[[str, list[bytes], bytes | None, float], FetchResult | None]


@dataclass
class CacheFigures:
    asks: int = 0
    hits: int = 0  # asks that reused at least one cached token (local or fetched)
    full_hits: int = 0  # asks whose first token needed no forward pass
    fetches: int = 0
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    wasted_fetches: int = 0  # a peer sent fewer chunks than its catalog promised, or bad ones
    recomputes: int = 0  # a peer held more, but recomputing was estimated faster
    served_requests: int = 0
    served_chunks: int = 0
    served_bytes: int = 0
    wasted_by_peer: dict[str, int] = field(default_factory=dict)


@dataclass
class Prepared:
    """What :meth:`NodeCache.prepare` hands the decoder, and the record for ``mesh ask --json``."""

    logits: torch.Tensor
    cache: Any
    info: dict[str, Any]


def _tokenizer_id(loaded: LoadedModel) -> str:
    tok = loaded.tokenizer
    return f"{type(tok).__name__}/{len(tok)}/gguf:{loaded.digest[:16]}"


class NodeCache:
    def __init__(self, loaded: LoadedModel, config: CacheConfig, decoder: Decoder) -> None:
        self.config = config
        self.loaded = loaded
        self.decoder = decoder
        self.model_config = loaded.model.config
        self.chunk_size = config.chunk_size
        self.model_key = ModelKey(model_digest=loaded.digest, tokenizer=_tokenizer_id(loaded),
                                  kv_dtype="float32", chunk_size=config.chunk_size)
        self.digest = self.model_key.digest()
        self.layout = kvstate.kv_layout(self.model_config)
        self.bytes_per_chunk = kvstate.wire_bytes_per_token(self.model_config, config.kv_wire,
                                                            self.chunk_size) * self.chunk_size
        mem_per_chunk = sum(2 * h * d * 4 for h, d in self.layout) * self.chunk_size
        budget = int(config.budget_mb * 1024 * 1024)
        # Capacity for the Bloom sizing: every chunk the budget can hold, plus as many prompt keys.
        self.capacity = max(256, 2 * budget // max(mem_per_chunk, 1))
        self.store = KVStore(budget, self.digest)
        self.lock = threading.RLock()
        self.peers: dict[str, Catalog] = {}
        self.links: dict[str, LinkEstimate] = {}
        self.figures = CacheFigures()
        self.epoch = 0
        self.dirty = threading.Event()
        self.dirty.set()
        if config.persist_dir is not None:
            report = load_dir(self.store, config.persist_dir, self._decode_record, size=self._size)
            for name, why in report.skipped:
                log.warning("cache file %s skipped: %s", name, why)
            log.info("prompt cache restored %d entries from %s", len(report.change.added), config.persist_dir)

    # -- persistence codec (exact fp32, so a restarted node answers bit-identically) ----------
    def _encode_record(self, payload: Any) -> bytes:
        if isinstance(payload, kvstate.ChunkKV):
            return cbor2.dumps({"chunk": kvstate.encode_chunk(payload, "fp32")})
        return cbor2.dumps({"tail": kvstate.encode_chunk(payload["tail"], "fp32"), "len": payload["tail"].length,
                            "logits": wire.pack_tensor(payload["logits"])})

    def _decode_record(self, data: bytes) -> Any:
        obj = cbor2.loads(data)
        if "chunk" in obj:
            return kvstate.decode_chunk(obj["chunk"], self.layout, self.chunk_size)
        return {"tail": kvstate.decode_chunk(obj["tail"], self.layout, int(obj["len"])),
                "logits": wire.unpack_tensor(obj["logits"])}

    @staticmethod
    def _size(payload: Any) -> int:
        if isinstance(payload, kvstate.ChunkKV):
            return payload.nbytes
        return payload["tail"].nbytes + payload["logits"].numel() * payload["logits"].element_size()

    def _changed(self, change: StoreChange) -> None:
        if change.changed:
            self.dirty.set()
            if self.config.persist_dir is not None:
                save_dir(self.store, self.config.persist_dir, self._encode_record)

    # -- catalogs -----------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        """The catalog of what this node holds now, rebuilt from the live keys."""
        with self.lock:
            self.epoch += 1
            self.dirty.clear()
            keys = [*self.store.chunk_keys(), *self.store.prompt_keys()]
            return Catalog.from_keys(self.digest, self.chunk_size, keys, capacity=max(self.capacity, len(keys)),
                                     fp_rate=self.config.fp_rate, epoch=self.epoch)

    def set_peer_catalog(self, node: str, body: dict[str, Any] | None) -> None:
        """A peer's catalog (None drops it: the peer went offline or cleared it)."""
        with self.lock:
            if body is None:
                self.peers.pop(node, None)
                return
        cat = Catalog.from_dict(body)  # raises ProtocolError
        with self.lock:
            if cat.model == self.digest and cat.chunk_size == self.chunk_size:
                self.peers[node] = cat
            else:
                self.peers.pop(node, None)

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
    def serve(self, keys: list[bytes], pkey: bytes | None, codec: str,
              max_bytes: int) -> list[dict[str, Any]]:
        """Reply bodies (each under ``max_bytes``) with the chunks we really hold, in order."""
        if codec not in kvstate.CODECS:
            codec = self.config.kv_wire
        with self.lock:
            chunks = self.store.get_chain(keys)
            prompt = self.store.get_prompt(pkey) if pkey is not None and len(chunks) == len(keys) else None
        bodies: list[dict[str, Any]] = []
        batch: list[Any] = []
        size = 0
        for key, chunk in zip(keys, chunks):
            enc = kvstate.encode_chunk(chunk, codec, key=key, model=self.digest)
            n = sum(len(t["data"]) for layer in enc["layers"] for t in (layer["k"], layer["v"])) + 512
            if batch and size + n > max_bytes // 2:
                bodies.append({"chunks": batch, "part": len(bodies), "last": False})
                batch, size = [], 0
            batch.append(enc)
            size += n
        last: dict[str, Any] = {"chunks": batch, "part": len(bodies), "last": True}
        if prompt is not None and pkey is not None:
            last["prompt"] = {"tail": kvstate.encode_chunk(prompt["tail"], codec, key=pkey, model=self.digest),
                              "len": prompt["tail"].length,
                              "logits": wire.pack_tensor(prompt["logits"].to(torch.float16 if codec != "fp32"
                                                                             else torch.float32))}
        bodies.append(last)
        with self.lock:
            self.figures.served_requests += 1
            self.figures.served_chunks += len(chunks)
        return bodies

    # -- the ask path ------------------------------------------------------------------------
    def _cost(self, prefill_tps: float, link: LinkEstimate) -> CostModel:
        return CostModel(prefill_tokens_per_s=max(prefill_tps, 1e-3), bytes_per_chunk=self.bytes_per_chunk,
                         default_link=link, margin=self.config.fetch_margin)

    def prepare(self, ids: Sequence[int], prefill_tps: float, default_link: LinkEstimate,
                fetch: Fetch, peer_links: dict[str, LinkEstimate] | None = None) -> Prepared:
        """Restore what the cache (local, then one peer) holds, prefill the rest, store the new chunks.

        Links: a peer's bandwidth measured on earlier fetches wins over ``peer_links`` (estimated
        from heartbeats), which wins over ``default_link``."""
        C = self.chunk_size
        keys, pkey = self.keys(ids)
        n_full = len(keys)
        info: dict[str, Any] = {"local_tokens": 0, "remote_tokens": 0, "peer": None, "fetch_bytes": 0,
                                "fetch_s": 0.0, "decision": "no-match", "full_hit": False, "chunk_size": C}
        with self.lock:
            self.figures.asks += 1
            local = self.store.match_prefix(keys)
            prompt = self.store.get_prompt(pkey) if local == n_full else None
            peers = dict(self.peers)
            links = {**(peer_links or {}), **self.links}
        decision: Decision | None = None
        if prompt is None:
            extra_bytes = int(self.bytes_per_chunk / C * (len(ids) - n_full * C)) + 2 * self.loaded.model.config.vocab_size
            decision = decide(keys, local, peers, self.digest, C, self._cost(prefill_tps, default_link),
                              links=links, extra_bytes=extra_bytes, extra_tokens=len(ids) - n_full * C + 1)
            info.update(decision=decision.decision, est_transfer_s=decision.est_transfer_s,
                        peer=str(decision.peer) if decision.peer is not None else None,
                        est_recompute_s=decision.est_recompute_s, peers_considered=decision.peers_considered)
            if decision.decision == RECOMPUTE:
                with self.lock:
                    self.figures.recomputes += 1
            if decision.decision == REMOTE and decision.peer is not None:
                rtt = links.get(str(decision.peer), default_link).rtt_s
                got, prompt = self._fetch(keys, local, decision, pkey, fetch, info, rtt)
                local += got
        else:
            info["decision"] = "local"
        info["local_tokens"] = local * C - info["remote_tokens"]
        with self.lock:
            chunks = self.store.get_chain(keys[:local]) if local else []
        if len(chunks) != local:  # evicted between lookup and use: recompute from what is left
            local, prompt = len(chunks), None
        if prompt is None and local * C >= len(ids):
            # Every position is cached but not the last logits: recompute the last chunk for them.
            local -= 1
            chunks = chunks[:-1]
        if prompt is not None and local == n_full:
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
        logits, cache = self.decoder.prefill(ids, cache, start=local * C)
        # The forward alone: what the node's prefill-speed estimate may learn from.
        info.update(compute_s=time.perf_counter() - t0, computed_tokens=len(ids) - local * C)
        new = kvstate.cut_chunks(cache, local, n_full - local, C)
        tail = kvstate.cut_span(cache, n_full * C, len(ids))
        kvstate.end_capture(cache)
        with self.lock:
            change = self.store.put_chain(keys[local:], new, [c.nbytes for c in new],
                                          parent=keys[local - 1] if local else None)
            if n_full == 0 or keys[-1] in self.store:
                entry = {"tail": tail, "logits": logits.detach().clone()}
                change = change + self.store.put_prompt(pkey, keys[-1] if keys else None, entry, self._size(entry))
            self._changed(change)
        self._count(local > 0, False)
        return Prepared(logits, cache, info)

    def _count(self, hit: bool, full: bool) -> None:
        with self.lock:
            self.figures.hits += int(hit)
            self.figures.full_hits += int(full)

    def _fetch(self, keys: list[ChunkHash], local: int, decision: Decision, pkey: bytes, fetch: Fetch,
               info: dict[str, Any], rtt_s: float) -> tuple[int, dict[str, Any] | None]:
        """Fetch keys[local:depth] (and the prompt entry on a full match); keep what verifies."""
        peer = str(decision.peer)
        want = keys[local:local + decision.remote_chunks]
        full = local + decision.remote_chunks == len(keys)
        timeout = min(self.config.fetch_timeout_s, 3.0 * (decision.est_transfer_s or 1.0) + 2.0)
        started = time.perf_counter()
        result = fetch(peer, list(want), pkey if full else None, timeout)
        with self.lock:
            self.figures.fetches += 1
        got: list[kvstate.ChunkKV] = []
        prompt = None
        if result is not None:
            raw_chunks, raw_prompt, nbytes, seconds = result
            info.update(fetch_bytes=nbytes, fetch_s=round(seconds, 6))
            for key, raw in zip(want, raw_chunks):
                try:
                    got.append(kvstate.decode_chunk(raw, self.layout, self.chunk_size, key=key, model=self.digest))
                except ProtocolError as exc:
                    log.warning("chunk from %s rejected: %s", peer, exc)
                    break
            if raw_prompt is not None and len(got) == len(want):
                try:
                    tail = kvstate.decode_chunk(raw_prompt["tail"], self.layout, int(raw_prompt["len"]),
                                                key=pkey, model=self.digest)
                    logits = wire.unpack_tensor(raw_prompt["logits"]).to(torch.float32)
                    if logits.shape != (self.loaded.model.config.vocab_size,):
                        raise ProtocolError("bad-chunk", "logits shape")
                    prompt = {"tail": tail, "logits": logits}
                except (ProtocolError, KeyError, TypeError, ValueError) as exc:
                    log.warning("prompt entry from %s rejected: %s", peer, exc)
        if len(got) < len(want) or (full and prompt is None):
            with self.lock:
                self.figures.wasted_fetches += 1
                self.figures.wasted_by_peer[peer] = self.figures.wasted_by_peer.get(peer, 0) + 1
        if result is not None and got:
            # What a fetch really costs this node: the peer's encoding, the link and our decoding,
            # so the next decision compares recompute with all of it, not with the link alone.
            self.note_link(peer, info["fetch_bytes"], time.perf_counter() - started, rtt_s)
        with self.lock:
            change = self.store.put_chain(want[:len(got)], got, [c.nbytes for c in got],
                                          parent=keys[local - 1] if local else None)
            if prompt is not None:
                change = change + self.store.put_prompt(pkey, keys[-1] if keys else None, prompt, self._size(prompt))
            self._changed(change)
            self.figures.fetched_chunks += len(got)
            self.figures.fetched_bytes += info["fetch_bytes"]
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
                "wasted_fetches": f.wasted_fetches, "recompute_decisions": f.recomputes, "served_requests": f.served_requests,
                "served_chunks": f.served_chunks, "peers": len(self.peers), "epoch": self.epoch,
                "kv_wire": self.config.kv_wire, "chunk_size": self.chunk_size,
            }

