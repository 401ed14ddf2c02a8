"""A long-lived thread that does not die silently (review L1).

A node lives for weeks; its heartbeat, catalog, KV-serving, link-probe, HALO loader, compute and
link threads each run one loop. An exception a loop does not expect (a bug, a library's surprise,
a full disk) used to end its thread while the others went on: a node that heartbeats but never
publishes a catalog again, or never serves a HALO partial, with nothing in its heartbeat to say so.

:func:`guarded` runs such a loop and, when it raises, logs the traceback, counts ``loop-error`` in
the node's reject counter (its heartbeat shows it) and runs the loop again after a pause, until
the owner's stop event is set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RESTART_PAUSE_S = 1.0


def guarded(name: str, loop: Callable[[], None], stop: threading.Event, rejects: Any = None,
            pause_s: float = RESTART_PAUSE_S) -> Callable[[], None]:
    """A thread target that runs ``loop`` until it returns or ``stop`` is set, restarting it
    after ``pause_s`` when it raises (``rejects``: a ``mesh.wire.RejectCounter``, or None)."""

    def run() -> None:
        while not stop.is_set():
            try:
                loop()
                return
            except Exception:  # noqa: BLE001 - the point: log, count and go on
                log.exception("%s thread failed; restarting it in %.1f s", name, pause_s)
                if rejects is not None:
                    rejects.add("loop-error")
                stop.wait(pause_s)

    return run


def work_on_main_thread(work: Callable[[], None], stop: threading.Event, shutdown: Callable[[], None]) -> None:
    """Run ``work`` (a loop that returns once its process goes offline) on the calling, main
    thread; when ``stop`` is set (a signal), ``shutdown`` runs on a helper thread and takes the
    process offline, which ends ``work``. Returns once both are done."""
    def close() -> None:
        stop.wait()
        shutdown()

    closer = threading.Thread(target=close, name="shutdown", daemon=True)
    closer.start()
    try:
        work()
    finally:
        stop.set()
        closer.join()
