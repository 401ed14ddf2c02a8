"""mesh.loops.guarded: a loop that raises is logged, counted and run again, not lost (review L1)."""

from __future__ import annotations

import threading

from mesh import wire
from mesh.loops import guarded


def test_a_failing_loop_is_counted_and_restarted_until_stop() -> None:
    stop, rejects, runs = threading.Event(), wire.RejectCounter(), []

    def loop() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("a bug")
        stop.wait(0.01)  # the third run returns: the thread ends like the loop meant it to

    t = threading.Thread(target=guarded("test", loop, stop, rejects, pause_s=0.01))
    t.start()
    t.join(5)
    assert not t.is_alive() and len(runs) == 3 and rejects.snapshot() == {"loop-error": 2}


def test_stop_ends_the_restarts() -> None:
    stop = threading.Event()

    def loop() -> None:
        stop.set()
        raise RuntimeError("failing as it stops")

    t = threading.Thread(target=guarded("test", loop, stop, pause_s=10.0))
    t.start()
    t.join(5)
    assert not t.is_alive()
