"""The `mesh node` flags for Home Assistant, and `mesh node --decommission`.

Settings are read here, at the edge: flags first, then ``MESH_HA_PREFIX`` / ``MESH_NO_HA``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from mesh.config import NodeConfig
from mesh.ha import discovery as ha
from mesh.ha.extension import HomeAssistantExtension, decommission
from mesh.mqtt.bus import MqttBus


def add_ha_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Home Assistant")
    group.add_argument("--ha-prefix", help="Home Assistant discovery prefix (default homeassistant, "
                                           "or MESH_HA_PREFIX)")
    group.add_argument("--no-ha", action="store_true", help="publish no Home Assistant discovery")
    group.add_argument("--decommission", action="store_true",
                       help="remove this (stopped) node from Home Assistant and clear its retained "
                            "topics, then exit")


def ha_prefix_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str:
    return ha.check_prefix(getattr(args, "ha_prefix", None) or env.get("MESH_HA_PREFIX") or ha.DEFAULT_PREFIX)


def ha_extension_from_args(args: argparse.Namespace, node_config: NodeConfig,
                           env: Mapping[str, str] = os.environ) -> HomeAssistantExtension | None:
    """The extension for ``NodeAgent(config, extensions=[...])``, or None with ``--no-ha``
    (or ``MESH_NO_HA=1``)."""
    if getattr(args, "no_ha", False) or env.get("MESH_NO_HA", "") in ("1", "true", "yes"):
        return None
    return HomeAssistantExtension(ha_prefix_from_args(args, env))


def run_decommission(args: argparse.Namespace, node_config: NodeConfig,
                     env: Mapping[str, str] = os.environ) -> int:
    """``mesh node --name N --decommission``: connect with the node's credentials, clear, exit."""
    bus = MqttBus(f"mesh-decommission-{node_config.name}-{os.getpid()}", node_config.broker,
                  keepalive=node_config.timing.keepalive_s)
    bus.start(node_config.timing.connect_timeout_s)
    try:
        cleared = decommission(bus, node_config.name, ha_prefix_from_args(args, env))
    finally:
        bus.stop()
    print(f"node {node_config.name} decommissioned: {len(cleared)} retained topics cleared")
    return 0

