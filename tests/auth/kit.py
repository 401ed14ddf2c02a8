"""What the identity tests share: keyrings a CA issues (the ``ca`` fixture: conftest.py), refusal reasons."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.auth.certs import CertificateAuthority
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError


def ring(ca: CertificateAuthority, name: str, role: str = "node") -> Keyring:
    return Keyring(ca.issue(name, role), ca.cert)


def reason(fn: Any, *args: Any, **kw: Any) -> str:
    """The counted reason of the ProtocolError ``fn(*args, **kw)`` raises."""
    with pytest.raises(ProtocolError) as exc:
        fn(*args, **kw)
    return exc.value.reason
