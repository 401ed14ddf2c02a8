"""The mesh's small error tree.

Everything the mesh raises on purpose derives from :class:`MeshError`, so a shell can catch the
family at its boundary. Third-party errors are re-raised with ``from`` where they cross into mesh
code; untrusted network input is turned into :class:`ProtocolError` and never crashes a loop.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error the mesh raises on purpose."""


class ProtocolError(MeshError):
    """A payload that is malformed, oversized, of an unknown version or kind.

    ``reason`` is a short stable token (``"oversized"``, ``"bad-version"``...) used as the key of
    the rejection counters that heartbeats publish.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransportError(MeshError):
    """The broker cannot be reached, a publish failed, or a request timed out."""


class CapacityError(MeshError):
    """A bounded resource is full: a node's queue, a byte budget, a message cap."""


class ConfigError(MeshError):
    """A configuration value is missing or invalid."""
