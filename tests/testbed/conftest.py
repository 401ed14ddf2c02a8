"""Fixtures for the testbed tests: skip cleanly where the machine cannot run them.

Instances 90..97 are the tests' own; each test claims a free one, so a testbed someone left up
(instance 0 by default) and a second test run at the same time are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from nodes.testbed.bed import Testbed, TestbedBusy
from nodes.testbed.shell import unavailable_reason
from nodes.testbed.spec import TestbedSpec
from nodes.testbed.state import DEFAULT_RUN_DIR, in_use, teardown

TEST_INSTANCES = range(90, 98)


@pytest.fixture(scope="session")
def testbed_ok() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"testbed unavailable: {reason}")


@pytest.fixture(scope="session")
def mosquitto_ok() -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")


LOG_TAIL_LINES = 40


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


_CALL_FAILED = pytest.StashKey[bool]()


def _log_sizes(tb: Testbed) -> dict[Path, int]:
    return {log: log.stat().st_size for log in tb.log_path("").parent.glob("*.log")}


def _print_log_tails(tb: Testbed, before: dict[Path, int]) -> None:
    """A failed test's processes are gone with the testbed: show the end of what each one logged
    (logs are appended to across runs of the same instance; older runs' lines are left out)."""
    for log in sorted(tb.log_path("").parent.glob("*.log")):
        with open(log, "rb") as f:
            f.seek(before.get(log, 0))
            lines = f.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        if not lines:
            continue
        print(f"----- {log.name} (last {len(lines)} lines) -----")
        print("\n".join(lines))


@pytest.fixture
def make_testbed(request: pytest.FixtureRequest,
                 testbed_ok: None) -> Iterator[Callable[[Callable[[int], TestbedSpec]], Testbed]]:
    """``make_testbed(lambda instance: spec)`` brings a testbed up on a free test instance."""
    made: list[tuple[Testbed, dict[Path, int]]] = []

    def make(build: Callable[[int], TestbedSpec]) -> Testbed:
        for instance in TEST_INSTANCES:
            tb = Testbed(build(instance))
            try:
                tb.up()
            except TestbedBusy:
                continue
            made.append((tb, _log_sizes(tb)))
            return tb
        pytest.skip(f"every test instance {TEST_INSTANCES} is busy")

    yield make
    failed = request.node.stash.get(_CALL_FAILED, False)
    for tb, before in made:
        if failed:
            _print_log_tails(tb, before)
        tb.down()


@pytest.fixture
def free_instance(testbed_ok: None) -> Iterator[int]:
    """An instance number nobody uses, cleaned up afterwards (for tests that bring up elsewhere)."""
    for instance in TEST_INSTANCES:
        if in_use(DEFAULT_RUN_DIR, instance) is None:
            break
    else:
        pytest.skip(f"every test instance {TEST_INSTANCES} is busy")
    yield instance
    teardown(instance)
