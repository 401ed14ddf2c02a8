"""The embedded broker: amqtt (pure Python, MQTT 3.1.1), bound to loopback unless told otherwise.

amqtt has no message size cap of its own; the mesh enforces its caps in every receiver
(``mesh.wire``). Only the anonymous-auth plugin is loaded: amqtt's packet and event loggers
cost time on every message, and its ``$SYS`` publisher is noise for the mesh.

It is for one trusted machine: no passwords, no ACL, no TLS. Any process that reaches it is a full
participant, so an address beyond loopback (``mesh broker --host``, ``mesh up --host``, which
runs this) is served with a loud warning naming what it exposes; the testbed binds the broker
inside network namespaces of its own. Across machines the mesh runs on the gateway's Mosquitto
(``deploy/``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from typing import Any

from mesh.errors import TransportError

log = logging.getLogger(__name__)


def exposure(host: str) -> str | None:
    """Why serving on ``host`` exposes the mesh, or None for a loopback address. A host name other
    than ``localhost`` counts as exposed: it may resolve to any interface."""
    if host == "localhost":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_loopback:
        return None
    where = "every interface" if address is not None and address.is_unspecified else host
    return (f"the embedded broker listens on {where} ({host!r}) with no password, no ACL and no TLS: "
            "any device that reaches it reads every prompt and answer, answers in any node's name "
            "and can fill the mesh with fake nodes. Keep it on 127.0.0.1 (the default), or run the "
            "mesh across machines on the gateway's Mosquitto (deploy/README.md).")


def broker_config(host: str = "127.0.0.1", port: int = 1883) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 256}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _broker_class() -> type:
    from amqtt.broker import Broker

    class MeshBroker(Broker):  # type: ignore[misc]
        """amqtt 0.12.1 with one fix: retained messages go only to their subscribers.

        On every CONNECT, amqtt replays retained messages for *every* topic filter any client has
        subscribed to, to the new client (it loops over the broker-wide subscription table), so a
        ``mosquitto_sub -t home/x`` receives every node's retained status and heartbeat. Replay
        only when this session really holds the subscription.
        """

        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                              session: Any) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if any(s.client_id == session.client_id for s, _ in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return MeshBroker


async def serve(host: str, port: int, stop: asyncio.Event, ready: Any = None) -> None:
    """Run the broker until ``stop`` is set; ``ready()`` is called once it listens. A bind beyond
    loopback is logged as a warning before the broker starts (:func:`exposure`)."""
    warning = exposure(host)
    if warning is not None:
        log.warning("%s", warning)
    broker = _broker_class()(broker_config(host, port))
    await broker.start()
    log.info("amqtt broker listening on %s:%d", host, port)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def run_broker(host: str = "127.0.0.1", port: int = 1883) -> None:
    """Blocking entry point of ``mesh broker``: stops cleanly on SIGINT or SIGTERM."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(host, port, stop, ready=lambda: print(f"broker ready on {host}:{port}", flush=True))

    # amqtt logs every connection at INFO; keep our own output readable.
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    from amqtt.errors import BrokerError

    try:
        asyncio.run(main())
    except BrokerError as exc:  # cannot bind: the port is taken, or the address is not ours
        raise TransportError(f"the embedded broker did not start on {host}:{port}: {exc}") from exc
