"""Configuration as frozen dataclasses.

They are filled once at the edge (CLI flags, a TOML file, ``MESH_*`` environment variables: see
``nodes/settings.py``) and passed down; library code never reads the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mesh.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

DEFAULT_PORT = 1883
DEFAULT_MODEL = "gemma3-270m"


def check_name(name: str) -> str:
    """A node or client name: it becomes one MQTT topic level, so no ``/``, ``+``, ``#``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # match's "$" also took "w1\n"
        raise ConfigError(f"invalid name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def parse(cls, text: str, **extra: object) -> "BrokerAddress":
        """``HOST:PORT``, ``HOST`` or ``:PORT``."""
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, str(DEFAULT_PORT)
        try:
            port_num = int(port)
        except ValueError as exc:
            raise ConfigError(f"invalid broker address {text!r}") from exc
        if not 0 < port_num < 65536:
            raise ConfigError(f"invalid broker port in {text!r}")
        return cls(host=host or "127.0.0.1", port=port_num, **extra)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    """Caps the mesh enforces itself (amqtt has none; Mosquitto's must match these)."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_json_ask_bytes: int = 64 * 1024
    max_prompt_chars: int = 32_000
    max_new_tokens: int = 1024
    max_queue: int = 32
    max_context: int = 0  # prompt + new tokens per ask; 0: the model's positions within a memory share (mesh.budget)

    def __post_init__(self) -> None:
        if self.max_context < 0:
            raise ConfigError("max context must be >= 0 (0: from the model and the device's memory)")


@dataclass(frozen=True)
class Timing:
    """Every period and timeout the processes use; tests shrink them."""

    heartbeat_s: float = 2.0
    link_ping_s: float = 0.5  # link probe pace (mesh.uplink_stats)
    link_late_s: float = 0.02  # a reply later than this counts as late (a TCP retransmission stall)
    link_timeout_s: float = 2.0
    connect_timeout_s: float = 10.0
    keepalive_s: int = 10
    ask_timeout_s: float = 300.0  # also a node's deadline for an ask that gives none (mesh.budget)
    dedupe_window_s: float = 600.0
    # Until a real ask has measured the prefill speed, an idle node measures it again this long
    # after its last work, up to speed_probes times: the start-up warm-up ran while the model (and
    # on a testbed, the other nodes) loaded, and before a device's CPU quota applied.
    speed_probe_idle_s: float = 2.0
    speed_probes: int = 3


@dataclass(frozen=True)
class CacheConfig:
    """The prompt cache of one node (mesh.cache.store, mesh.cache.catalog, mesh.cache.lookup)."""

    enabled: bool = True
    budget_mb: float = 256.0
    chunk_size: int = 16
    kv_wire: str = "fp16"  # codec of KV chunks on the wire: fp16, int8 or fp32
    persist_dir: Path | None = None
    fp_rate: float = 0.01
    route_threshold: int = 2  # queue excess over the least-loaded node that overrides cache affinity
    fetch_margin: float = 1.2  # fetch only if transfer * margin < recompute: estimates err, "never slower" must not
    fetch_timeout_s: float = 30.0
    # Serving peers (mesh.cache.quota): bytes per requester and in all, and bytes in flight to the broker.
    serve_mb_s: float = 8.0  # per requester: 64 Mbit/s, above any Pi's Wi-Fi
    serve_burst_mb: float = 0.0  # 0: one full context of the node's model (mesh.cache.quota.default_burst)
    serve_total_mb_s: float = 32.0
    serve_total_burst_mb: float = 0.0  # 0: twice one requester's burst
    serve_window_mb: float = 4.0

    def __post_init__(self) -> None:
        if self.kv_wire not in ("fp16", "int8", "fp32"):
            raise ConfigError(f"kv wire codec must be fp16, int8 or fp32, not {self.kv_wire!r}")
        if not 1 <= self.chunk_size <= 4096 or self.budget_mb < 0 or not 0 < self.fp_rate < 1:
            raise ConfigError("invalid cache settings")
        if min(self.serve_burst_mb, self.serve_total_burst_mb) < 0 or min(self.serve_mb_s, self.serve_total_mb_s) <= 0:
            raise ConfigError("KV serving rates must be > 0 and bursts >= 0 (0: the default)")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    broker: BrokerAddress = field(default_factory=BrokerAddress)
    model: str = DEFAULT_MODEL
    home: Path = Path.home() / ".cache" / "mesh"  # converted models and data
    threads: int = 0  # 0: torch's default (all cores)
    limits: Limits = field(default_factory=Limits)
    timing: Timing = field(default_factory=Timing)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.threads < 0:
            raise ConfigError("threads must be >= 0")
