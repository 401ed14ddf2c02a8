"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """The coordinator's setting (--threads 1), under which its two-thread LM head and lean decode
    step are bitwise the plain HF products."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
