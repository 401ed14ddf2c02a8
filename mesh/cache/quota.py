"""What a node serves a peer's KV fetch, and how much: the server's side of the bargain.

A KV fetch is a few kilobytes of keys and can ask for the whole store: without bounds one request
made a node encode hundreds of megabytes into an unbounded outgoing queue, to any topic. So:

- the reply goes only to the requester's own inbox (``mesh/v1/reply/node-<sender>``), never to an
  answer, automation or device topic (:func:`fetch_reply_ok`);
- the ``model`` field must be this node's model digest (anything else would be served for nothing);
- the server picks the codec among those the requester accepts, preferring its own wire codec and
  never fp32 unless that is its own (:func:`pick_codec`): the requester cannot double the bytes.
  One exception, for keyed nodes: a chunk the server received in fp16 or int8 goes out in that
  codec, the only one whose bytes its computer's signature covers (``mesh.cache.provenance``);
- bytes are metered per requester and in all with token buckets (:class:`ByteBuckets`): a request
  beyond what the buckets hold is served as the leading run of chunks that fits (the requester
  computes the rest), and a requester with an empty bucket gets an empty answer at once; both
  end with ``capped``, so the requester knows the peer kept its word (no strike for it). A
  requester's burst is by default one full context of the node's model (:func:`default_burst`):
  one honest fetch of the longest prompt the node serves is never cut;
- the serve thread keeps at most a window of bytes in flight to the broker
  (``mesh.cache.transfer.PeerTransfer``), so the outgoing queue is bounded too.

Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from mesh import topics
from mesh.config import check_name
from mesh.errors import ConfigError

# Codecs from the most compact on; fp32 is served only by a node whose own wire codec it is.
CODEC_ORDER = ("int8", "fp16", "fp32")
MAX_REQUESTERS = 1024  # requesters metered at once (the least recent are forgotten)


def fetch_reply_ok(sender: str, reply_to: str | None) -> bool:
    """Whether a fetch from ``sender`` may be answered on ``reply_to``: only the requester's own
    inbox, ``mesh/v1/reply/node-<sender>`` (a node's, ``mesh.mqtt.inbox``) or ``.../<sender>``."""
    try:
        name = check_name(sender)
    except ConfigError:
        return False
    return reply_to in (topics.reply(f"node-{name}"), topics.reply(name))


def default_burst(context_tokens: int, wire_bytes_per_token: float, floor: float = 32 << 20) -> float:
    """Bytes one requester may take at once: a whole ``context_tokens`` prompt's KV in the wire
    codec (plus an eighth for the logits, part framing and a prompt entry), at least ``floor``."""
    return max(float(floor), context_tokens * wire_bytes_per_token * 1.125)


def pick_codec(accepted: Iterable[str], own: str) -> str | None:
    """The codec to serve in: our own if the requester accepts it, else the first of fp16, int8
    it accepts; fp32 only as our own. None: nothing acceptable (the answer is empty)."""
    ok = set(accepted)
    if own in ok:
        return own
    for name in ("fp16", "int8"):
        if name in ok:
            return name
    return None


@dataclass
class Bucket:
    level: float
    at: float


class ByteBuckets:
    """Token buckets of bytes: one per requester (``rate``/``burst``) and one for all of them
    (``total_rate``/``total_burst``), so names made up by the dozen do not add up to more."""

    def __init__(self, rate: float, burst: float, total_rate: float, total_burst: float) -> None:
        if min(rate, burst, total_rate, total_burst) <= 0:
            raise ConfigError("KV serving rates and bursts must be > 0")
        self.rate, self.burst, self.total_rate, self.total_burst = rate, burst, total_rate, total_burst
        self._each: OrderedDict[str, Bucket] = OrderedDict()
        self._all: Bucket | None = None

    @staticmethod
    def _refill(bucket: Bucket, now: float, rate: float, burst: float) -> None:
        bucket.level = min(burst, bucket.level + max(0.0, now - bucket.at) * rate)
        bucket.at = now

    def _buckets(self, requester: str, now: float) -> tuple[Bucket, Bucket]:
        mine = self._each.pop(requester, None) or Bucket(self.burst, now)
        self._each[requester] = mine  # most recent last
        while len(self._each) > MAX_REQUESTERS:
            self._each.popitem(last=False)
        if self._all is None:
            self._all = Bucket(self.total_burst, now)
        self._refill(mine, now, self.rate, self.burst)
        self._refill(self._all, now, self.total_rate, self.total_burst)
        return mine, self._all

    def available(self, requester: str, now: float) -> float:
        """Bytes ``requester`` may be sent now."""
        mine, total = self._buckets(requester, now)
        return max(0.0, min(mine.level, total.level))

    def charge(self, requester: str, nbytes: int, now: float) -> None:
        """Bytes sent to ``requester`` (a bucket may go below zero by the last part: it refills)."""
        mine, total = self._buckets(requester, now)
        mine.level -= nbytes
        total.level -= nbytes
