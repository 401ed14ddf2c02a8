"""mesh.halo.step.RoutedStep over the in-memory rig: how the generation thread waits for partials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.halo.engine import HaloEngine
from mesh.halo.sync import SyncPolicy
from tests.halo.rig import MemoryBus, forward, make_rig

# Long deadlines against an 80 ms answer: only the wait itself is timed, not how fast the machine is.
SLOW = SyncPolicy(target_share=0.5, min_deadline_s=0.15, max_deadline_s=0.3, default_deadline_s=0.15,
                  straggler_share=0.25)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[HaloEngine, MemoryBus]]:
    yield from make_rig(tmp_path, policy=SLOW)


def test_relaxed_sleeps_until_the_first_arrival_once_its_expected_time_passed(rig) -> None:
    """With a measured first-arrival time the relaxed gather sleeps until the earliest a straggler
    cut can fall due. When that time passes with nothing arrived, it must go back to sleeping until
    the first arrival; it used to compute a 0 s sleep from the previous decision's elapsed time and
    spin the generation thread until the partials came (or the deadline)."""
    engine, bus = rig
    for _ in range(12):  # decode steps with prompt answers: first-arrival and gap samples
        forward(engine, False, [5])
    assert engine.ledger.first_arrival() is not None
    sleeps: list[float] = []
    real = engine.step._sleep

    def counted(step: int, waiting: set[str], timeout: float, first: bool = False) -> None:
        sleeps.append(timeout)
        real(step, waiting, timeout, first)

    engine.step._sleep = counted  # type: ignore[method-assign]
    for w in bus.workers.values():
        w.delay = {0: 0.08}  # both partials of layer 0 come 80 ms late, well within the deadline
    _, run, took = forward(engine, False, [5])
    # The first of them ends the wait for nothing (the second may then miss the straggler cut).
    assert took >= 0.08 and run.on_time >= 3
    assert len(sleeps) < 20, f"{len(sleeps)} sleeps in one forward pass: the gather spun"
