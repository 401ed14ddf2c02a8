"""Fixtures for the testbed tests: skip cleanly where the machine cannot run them.

Instances 90..97 are the tests' own; each test claims a free one, so a testbed someone left up
(instance 0 by default) and a second test run at the same time are never touched.
"""

from __future__ import annotations

import shutil
from typing import Callable, Iterator

import pytest

from mesh.testbed_plan import TestbedSpec
from nodes.testbed import DEFAULT_RUN_DIR, Testbed, TestbedBusy, in_use, teardown, unavailable_reason

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


@pytest.fixture
def make_testbed(testbed_ok: None) -> Iterator[Callable[[Callable[[int], TestbedSpec]], Testbed]]:
    """``make_testbed(lambda instance: spec)`` brings a testbed up on a free test instance."""
    made: list[Testbed] = []

    def make(build: Callable[[int], TestbedSpec]) -> Testbed:
        for instance in TEST_INSTANCES:
            tb = Testbed(build(instance))
            try:
                tb.up()
            except TestbedBusy:
                continue
            made.append(tb)
            return tb
        pytest.skip(f"every test instance {TEST_INSTANCES} is busy")

    yield make
    for tb in made:
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
