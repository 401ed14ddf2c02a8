"""Home Assistant asks a router forwarded, kept until their node says it answered (review M9).

A JSON or text ask (Home Assistant's) has no sender that re-sends: the automation publishes it
once and waits for ``mesh/v1/answer``. The router forwards it once; if the node it chose dies
before answering (a Pi pulled from the wall, an OOM kill), the ask would be lost and the
automation would wait out its own timeout with no error. So the router keeps each forwarded JSON
ask until the chosen node's heartbeat lists it as answered, and when that node goes offline or
silent first, routes the ask once more, to another node.

What this gives is *at least once, retried once*: a node that answered and died before its next
heartbeat left makes the ask be answered twice (Home Assistant takes the first answer of an id);
a second death of the new node, or the death of the router itself after reading the ask, still
loses it (the router is the only one who knew). The ask keeps its deadline: a retry never outlives
what the automation waits for.

A node names answered asks by :func:`ask_digest`, not by id: heartbeats are read by every node,
and an automation's ask ids are its own business.

Pure: no clock (callers pass monotonic ``now``), no socket.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from mesh import wire

MAX_TRACKED = 256  # forwarded JSON asks a router keeps; the oldest goes first beyond this
ANSWERED_KEPT = 32  # digests of its last answered JSON asks a node repeats in each heartbeat
DIGEST_HEX = 16


def ask_digest(corr: str) -> str:
    """The short name of an ask in a heartbeat's ``answered`` list."""
    return hashlib.blake2b(corr.encode("utf-8", "surrogatepass"), digest_size=DIGEST_HEX // 2).hexdigest()


@dataclass
class Forwarded:
    env: wire.Envelope
    target: str
    until: float  # monotonic: the ask's deadline, after which nobody waits for it
    retried: bool = False


class Forwards:
    """The router's forwarded JSON asks not yet known to be answered, keyed by ask digest."""

    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self.max_tracked = max_tracked
        self._open: OrderedDict[str, Forwarded] = OrderedDict()
        self.retried = 0
        self.dropped = 0  # forgotten unanswered: over the bound, or a retry's node died too

    def __len__(self) -> int:
        return len(self._open)

    def sent(self, env: wire.Envelope, target: str, until: float, retried: bool = False) -> None:
        key = ask_digest(env.corr)
        self._open.pop(key, None)
        self._open[key] = Forwarded(env, target, until, retried)
        while len(self._open) > self.max_tracked:
            self._open.popitem(last=False)
            self.dropped += 1

    def answered(self, node: str, digests: object) -> None:
        """``node``'s heartbeat lists ``digests``: those it was sent are done (only its own: a
        node cannot close an ask another node holds)."""
        if not isinstance(digests, list):
            return
        for d in digests:
            f = self._open.get(d) if isinstance(d, str) else None
            if f is not None and f.target == node:
                del self._open[d]

    def orphans(self, alive: Iterable[str], now: float) -> list[Forwarded]:
        """Remove and return the asks to route again: their node is no longer among ``alive``
        and they were not retried before. Expired asks, and retries orphaned again, are dropped."""
        alive = set(alive)
        out: list[Forwarded] = []
        for key, f in list(self._open.items()):
            if now >= f.until:
                del self._open[key]
            elif f.target not in alive:
                del self._open[key]
                if f.retried:
                    self.dropped += 1
                else:
                    out.append(f)
        return out
