"""Where an ask's prefix comes from: pure decisions (routing is mesh.routing's).

Lookup (on the node that owns an ask): ``L`` = leading chunk keys in the local store; for each
peer catalog with the same model key and chunk size, ``D_p`` = leading keys its Bloom filter
holds. The best peer is the deepest; ties go to the lower estimated transfer time, then to the
lower node id (deterministic). Only chunks ``L..D`` would be fetched.

Cost model (never slower than no cache): fetching ``r = D - L`` chunks of ``C`` tokens costs::

    transfer_s  = r * bytes_per_chunk / link_bytes_per_s + rtt_s
    recompute_s = r * C / prefill_tokens_per_s

and the node fetches only when ``transfer_s * margin < recompute_s`` (``margin >= 1`` asks for a
clear win, to cover estimate noise).

The decision is one of:

- ``"remote"``: fetch chunks ``L..D`` from ``peer`` (then prefill the rest);
- ``"recompute"``: a peer has more, but fetching would be slower: use the local prefix only;
- ``"local"``: the local prefix is at least as deep as any peer's; nothing to fetch;
- ``"no-match"``: no prefix anywhere.

Peers that wasted a fetch (pure bookkeeping, the shell passes the clock): a fetch that brought
fewer chunks than the catalog promised (a Bloom false positive, an eviction race, a peer that
died or stalled) is a *short* strike: the peer is skipped until its catalog epoch changes (it
republished what it really holds) or the cool-down ends; a second short strike in a row means the
republished catalog did not help either, so from then on only the cool-down lifts it (a peer that
stalls and bumps its epoch would otherwise cost every ask the whole fetch timeout, forever). A
chunk that failed verification (bytes not matching their key, another model's chunk, a truncated
tensor) is a *bad* strike: only the cool-down lifts it, since a liar controls its own epoch. A node whose
signed KV failed an audit (``mesh.cache.audit``: proven to have lied, not merely broken) gets a
*lied* strike: shunned for good (until the process restarts; revoking its certificate is the
operator's part). Consecutive strikes double the cool-down
(capped); a complete, verified fetch clears the record. Skipped peers are left out of the lookup
as if they had no catalog, so the next best peer (or recompute) is chosen.

How long to wait for a fetch (:func:`fetch_timeout`): the fetch was chosen because it should
take well under the recompute estimate; once it has taken that long, waiting longer cannot win,
so the asker gives up at about the recompute estimate (within a floor for broker jitter and a
cap), keeps the chunks that did arrive and verified, and recomputes the rest. The worst case is
then bounded by about twice the no-cache prefill.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NewType

from mesh.cache.catalog import Catalog, leading_matches
from mesh.errors import ConfigError

NodeId = NewType("NodeId", str)

LOCAL, REMOTE, RECOMPUTE, NO_MATCH = "local", "remote", "recompute", "no-match"


@dataclass(frozen=True)
class LinkEstimate:
    """Measured link to a peer: payload throughput (bytes/s) and request round trip (s)."""

    bytes_per_s: float
    rtt_s: float

    def transfer_s(self, nbytes: float) -> float:
        """Estimated time to fetch ``nbytes`` in one request."""
        return nbytes / self.bytes_per_s + self.rtt_s


@dataclass(frozen=True)
class CostModel:
    """The numbers behind the fetch decision, measured by the shell.

    ``bytes_per_chunk``: wire bytes of one chunk in the chosen codec (see
    :func:`mesh.cache.kv.wire_bytes_per_token` times C). ``prefill_tokens_per_s``: this node's
    measured prefill speed. ``default_link``: used for peers with no measurement yet.
    ``margin``: fetch only if ``transfer * margin < recompute``.
    """

    prefill_tokens_per_s: float
    bytes_per_chunk: float
    default_link: LinkEstimate
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.bytes_per_chunk <= 0:
            raise ConfigError("cost model: prefill speed and chunk bytes must be > 0")
        if self.default_link.bytes_per_s <= 0 or self.default_link.rtt_s < 0:
            raise ConfigError("cost model: bad default link")
        if self.margin < 1.0:
            raise ConfigError("cost model: margin must be >= 1")


@dataclass(frozen=True)
class PeerMatch:
    """A peer's advertised prefix depth (in chunks) and the link estimate used for it."""

    node: NodeId
    depth: int
    link: LinkEstimate


@dataclass(frozen=True)
class Decision:
    """The lookup outcome and the estimates behind it (``mesh ask --json`` shows ``to_dict()``)."""

    decision: str
    chunk_size: int
    total_chunks: int
    local_chunks: int
    remote_chunks: int
    peer: NodeId | None
    fetch_bytes: int
    est_transfer_s: float | None
    est_recompute_s: float | None
    peers_considered: int
    peers_skipped: tuple[str, ...] = ()

    @property
    def local_tokens(self) -> int:
        """Tokens covered by the local prefix."""
        return self.local_chunks * self.chunk_size

    @property
    def remote_tokens(self) -> int:
        """Tokens to fetch (0 unless the decision is remote)."""
        return self.remote_chunks * self.chunk_size if self.decision == REMOTE else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record, including the derived token counts."""
        out = asdict(self)
        out["local_tokens"] = self.local_tokens
        out["remote_tokens"] = self.remote_tokens
        return out


def peer_matches(
    keys: Sequence[bytes],
    catalogs: Mapping[NodeId, Catalog],
    model: bytes,
    chunk_size: int,
    links: Mapping[NodeId, LinkEstimate],
    default_link: LinkEstimate,
    exclude: Collection[str] = (),
) -> list[PeerMatch]:
    """Advertised depth for each compatible peer catalog (same model key digest and chunk size),
    leaving out the peers in ``exclude`` (see :func:`shunned`)."""
    out = []
    for node in sorted(catalogs):
        cat = catalogs[node]
        if node in exclude or cat.model != model or cat.chunk_size != chunk_size or not cat.readable:
            continue
        out.append(PeerMatch(node, leading_matches(cat, keys), links.get(node, default_link)))
    return out


def best_peer(matches: Sequence[PeerMatch], bytes_per_chunk: float, have: int = 0) -> PeerMatch | None:
    """Deepest peer; ties by lower transfer time of the missing chunks, then lower node id."""
    if not matches:
        return None

    def rank(p: PeerMatch) -> tuple[int, float, str]:
        missing = max(p.depth - have, 0)
        return (-p.depth, p.link.transfer_s(missing * bytes_per_chunk), p.node)

    return min(matches, key=rank)


def decide(
    keys: Sequence[bytes],
    local_depth: int,
    catalogs: Mapping[NodeId, Catalog],
    model: bytes,
    chunk_size: int,
    cost: CostModel,
    links: Mapping[NodeId, LinkEstimate] | None = None,
    extra_bytes: int = 0,
    extra_tokens: int = 0,
    exclude: Collection[str] = (),
) -> Decision:
    """The cost-aware lookup decision for a prompt with chunk keys ``keys`` (module docstring).

    ``extra_bytes``/``extra_tokens``: for a remote *full* hit, the size of the prompt entry the
    peer would also send (tail KV + last logits) and the tokens it saves recomputing (the tail,
    plus 1 for the first-token forward). The shell passes them only when the peer advertises the
    prompt key; they count only if the best peer holds every chunk. ``exclude``: peers to skip
    (:func:`shunned`); the ones that had a compatible catalog are listed in ``peers_skipped``.
    """
    if not 0 <= local_depth <= len(keys):
        raise ValueError("local_depth out of range")
    matches = peer_matches(keys, catalogs, model, chunk_size, links or {}, cost.default_link, exclude)
    best = best_peer(matches, cost.bytes_per_chunk, local_depth)
    skipped = tuple(sorted(n for n in exclude if n in catalogs and catalogs[n].model == model
                           and catalogs[n].chunk_size == chunk_size))
    base = dict(
        chunk_size=chunk_size,
        total_chunks=len(keys),
        local_chunks=local_depth,
        peers_considered=len(matches),
        peers_skipped=skipped,
    )
    if best is None or best.depth <= local_depth:
        kind = LOCAL if local_depth else NO_MATCH
        return Decision(kind, remote_chunks=0, peer=None, fetch_bytes=0,
                        est_transfer_s=None, est_recompute_s=None, **base)
    remote = best.depth - local_depth
    full = best.depth == len(keys)
    nbytes = round(remote * cost.bytes_per_chunk) + (extra_bytes if full else 0)
    transfer = best.link.transfer_s(nbytes)
    recompute = (remote * chunk_size + (extra_tokens if full else 0)) / cost.prefill_tokens_per_s
    fetch = transfer * cost.margin < recompute
    return Decision(
        REMOTE if fetch else RECOMPUTE,
        remote_chunks=remote,
        peer=best.node,
        fetch_bytes=nbytes if fetch else 0,
        est_transfer_s=transfer,
        est_recompute_s=recompute,
        **base,
    )


SHORT, BAD, LIED = "short", "bad", "lied"


@dataclass(frozen=True)
class PenaltyPolicy:
    """Cool-down after a wasted fetch: ``base_s * 2**(strikes-1)``, at most ``max_s``."""

    base_s: float = 30.0
    max_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ConfigError("penalty: need 0 < base_s <= max_s")


@dataclass(frozen=True)
class Strike:
    """A peer's record of consecutive wasted fetches (module docstring)."""

    count: int
    kind: str  # SHORT or BAD (the worse of the consecutive ones)
    epoch: int  # the peer's catalog epoch when it last wasted a fetch
    until: float  # end of the cool-down, on the caller's monotonic clock


def strike(prev: Strike | None, kind: str, epoch: int, now: float,
           policy: PenaltyPolicy = PenaltyPolicy()) -> Strike:
    """The record after one more wasted fetch of ``kind`` (SHORT or BAD) at catalog ``epoch``,
    or a failed audit (LIED: no end)."""
    if kind not in (SHORT, BAD, LIED):
        raise ValueError(f"unknown strike kind {kind!r}")
    count = 1 if prev is None else prev.count + 1
    kinds = {kind, prev.kind if prev is not None else SHORT}
    worst = LIED if LIED in kinds else BAD if BAD in kinds else SHORT
    if worst == LIED:
        return Strike(count, LIED, epoch, math.inf)
    cool = min(policy.max_s, policy.base_s * 2.0 ** min(count - 1, 60))
    return Strike(count, worst, epoch, now + cool)


def shunned(strikes: Mapping[str, Strike], epochs: Mapping[str, int], now: float) -> frozenset[str]:
    """Peers to leave out of a lookup at ``now``: cool-down running and, for a first SHORT strike,
    the peer's catalog epoch unchanged since (``epochs``: current epoch per peer catalog)."""
    out = set()
    for node, s in strikes.items():
        if now >= s.until:
            continue
        if s.kind in (BAD, LIED) or s.count > 1 or epochs.get(node, s.epoch) == s.epoch:
            out.add(node)
    return frozenset(out)


def fetch_timeout(decision: Decision, floor_s: float = 0.25, cap_s: float = 30.0) -> float:
    """How long to wait for a fetch (module docstring): the recompute estimate, within
    ``[floor_s, cap_s]``; ``cap_s`` alone when the decision carries no estimate."""
    if floor_s < 0 or cap_s < floor_s:
        raise ValueError("need 0 <= floor_s <= cap_s")
    if decision.est_recompute_s is None:
        return cap_s
    return min(cap_s, max(floor_s, decision.est_recompute_s))
