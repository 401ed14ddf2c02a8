"""A throwaway CA per test module (tests/auth/kit.py has the helpers that use it)."""

from __future__ import annotations

import pytest

from mesh.auth.certs import CertificateAuthority


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()
