"""Whether work on an ask must stop: the process stopping, the ask's deadline, its asker gone.

An asker (``mesh ask``, a benchmark, any :class:`nodes.client.MeshClient`) connects with the last
will ``offline`` on ``mesh/v1/asker/<name>/status`` and says ``online`` there on each connect. A
node that hears ``offline`` stops the asks that asker sent at the next decoder layer or token
(``asker-gone``): nobody would read the answer. Names are self-declared, as every sender is under
MQTT 3.1.1, so anyone may say a client is gone and stop its asks; what a sender can prove comes
with the mesh's own authentication, not here. JSON and text asks have no asker of their own (they
all arrive as one sender name), so only their deadline bounds them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from mesh import budget, topics

GONE_MAX = 4096  # askers remembered as gone (the oldest are forgotten first)


class Cancelled(Exception):
    """Raised from an answer's streaming callback to stop a generation when the process stops."""


class AskGuard:
    """Askers gone (fed by :meth:`on_asker_status` on the network thread) and the checks the work
    loop makes between pieces of work. ``ignore``: sender names that are no asker of their own."""

    def __init__(self, stop: threading.Event, label: str, ignore: Iterable[str] = ()) -> None:
        self.stop, self.label, self.ignore = stop, label, frozenset(ignore)
        self._gone: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def on_asker_status(self, topic: str, payload: bytes, retained: bool) -> None:
        name = topics.parse_asker_status(topic)
        if name is None or name in self.ignore or payload not in (topics.ONLINE, topics.OFFLINE):
            return
        with self._lock:
            self._gone.pop(name, None)
            if payload == topics.OFFLINE:
                self._gone[name] = time.monotonic()
                while len(self._gone) > GONE_MAX:
                    self._gone.popitem(last=False)

    def gone(self, asker: str) -> bool:
        with self._lock:
            return asker in self._gone

    def abandoned(self, deadline: float, asker: str) -> str | None:
        """Why work on an ask must stop now (``budget.DEADLINE``, ``budget.ASKER_GONE``), or None."""
        if time.monotonic() > deadline:
            return budget.DEADLINE
        return budget.ASKER_GONE if self.gone(asker) else None

    def checkpoint(self, deadline: float, asker: str) -> None:
        """Raise Cancelled (the process stops) or :class:`budget.Abandoned`; else return."""
        if self.stop.is_set():
            raise Cancelled
        reason = self.abandoned(deadline, asker)
        if reason is not None:
            raise budget.Abandoned(reason, f"{self.label} stopped the ask: " + (
                "its deadline passed" if reason == budget.DEADLINE else "its asker is gone"))

    def must_stop(self, deadline: float, asker: str) -> bool:
        """For a forward's ``stop`` hook (``mesh.model.Decoder.prefill``)."""
        return self.stop.is_set() or self.abandoned(deadline, asker) is not None
