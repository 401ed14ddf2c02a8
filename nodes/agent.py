"""`mesh node`: the node agent process.

Threads and who owns them (all stopped by :meth:`NodeAgent.stop`):

- paho's network thread: runs message handlers, which only decode, check and enqueue;
- the worker thread: all torch work (prefill, decode), one ask at a time, from a bounded queue;
- the heartbeat thread: a ping round trip to the broker and a heartbeat every period.

Startup order matters for routing (see ``mesh.routing``): load the model, connect with the last
will ``offline``, publish ``online`` and wait for the ack, and only then subscribe to the topics
the router serves.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh import budget, topics, wire
from mesh.auth.keyring import Keyring
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from mesh.config import NodeConfig
from mesh.errors import MeshError
from mesh.model import WARMUP_TEXT, Decoder, Interrupted, LoadedModel, load_model
from mesh.cache.lookup import LinkEstimate
from mesh.cache.evidence import EvidenceSync
from mesh.cache.peers import CatalogSync, default_link, peer_links
from mesh.cache.quota import ByteBuckets, default_burst
from mesh.loops import guarded
from mesh.cache.transfer import PeerTransfer
from mesh.cache.node_cache import NodeCache, Prepared
from mesh.member import AgentExtension, Job, Member, Stream, shows_cache, with_extension_fields
from mesh.uplink_probe import LinkProbe

log = logging.getLogger(__name__)


@dataclass
class Figures:
    """What the heartbeat reports; written by the worker, read by the heartbeat thread."""

    served: int = 0
    failed: int = 0
    prefill_spt: float = 0.0  # seconds per prompt token, EWMA: a slow-down shows up at once
    spt_measured: bool = False  # False while prefill_spt is only the start-up warm-up's figure
    spt_probes: int = 0  # idle re-measurements since (see Timing.speed_probe_idle_s)
    decode_tps: float = 0.0
    rtt_ms: float | None = None
    link_bw: float | None = None  # bytes/s through the broker, from large self-pings
    busy_s: float = 0.0
    last_ttft_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prefill_tps(self) -> float:
        return 1.0 / self.prefill_spt if self.prefill_spt > 0 else 100.0

    def ewma(self, name: str, value: float, alpha: float = 0.3) -> None:
        old = getattr(self, name)
        setattr(self, name, value if not old else (1 - alpha) * old + alpha * value)


def physical_memory() -> int:
    """Bytes of memory this process may use (what ``mesh.budget.default_max_context`` takes a
    share of): its cgroup's limit, else the board's RAM (``mesh.sysmem.memory_limit``)."""
    from mesh import sysmem

    try:
        return sysmem.memory_limit().bytes
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class NodeAgent:
    def __init__(self, config: NodeConfig, loaded: LoadedModel | None = None,
                 extensions: list[AgentExtension] | None = None, keyring: Keyring | None = None) -> None:
        """``keyring``: this node's identity (``mesh.auth.store.load_keyring``): asks opened, answers,
        forwards and heartbeats sealed with it; None runs unauthenticated, as before identities."""
        self.config = config
        self.keys = keyring
        self.extensions = list(extensions or [])
        self.roles: list[str] = [r for e in self.extensions for r in getattr(e, "roles", ())]
        self.name = config.name
        self.limits = config.limits
        self.timing = config.timing
        self.loaded = loaded
        self.rejects = wire.RejectCounter()
        self.figures = Figures()
        self._job_started: float | None = None
        self._load = 0.0  # busy fraction, EWMA over heartbeat periods
        self._threads: list[threading.Thread] = []
        self.cache: NodeCache | None = None
        self.transfer: PeerTransfer | None = None  # the cache's KV traffic with peers
        self.catalogs: CatalogSync | None = None
        self.evidence: EvidenceSync | None = None  # lies caught by audits, ours and other nodes'
        self._started = time.time()
        self.bus = MqttBus(f"mesh-node-{self.name}", config.broker,
                           will=(topics.node_status(self.name), topics.OFFLINE, topics.STATUS.qos, True),
                           keepalive=self.timing.keepalive_s)
        self.member = Member(self.name, self.bus, self.limits, self.rejects,
                             dedupe_window_s=self.timing.dedupe_window_s, depths=self._cache_depths,
                             on_presence=self._on_presence, route_threshold=config.cache.route_threshold,
                             label=f"node {self.name}", ask_timeout_s=self.timing.ask_timeout_s,
                             keyring=keyring)
        self._stop = self.member.stop_event
        self._working, self._worked = threading.Event(), threading.Event()  # work() began, ended
        self.inbox = ReplyInbox(self.bus, f"node-{self.name}", self.rejects, self.limits.max_message_bytes,
                                keyring=keyring)  # KV parts and our link pings: sealed, when we hold keys
        self.link = LinkProbe(self.bus, self.inbox, self.name, interval_s=self.timing.link_ping_s,
                              late_s=self.timing.link_late_s, timeout_s=self.timing.link_timeout_s)
        self._wake = threading.Event()  # an answered ask: publish fresh load figures now

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, work_here: bool = False) -> None:
        """Load, connect, go online and start the node's threads; ``work_here``: not the one that
        answers asks, which the caller then runs itself on its main thread (:meth:`work`)."""
        if self.loaded is None:
            self.loaded = load_model(self.config.home, self.config.model, self.config.threads)
        self.decoder = Decoder(self.loaded)
        self._warm_up()
        if self.config.cache.enabled:
            # with our identity, every cached chunk carries a proof of who computed it
            self.cache = NodeCache(self.loaded, self.config.cache, self.decoder, keyring=self.keys,
                                   rejects=self.rejects)
        self.bus.on_connected(self._announce)
        self.member.subscribe_presence(self.bus)
        if self.cache is not None:
            self._start_cache_peers(self.cache)
        self.bus.start(self.timing.connect_timeout_s)
        self.inbox.start()
        self.member.go_online(self._full_heartbeat)
        loops = [*([] if work_here else [(self._work_loop, "worker")]), (self._heartbeat_loop, "heartbeat")]
        for target, name in loops:
            t = threading.Thread(target=guarded(f"{self.name}-{name}", target, self._stop, self.rejects),
                                 name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.link.start()
        self._each_extension("start", self)
        log.info("node %s online with %s (%s)", self.name, self.loaded.key, self.loaded.model_key)

    @functools.cached_property
    def max_context(self) -> int:
        """Prompt and new tokens one ask may take (``--max-context``, else ``mesh.budget``'s default)."""
        return self.limits.max_context or budget.default_max_context(self.loaded.model.config, physical_memory())

    def stop(self, timeout: float = 10.0) -> None:
        """Go offline cleanly: status ``offline``, refuse queued asks, stop every thread."""
        self._wake.set()
        self.member.go_offline()
        self.link.stop()
        for t in self._threads:
            t.join(timeout)
        if self._working.is_set():  # the loop on the caller's thread: its ask ends before the bus does
            self._worked.wait(timeout)
        self._each_extension("stop")
        self.bus.stop()

    def wait(self) -> None:
        self._stop.wait()

    def work(self) -> None:
        """Answer asks on the calling thread until the node goes offline (after ``start(work_here=True)``).

        A process's main thread should run the forwards: torch's OpenMP (libgomp) counts the
        main thread as managed even when another thread leads a parallel region, so a forward on
        a worker thread using every core has more managed threads than cores, and libgomp's
        workers then sleep between regions instead of spinning: two context switches per region,
        and a decode step is hundreds of small regions (measured on this machine, 2 threads: a
        SmolLM2 decode at 31 tok/s on a worker thread, 55-70 on the main thread; an int4 matmul
        20 us vs 64 us; results/2026-12-07/omp_main_thread.py)."""
        self._working.set()
        try:
            guarded(f"{self.name}-worker", self._work_loop, self._stop, self.rejects)()
        finally:
            self._worked.set()

    def _announce(self) -> None:
        if self.member.announce():
            self._wake.set()  # a heartbeat now: routers that lost us count our silence from their reconnect
            if self.cache is not None:
                self.cache.dirty.set()  # a restarted broker lost our retained catalog

    def _timed_spt(self, ids: list[int], runs: int = 1, stop: Callable[[], bool] | None = None) -> float:
        """Seconds per token of prefilling ``ids``, the fastest of ``runs`` forwards (``stop``: see
        :meth:`Decoder.prefill`)."""
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            self.decoder.prefill(ids, stop=stop)
            best = min(best, time.perf_counter() - t0)
        return max(best, 1e-6) / len(ids)

    def _warm_up(self) -> None:
        # the first calls pay lazy initialisation; keep the fastest of three
        self.figures.prefill_spt = self._timed_spt(self.decoder.encode(WARMUP_TEXT), runs=3)

    def _probe_speed(self, idle_since: float) -> bool:
        """On an idle worker whose prefill speed no ask has measured yet: one more warm-up forward
        (64 tokens), whose speed replaces the figure. The start-up figure can be off several-fold
        either way (measured under the load of loading, or before a CPU quota applied), and the
        fetch-or-recompute decision of the first asks rests on it. An ask that arrives meanwhile
        ends the probe at the next decoder layer (not counted): on a Pi Zero-class device the
        probe takes ~12 s, which an ask must not wait for. Returns whether it probed."""
        if (self.figures.spt_measured or self.figures.spt_probes >= self.timing.speed_probes
                or time.monotonic() - idle_since < self.timing.speed_probe_idle_s):
            return False
        try:
            spt = self._timed_spt(self.decoder.encode(WARMUP_TEXT * 2)[:64],
                                  stop=lambda: not self.member.jobs.empty() or self._stop.is_set())
        except Interrupted:
            log.debug("prefill speed probe gave way to an ask")
            return False
        with self.figures.lock:
            if not self.figures.spt_measured:  # an ask may have measured it meanwhile
                self.figures.prefill_spt = spt
            self.figures.spt_probes += 1
        log.debug("prefill speed probe %d: %.2f ms per token", self.figures.spt_probes, 1e3 * spt)
        return True

    # -- membership hooks (network thread: never torch) ----------------------------------------------
    def _on_presence(self, name: str, online: bool | None) -> None:
        if not online and self.cache is not None:  # offline or decommissioned: its catalog is gone
            self.cache.set_peer_catalog(name, None)

    def _cache_depths(self, env: wire.Envelope, names: list[str]) -> dict[str, int]:
        if self.cache is None or env.body.get("no_cache") or not names:
            return {}
        try:
            ids = self.decoder.encode(env.body["text"])
        except Exception:  # a prompt the tokenizer refuses is routed by load
            return {}
        return self.cache.depths(ids, names, self.name)

    def _each_extension(self, method: str, *args: Any) -> None:
        for ext in self.extensions:
            try:
                getattr(ext, method)(*args)
            except Exception:
                log.exception("extension %s.%s failed", type(ext).__name__, method)

    # -- worker (torch) ---------------------------------------------------------------------------
    def _work_loop(self) -> None:
        def started(t0: float) -> None:
            with self.figures.lock:
                self._job_started = t0

        def finished(t0: float, outcome: str) -> None:
            with self.figures.lock:
                self.figures.busy_s += time.monotonic() - t0
                self._job_started = None
                self.figures.failed += outcome == "failed"
            self._wake.set()

        self.member.work(self._answer, idle=self._idle, started=started, finished=finished)

    def _idle(self, idle_since: float) -> bool:
        """The worker's idle time: first the audits of fetched KV (``NodeCache.audit``, one per
        call: an ask that arrives meanwhile ends it at the next decoder layer, and it is audited
        again later; the evidence of a lie is published for every node), then other nodes'
        evidence (``NodeCache.judge``), then the prefill speed probe."""
        cache = self.cache
        if cache is not None and (cache.audits_waiting() or cache.reports_waiting()):
            stop = lambda: not self.member.jobs.empty() or self._stop.is_set()  # noqa: E731
            try:
                if cache.audits_waiting():
                    verdict = cache.audit(stop=stop)
                    if verdict is not None and verdict.evidence and self.evidence is not None:
                        try:
                            self.evidence.publish(dict(verdict.evidence))
                        except MeshError as exc:
                            log.warning("KV evidence not published: %s", exc)
                else:
                    cache.judge(stop=stop)
            except Interrupted:
                log.debug("an audit gave way to an ask")
                return False
            return True
        return self._probe_speed(idle_since)

    def _answer(self, job: Job) -> None:
        body = job.env.body
        started = time.monotonic()
        ids = self.decoder.encode(body["text"])
        tokenize_s = time.monotonic() - started
        if budget.context_problem(len(ids), body["max_new_tokens"], self.max_context):
            raise budget.Abandoned(budget.TOO_LONG, f"{len(ids)} prompt tokens and {body['max_new_tokens']} new "
                                   f"exceed node {self.name}'s maximum context of {self.max_context} tokens")
        on_text = Stream(self.member, job)

        cache_info: dict[str, Any] = {"local_tokens": 0, "remote_tokens": 0, "peer": None,
                                      "decision": "disabled" if self.cache is None else "no-cache"}
        held: list[Prepared] = []
        stop = lambda: self.member.must_stop(job)  # noqa: E731  (the forward's hook, between layers)
        if self.cache is not None and not body.get("no_cache"):
            def prepare() -> tuple[Any, Any]:
                prepared = self.cache.prepare(ids, self.figures.prefill_tps(), self._default_link(),
                                              self.transfer.fetch if self.transfer else None, self._peer_links(),
                                              defer_store=True, stop=stop)
                held.append(prepared)
                return prepared.logits, prepared.cache
        else:
            def prepare() -> tuple[Any, Any]:
                t0 = time.perf_counter()
                out = self.decoder.prefill(ids, stop=stop)
                cache_info.update(computed_tokens=len(ids), compute_s=time.perf_counter() - t0)
                return out
        try:
            gen = self.decoder.generate(ids, body["max_new_tokens"], tuple(body.get("stop", ())), on_text,
                                        prepare=prepare)
        except Interrupted:
            self.member.checkpoint(job)  # raises why the forward stopped
            raise
        on_text.flush()
        for prepared in held:  # a deferred transfer ends (and is stored) even after a one-token answer
            prepared.finish()
            cache_info.clear()
            cache_info.update(prepared.info)
        done = time.monotonic()
        ttft = (on_text.first_at or done) - job.received
        with self.figures.lock:
            self.figures.served += 1
            self.figures.last_ttft_s = ttft
            # Learn prefill speed from forwards alone (not restores or fetches), and only from
            # long enough ones: a short forward is mostly fixed per-call overhead.
            computed = int(cache_info.get("computed_tokens", 0))
            seconds = float(cache_info.get("compute_s", 0.0))
            if computed >= 64 and seconds > 0:
                spt = seconds / computed
                if self.figures.spt_measured:
                    self.figures.ewma("prefill_spt", spt, alpha=0.5)
                else:  # the warm-up ran while other processes loaded: a real ask replaces it
                    self.figures.prefill_spt, self.figures.spt_measured = spt, True
            if len(gen.token_ids) > 1 and gen.decode_s > 0:
                self.figures.ewma("decode_tps", (len(gen.token_ids) - 1) / gen.decode_s)
        answer = {
            "text": gen.text, "node": self.name, "model": self.loaded.key,
            "prompt_tokens": len(ids), "new_tokens": len(gen.token_ids), "token_ids": gen.token_ids,
            "ttft_s": round(ttft, 6), "ttlt_s": round(done - job.received, 6),
            "queue_s": round(started - job.received, 6), "tokenize_s": round(tokenize_s, 6),
            "prefill_s": round(gen.prefill_s, 6),
            "decode_s": round(gen.decode_s, 6), "stop_reason": gen.stop_reason,
        }
        if shows_cache(job):  # never to Home Assistant: it would say who asked what before (M1)
            answer["cache"] = cache_info
        log.info("answered %s: %d prompt tokens (cache %s, %d local, %d remote), %d new, TTFT %.3f s, TTLT %.3f s",
                 job.env.corr, len(ids), cache_info.get("decision"), cache_info.get("local_tokens", 0),
                 cache_info.get("remote_tokens", 0), len(gen.token_ids), ttft, done - job.received)
        if job.json_reply:
            answer["id"] = job.env.corr
            self.member.reply_json(job, answer)
        else:
            self.member.reply(job, wire.Kind.ANSWER, answer)

    # -- heartbeat --------------------------------------------------------------------------------
    def heartbeat_body(self) -> dict[str, Any]:
        with self.figures.lock:
            f = self.figures
            body: dict[str, Any] = {
                "seq": self.member.seq, "time": time.time(), "uptime_s": round(time.time() - self._started, 1),
                "model": self.loaded.key, "model_key": self.loaded.model_key,
                "queue": self.member.queue_length(),
                "queue_max": self.limits.max_queue,
                "load": round(self._load, 3), "prefill_tps": round(f.prefill_tps(), 1),
                # where prefill_tps comes from: an answered ask, or start-up and idle probes
                "prefill_tps_from": "asks" if f.spt_measured else f"probes:{f.spt_probes}",
                "decode_tps": round(f.decode_tps, 1), "served": f.served, "failed": f.failed,
                "last_ttft_s": f.last_ttft_s, "pid": os.getpid(), "roles": ["answer", *self.roles],
                "rejects": self.rejects.snapshot(), "cpu_load1": round(os.getloadavg()[0], 2),
                "heartbeat_s": self.timing.heartbeat_s,  # routers judge our silence by it (mesh.routing.live)
                "max_context": self.max_context,  # prompt + new tokens per ask (mesh.budget)
            }
            if f.rtt_ms is not None:
                body["rtt_ms"] = round(f.rtt_ms, 3)
            if f.link_bw is not None:
                body["link_bw_Bps"] = round(f.link_bw)
        if self.cache is not None:
            body["cache"] = self.cache.snapshot()
        return body

    def _full_heartbeat(self) -> dict[str, Any]:
        """The heartbeat body with the link's figures and every extension's fields."""
        body = self.heartbeat_body()
        body["link"] = self.link.snapshot()
        return with_extension_fields(body, self.extensions)

    def _busy_total(self, now: float) -> float:
        """Seconds spent answering since start, counting the running ask up to ``now``."""
        with self.figures.lock:
            started = self._job_started
            return self.figures.busy_s + (now - started if started is not None else 0.0)

    def _heartbeat_loop(self) -> None:
        last_busy, last_t, last_sent = 0.0, time.monotonic(), 0.0
        while not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            rtt, bw = self.link.rtt_s(), self.link.bandwidth_Bps()
            with self.figures.lock:
                self.figures.rtt_ms = None if rtt is None else rtt * 1000.0
                self.figures.link_bw = bw
            if now - last_t >= self.timing.heartbeat_s / 2:  # the load EWMA runs at the heartbeat pace
                busy_now = self._busy_total(now)
                self._load = 0.7 * self._load + 0.3 * min(1.0, (busy_now - last_busy) / max(now - last_t, 1e-6))
                last_busy, last_t = busy_now, now
            try:
                env = self.member.publish_heartbeat(self._full_heartbeat())
                self.bus.publish(topics.node_state(self.name), json.dumps(env.body).encode(),
                                 qos=topics.NODE_STATE.qos, retain=topics.NODE_STATE.retain)
                self._each_extension("on_heartbeat", dict(env.body))
            except MeshError as exc:
                log.warning("heartbeat not sent: %s", exc)
            last_sent = time.monotonic()
            # Wake early when an ask finished (routers see the queue drain), at most 10 times a second.
            self._wake.wait(self.timing.heartbeat_s)
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - last_sent)))

    # -- prompt cache: catalogs, serving peers, fetching ------------------------------------------
    def _start_cache_peers(self, cache: NodeCache) -> None:
        """The cache's catalogs and KV transfers (mesh.cache.peers / transfer): their handlers are
        subscribed now, their threads stop with ours (they share the stop event)."""
        self.catalogs = CatalogSync(self.bus, cache, self.name, stop=self._stop, rejects=self.rejects,
                                    max_message_bytes=self.limits.max_message_bytes, keyring=self.keys)
        c, mib = self.config.cache, float(1 << 20)
        burst = c.serve_burst_mb * mib or default_burst(self.max_context, cache.bytes_per_chunk / cache.chunk_size)
        self.transfer = PeerTransfer(self.bus, self.inbox, self.name, cache.serve, cache.digest,
                                     kv_wire=c.kv_wire, online=self.member.peer_online, stop=self._stop,
                                     rejects=self.rejects, max_message_bytes=self.limits.max_message_bytes,
                                     quota=ByteBuckets(c.serve_mb_s * mib, burst, c.serve_total_mb_s * mib,
                                                       c.serve_total_burst_mb * mib or 2 * burst),
                                     window_bytes=int(c.serve_window_mb * mib), keyring=self.keys)
        self._threads += [self.catalogs.start(), self.transfer.start()]
        self.evidence = EvidenceSync(self.bus, cache, self.name, rejects=self.rejects,
                                     max_message_bytes=self.limits.max_message_bytes, keyring=self.keys)
        self.evidence.start()

    def _default_link(self) -> LinkEstimate:
        with self.figures.lock:
            return default_link(self.figures.link_bw, self.figures.rtt_ms)

    def _peer_links(self) -> dict[str, LinkEstimate]:
        mine = self._default_link()
        with self.member.changed:
            beats = [(v.name, dict(v.heartbeat)) for v in self.member.peers.online()]
        return peer_links(mine, beats)
