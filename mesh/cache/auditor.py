"""A node's audits of fetched KV and its re-checks of other nodes' evidence: the half of
:class:`mesh.cache.node_cache.NodeCache` that recomputes (the rules are pure, in
:mod:`mesh.cache.audit` and :mod:`mesh.cache.evidence`).

:class:`AuditDuty` is mixed into ``NodeCache`` and works on its state (store, lock, figures,
provenance, peers, decoder): ``prepare`` queues a fetch (:meth:`AuditDuty._queue_audit`), the
owner's idle time runs :meth:`AuditDuty.audit` and :meth:`AuditDuty.judge`, and the evidence
handler (``mesh.cache.evidence.EvidenceSync``) hands reports to :meth:`AuditDuty.take_evidence`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mesh.cache import audit as audits
from mesh.cache import codec
from mesh.cache import evidence as evidences
from mesh.cache import kv as kvstate
from mesh.cache import provenance as prov
from mesh.cache.lookup import LIED, strike
from mesh.cache.store import StoreChange, save_dir
from mesh.cache.transfer import proven_chunk
from mesh.errors import ProtocolError

log = logging.getLogger("mesh.cache.node_cache")  # one logger for the node's cache, as before

MAX_AUDITS = 32  # fetches awaiting their audit; an older one beyond is dropped with its entries
MAX_EVIDENCE = 8  # reports of other nodes' audits awaiting their re-check; more are refused (kv-evidence-busy)
MAX_JUDGED = 4096  # (signer, key) pairs re-checked already: each is judged once
MAX_EVIDENCE_TOKENS = 1 << 15  # a report's prompt (the wire cap holds 65,536 items)


class AuditDuty:
    """Audits and evidence, over the state of the ``NodeCache`` it is mixed into."""

    # -- auditing fetched entries (mesh.cache.audit) ------------------------------------------
    def _queue_audit(self, job: audits.Pending) -> None:
        """Queue a fetch's audit (under the lock); the oldest beyond MAX_AUDITS is dropped, its
        entries with it: an entry never audited is never served."""
        self.audits.append(job)
        while len(self.audits) > MAX_AUDITS:
            old = self.audits.popleft()
            change = StoreChange()
            for key in old.fetched():
                e = self.store.entry(key)
                if e is not None and e.pending:
                    change = change + self.store.discard(key)
            self.figures.audits_dropped += 1
            self._changed(change)

    def caught(self, liar: str, proven: bool = True) -> int:
        """``liar`` computed KV that a recomputation from the first token contradicts: shun it for
        good, refuse its proofs from now on (``proven``: it signed what it sent; else it is only the
        peer that served unsigned KV), and drop everything it computed (RAM and disk), with what
        hangs off it. Returns the entries dropped."""
        with self.lock:
            self.strikes[liar] = strike(self.strikes.get(liar), LIED, self.peers[liar].epoch
                                        if liar in self.peers else 0, time.monotonic(), self.penalty)
            if not proven or self.provenance is None:
                return 0
            self.provenance.distrust(liar)
            change = StoreChange()
            for key in [e.key for e in self.store.entries() if e.proof is not None and e.proof.signer == liar]:
                change = change + self.store.discard(key)
            self._changed(change)
            log.warning("dropped %d cache entries computed by %s, caught lying", len(change.evicted), liar)
            return len(change.evicted)

    def _evidence(self, job: audits.Pending, unit: int, chunks: list[Any], proofs: list[Any],
                  pe: Any) -> dict[str, Any]:
        """The body of a KV_EVIDENCE report (``mesh.cache.evidence``) of ``unit``, in the bytes its
        computer signed; empty without provenance (an unsigned unit proves nothing to others)."""
        if self.provenance is None:
            return {}
        C = self.chunk_size
        if unit >= 0:
            proof = proofs[unit]
            enc = proven_chunk(chunks[unit], proof.codecs[0], job.keys[unit], self.digest, proof)
            return evidences.build(job.ids[:(unit + 1) * C], unit, chunk=enc) if enc is not None else {}
        proof, prompt = pe.proof, pe.payload
        tail = proven_chunk(prompt["tail"], proof.codecs[0], job.pkey, self.digest, proof)  # type: ignore[arg-type]
        logits = codec.encode_logits(prompt["logits"], key=job.pkey, model=self.digest)  # type: ignore[arg-type]
        if tail is None:
            return {}
        logits["prov"] = proof.sealed
        return evidences.build(job.ids, -1, prompt={"tail": tail, "len": prompt["tail"].length,
                                                    "prov": proof.sealed, "logits": logits})

    # -- other nodes' evidence (mesh.cache.evidence) --------------------------------------------
    def take_evidence(self, body: dict[str, Any]) -> bool:
        """Another node's report (network thread): the ids, the unit's key derived from them, its
        computer's proof over the bytes, its shape. Queued for :meth:`judge` (the worker's idle
        time) unless it names this node, a signer already shunned, or a unit judged before.
        Raises ProtocolError (counted by the caller) for what it refuses."""
        if self.provenance is None:
            return False
        C = self.chunk_size
        ids, unit = evidences.parse(body, self.vocab, C, MAX_EVIDENCE_TOKENS)
        keys, pkey = self.keys(ids)
        if unit >= 0:
            raw = body["chunk"]
            key = keys[unit]
            proof = self.provenance.check_chunk(raw, key)
            got: dict[str, Any] = {"chunk": codec.decode_chunk(raw, self.layout, C, key=key, model=self.digest)}
            name = raw["codec"]
        else:
            raw = body["prompt"]
            key = pkey
            length = raw.get("len")
            if not isinstance(length, int) or length != len(ids) - len(keys) * C or not isinstance(raw.get("tail"), dict):
                raise ProtocolError("bad-kv-evidence", "prompt tail length")
            logits_proof = self.provenance.check_logits(raw.get("logits") or {}, pkey)  # a map, or bad-logits
            proof = self.provenance.check_tail(raw, pkey, length, logits_proof)
            got = {"tail": codec.decode_chunk(raw["tail"], self.layout, length, key=pkey, model=self.digest),
                   "logits": codec.decode_logits(raw["logits"], self.vocab, key=pkey, model=self.digest)}
            name = raw["tail"]["codec"]
        judged = (proof.signer, bytes(key))
        with self.lock:
            if proof.signer == self.provenance.keys.name or proof.signer in self.provenance.liars \
                    or judged in self.judged:
                return False
            if len(self.reports) >= MAX_EVIDENCE:
                raise ProtocolError("kv-evidence-busy", "too many reports awaiting their re-check")
            if len(self.judged) >= MAX_JUDGED:
                self.judged.clear()
            self.judged.add(judged)
            self.reports.append({"ids": ids, "unit": unit, "signer": proof.signer, "codec": name, **got})
        return True

    def reports_waiting(self) -> int:
        with self.lock:
            return len(self.reports)

    def judge(self, stop: Callable[[], bool] | None = None) -> bool | None:
        """Re-check the oldest report (worker thread, idle time; ``stop`` as in :meth:`audit`):
        recompute its prompt from the first token; if the signed unit is outside its bound of it,
        its signer lied (:meth:`caught`: returns True), else the report was unfounded (False,
        counted ``kv-evidence-unfounded``). None when no report waits."""
        with self.lock:
            if not self.reports:
                return None
            r = self.reports.popleft()
        C, ids, unit, name = self.chunk_size, r["ids"], r["unit"], r["codec"]
        try:
            logits, cache = self._recompute(ids, [], len(ids), stop)
        except BaseException:
            with self.lock:
                self.reports.appendleft(r)
            raise
        if unit >= 0:
            error = audits.chunk_error(r["chunk"], kvstate.cut_chunks(cache, unit, 1, C)[0]) / audits.CHUNK_BOUND[name]
        else:
            n = len(ids) // C
            error = audits.logits_error(r["logits"], logits) / audits.LOGITS_BOUND[name]
            if r["tail"].length:
                error = max(error, audits.chunk_error(r["tail"], kvstate.cut_span(cache, n * C, len(ids)))
                            / audits.CHUNK_BOUND[name])
        if error <= 1.0:
            with self.lock:
                self.figures.evidence_unfounded += 1
            self.rejects.add("kv-evidence-unfounded")
            log.warning("a report against %s is unfounded: its unit %d agrees with this node's recomputation",
                        r["signer"], unit)
            return False
        with self.lock:
            self.figures.evidence_upheld += 1
        log.warning("a report against %s holds: its unit %d is %.1fx its bound off this node's recomputation",
                    r["signer"], unit, error)
        self.caught(r["signer"])
        return True

    def audits_waiting(self) -> int:
        with self.lock:
            return len(self.audits)

    def _recompute(self, ids: Sequence[int], base: list[Any], end: int,
                   stop: Callable[[], bool] | None) -> tuple[torch.Tensor, Any]:
        """Prefill ``ids[:end]`` over the chunks ``base`` (positions before ``len(base) * C``);
        the cache keeps every position it computed (capture)."""
        cache = kvstate.restore_cache(self.model_config, base, capture=True)
        return self.decoder.prefill(list(ids[:end]), cache, start=len(base) * self.chunk_size, stop=stop)

    def _unit_error(self, job: audits.Pending, unit: int, chunks: list[Any], prompt: dict[str, Any] | None,
                    stop: Callable[[], bool] | None) -> float:
        """How far the held ``unit`` (a chunk index, or -1: the prompt entry) is from this node's
        recomputation over the prefix held before it, in units of its bound (> 1: outside it)."""
        C, ids = self.chunk_size, job.ids
        if unit >= 0:
            _, cache = self._recompute(ids, chunks[:unit], (unit + 1) * C, stop)
            mine = kvstate.cut_chunks(cache, unit, 1, C)[0]
            return audits.chunk_error(chunks[unit], mine) / audits.CHUNK_BOUND[job.codec]
        assert prompt is not None
        n = len(job.keys)
        tail_len = len(ids) - n * C
        start = n if tail_len else n - 1  # a prompt of whole chunks: its last chunk gives the logits
        logits, cache = self._recompute(ids, chunks[:start], len(ids), stop)
        return self._prompt_error(job, prompt, logits, cache)

    def _prompt_error(self, job: audits.Pending, prompt: dict[str, Any], logits: torch.Tensor, cache: Any) -> float:
        n_tokens = len(job.ids) - len(job.keys) * self.chunk_size
        err = audits.logits_error(prompt["logits"], logits) / audits.LOGITS_BOUND[job.codec]
        if n_tokens:
            tail = kvstate.cut_span(cache, len(job.keys) * self.chunk_size, len(job.ids))
            err = max(err, audits.chunk_error(prompt["tail"], tail) / audits.CHUNK_BOUND[job.codec])
        return err

    def _first_wrong(self, job: audits.Pending, unit: int, chunks: list[Any], prompt: dict[str, Any] | None,
                     stop: Callable[[], bool] | None) -> int | None:
        """One prefill from the first token through ``unit``, which no held KV can sway: the first
        held unit up to ``unit`` outside its bound against it (-1: the prompt entry), or None."""
        C, ids = self.chunk_size, job.ids
        upto = unit if unit >= 0 else len(chunks) - 1
        logits, cache = self._recompute(ids, [], len(ids) if unit < 0 else (upto + 1) * C, stop)
        mine = kvstate.cut_chunks(cache, 0, upto + 1, C)
        bound = audits.CHUNK_BOUND[job.codec]
        wrong = next((j for j in range(upto + 1) if audits.chunk_error(chunks[j], mine[j]) > bound), None)
        if wrong is None and unit < 0 and prompt is not None and self._prompt_error(job, prompt, logits, cache) > 1.0:
            return -1
        return wrong

    def _signer(self, job: audits.Pending, unit: int, proof: Any) -> str | None:
        """Who computed ``unit``: its proof's signer (never this node: its own KV over a prefix
        it took is not a lie of its own), the serving peer for an unsigned unit it fetched."""
        if proof is not None:
            me = self.provenance.keys.name if self.provenance is not None else None
            return proof.signer if proof.signer != me else None
        fetched = unit < 0 or job.first <= unit < job.first + job.count
        return job.peer if fetched and self.provenance is None else None

    def audit(self, stop: Callable[[], bool] | None = None) -> audits.Verdict | None:
        """Audit the oldest fetch awaiting it (run on the worker thread, between asks; ``stop``:
        the prefill's hook, an arriving ask interrupts it with ``mesh.model.Interrupted`` and the
        fetch keeps its place). None when nothing of it is left to audit (evicted meanwhile).

        One fetched chunk is picked with the CSPRNG and, on a full hit, the prompt entry is taken
        too (its logits decide every later full hit's first token); each is recomputed over the
        prefix held before it. All within their bounds: the fetch's entries are confirmed (advertised, served, persisted). Outside it, the prompt is
        recomputed from the first token through that unit, which no held KV can sway, and the
        first held unit that disagrees with it is a lie of its computer (its signature says who;
        the serving peer for an unsigned one), who is :meth:`caught`. If none disagrees (or it
        is this node's own), nobody is blamed; the fetch, and the wrong unit with what hangs off
        it, are dropped either way."""
        with self.lock:
            if not self.audits:
                return None
            job = self.audits.popleft()
            keys = list(job.keys)
            end = min(job.first + job.count, self.store.peek_prefix(keys))
            held = [self.store.entry(k) for k in keys[:end]]
            chunks = [e.payload for e in held if e is not None]
            proofs = [e.proof for e in held if e is not None]
            pe = self.store.entry(job.pkey) if job.pkey is not None and end == len(keys) else None
            prompt = pe.payload if pe is not None and pe.pending else None
        units = max(end - job.first, 0)
        # one chunk the peer cannot predict, and on a full hit always the prompt entry: its logits
        # decide the first token of every later full hit, the likeliest lie (review E2)
        picks = ([job.first + audits.pick(units)] if units else []) + ([-1] if prompt is not None else [])
        if not picks:
            return None
        t0 = time.perf_counter()
        try:
            for unit in picks:
                error = self._unit_error(job, unit, chunks, prompt, stop)
                if error > 1.0:
                    break
            wrong = None if error <= 1.0 else self._first_wrong(job, unit, chunks, prompt, stop)
        except BaseException:
            with self.lock:
                job.tries += 1
                self.audits.appendleft(job)  # interrupted by an ask: audited again when idle
            raise
        seconds = time.perf_counter() - t0
        culprit = None
        if wrong is not None:
            culprit = self._signer(job, wrong, pe.proof if wrong < 0 and pe is not None else
                                   (proofs[wrong] if wrong >= 0 else None))
        verdict = audits.Verdict(error <= 1.0, unit, error, seconds, culprit=culprit,
                                 wrong=wrong if wrong is not None else unit, audited=tuple(picks))
        with self.lock:
            self.figures.audit_s = seconds
            if verdict.passed:
                self.figures.audits_passed += 1
                if self.store.confirm(job.fetched()):
                    self.dirty.set()
                    if self.config.persist_dir is not None:
                        save_dir(self.store, self.config.persist_dir, codec.encode_record, prov.encode_stored)
                return verdict
            change = StoreChange()
            wrong_key = (job.pkey if verdict.wrong < 0 else keys[verdict.wrong]) if wrong is not None else None
            for key in [*job.fetched(), *([wrong_key] if wrong_key is not None else [])]:  # with what hangs off
                change = change + self.store.discard(key)
            self._changed(change)
            if culprit is None:
                self.figures.audits_inconclusive += 1
                log.warning("audit of a fetch from %s: unit %d disagrees with the prefix held, but no other "
                            "node is to blame; dropped the fetch", job.peer, unit)
                return verdict
            self.figures.audits_failed += 1
            self.rejects.add("kv-audit-failed")
            verdict.evidence = self._evidence(job, verdict.wrong, chunks, proofs, pe)
            log.warning("audit of a fetch from %s failed: unit %d is %.1fx its bound off; unit %d was computed "
                        "by %s, which lied", job.peer, unit, error, verdict.wrong, culprit)
        self.caught(culprit, proven=self.provenance is not None)
        return verdict
