"""What every member process of the mesh shares: the node agent and the coordinator."""

from __future__ import annotations

from typing import Any


class AgentExtension:
    """Something riding on a node's lifecycle (Home Assistant discovery, ...).

    ``start`` runs once the node is online (network thread not involved), ``on_heartbeat`` after
    each heartbeat with its body, ``stop`` before the node goes offline. Errors are logged, never
    fatal to the node.
    """

    def start(self, agent: Any) -> None:
        pass

    def on_heartbeat(self, body: dict[str, Any]) -> None:
        pass

    def heartbeat_fields(self) -> dict[str, Any]:
        """Extra heartbeat fields (e.g. ``{"halo": {...}}``); called on the heartbeat thread."""
        return {}

    def stop(self) -> None:
        pass
