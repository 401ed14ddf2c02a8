"""The `mesh node` flags for Home Assistant, `mesh node --decommission`, and the shared device.

Settings are read here, at the edge: flags first, then ``MESH_HA_PREFIX`` / ``MESH_NO_HA``.

The shared assistant device is published by the operator, not by nodes (``mesh.ha.discovery``
says why), once per change of the node list, retained::

    python -m nodes.ha_cli assistant --nodes pi1 pi2 pi3 --broker 127.0.0.1:1883 \
        --username asker --password-file /etc/mesh/mosquitto/secrets/asker.password
    python -m nodes.ha_cli assistant --remove ...   # when the whole mesh goes

``deploy/install.sh --gateway`` runs the first with its ``--nodes``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from mesh.config import NodeConfig
from mesh.ha import discovery as ha
from mesh.errors import MeshError
from mesh.ha.extension import HomeAssistantExtension, decommission, publish_assistant
from mesh.mqtt.bus import MqttBus
from nodes.settings import add_broker_arguments, broker_address


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



def assistant_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nodes.ha_cli assistant",
                                description="publish (or remove) the shared Home Assistant assistant device")
    p.add_argument("--nodes", nargs="+", default=[], help="every node of the mesh: the device is available "
                                                          "while any of them is online")
    p.add_argument("--remove", action="store_true", help="remove the device (the mesh is gone)")
    p.add_argument("--ha-prefix", help="Home Assistant discovery prefix (default homeassistant, or MESH_HA_PREFIX)")
    add_broker_arguments(p)
    return p


def run_assistant(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> int:
    """Connect (as the asker account on a gateway), publish the shared device, exit."""
    args = assistant_parser().parse_args(argv)
    if not args.nodes and not args.remove:
        raise SystemExit("--nodes: name every node of the mesh (or --remove)")
    bus = MqttBus(f"mesh-ha-assistant-{os.getpid()}", broker_address(args, env))
    bus.start(10.0)
    try:
        topic = publish_assistant(bus, ha_prefix_from_args(args, env), args.nodes, remove=args.remove)
    finally:
        bus.stop()
    print(f"{'removed' if args.remove else 'published'} {topic}" + ("" if args.remove else
          f", available while any of {', '.join(sorted(args.nodes))} is online"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["assistant"]:
        print("usage: python -m nodes.ha_cli assistant --nodes NODE... [--remove] [broker flags]", file=sys.stderr)
        return 2
    try:
        return run_assistant(argv[1:])
    except MeshError as exc:
        print(f"nodes.ha_cli assistant: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
