"""Fixtures the prompt-cache tests share."""

from __future__ import annotations

import pytest

from mesh.model import LoadedModel, load_model
from tests.conftest import CACHE_ROOT, require_model


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """SmolLM2 as a node loads it (fp32), once per test module."""
    require_model("smollm2-135m")
    return load_model(CACHE_ROOT, "smollm2-135m")
