"""Configuration at the edge: CLI flags, then ``MESH_*`` environment variables, then a TOML file
(``--config`` or ``MESH_CONFIG``), then defaults. Built once into the frozen dataclasses of
``mesh.config``; nothing below the CLI reads the environment.

TOML layout (every key optional)::

    [broker]
    address = "192.168.1.2:1883"
    username = "pi1"
    password_file = "/etc/mesh/pi1.password"
    tls_ca = "/etc/mesh/ca.crt"

    [node]
    name = "pi1"
    model = "gemma3-270m"
    threads = 2
    weights = "int8"                # weight format: fp32 or int8 (MESH_WEIGHTS)
    home = "/var/cache/mesh"          # converted models and data (MESH_HOME)
    kv_dir = "/var/cache/mesh/kv/pi1"  # persist the prompt cache here (MESH_KV_DIR; off if unset)

Persisting the prompt cache is opt-in and per node: ``--cache-dir``, ``MESH_KV_DIR`` or ``kv_dir``.
``MESH_CACHE_DIR`` (and the TOML ``cache_dir``) once meant that, while the deploy files used the
same name for the model directory, so every systemd node persisted its KV by accident: the old
names are ignored with a warning, never read as a persistence directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh import cpu
from mesh.config import DEFAULT_MODEL, BrokerAddress, CacheConfig, Limits, NodeConfig, Timing
from mesh.errors import ConfigError

log = logging.getLogger(__name__)
LEGACY_KV_DIR = "MESH_CACHE_DIR"  # ambiguous: the deploy files meant the model directory by it


def _toml(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    path = getattr(args, "config", None) or env.get("MESH_CONFIG")
    if not path:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def _pick(flag: Any, env: Mapping[str, str], var: str, table: Mapping[str, Any], key: str, default: Any) -> Any:
    if flag is not None:
        return flag
    if var in env:
        return env[var]
    return table.get(key, default)


def mesh_home(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Path:
    """Where converted models and data live (``--home``, ``MESH_HOME``, default ~/.cache/mesh)."""
    toml = _toml(args, env)
    value = _pick(getattr(args, "home", None), env, "MESH_HOME", toml.get("node", {}), "home", None)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "mesh"


def broker_address(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> BrokerAddress:
    toml = _toml(args, env)
    table = toml.get("broker", {})
    text = _pick(getattr(args, "broker", None), env, "MESH_BROKER", table, "address", "127.0.0.1:1883")
    username = _pick(getattr(args, "username", None), env, "MESH_USERNAME", table, "username", None)
    password = env.get("MESH_PASSWORD") or table.get("password")
    password_file = _pick(getattr(args, "password_file", None), env, "MESH_PASSWORD_FILE", table, "password_file", None)
    if password is None and password_file:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read password file {password_file}: {exc}") from exc
    tls = {k: _pick(getattr(args, k, None), env, f"MESH_{k.upper()}", table, k, None)
           for k in ("tls_ca", "tls_cert", "tls_key")}
    return BrokerAddress.parse(str(text), username=username, password=password,
                               **{k: Path(v) if v else None for k, v in tls.items()})


def node_config(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> NodeConfig:
    toml = _toml(args, env)
    table = toml.get("node", {})
    name = _pick(getattr(args, "name", None), env, "MESH_NODE_NAME", table, "name", None)
    if not name:
        raise ConfigError("a node needs a name: --name, MESH_NODE_NAME or [node] name")
    cache_d, limits_d, timing_d = CacheConfig(), Limits(), Timing()  # the defaults live in mesh.config
    try:
        threads = int(_pick(getattr(args, "threads", None), env, "MESH_THREADS", table, "threads", 0))
        threads = cpu.torch_settings(cpu.read_cpu(), threads).threads  # one on an ARMv8.0 Pi (mesh.cpu)
        heartbeat = float(_pick(getattr(args, "heartbeat", None), env, "MESH_HEARTBEAT_S", table, "heartbeat_s",
                                timing_d.heartbeat_s))
        link_ping = float(_pick(getattr(args, "link_ping", None), env, "MESH_LINK_PING_S", table, "link_ping_s",
                                timing_d.link_ping_s))
        max_queue = int(_pick(getattr(args, "max_queue", None), env, "MESH_MAX_QUEUE", table, "max_queue",
                              limits_d.max_queue))
        max_context = int(_pick(getattr(args, "max_context", None), env, "MESH_MAX_CONTEXT", table, "max_context",
                                limits_d.max_context))
        cache_mb = float(_pick(getattr(args, "cache_mb", None), env, "MESH_CACHE_MB", table, "cache_mb",
                               cache_d.budget_mb))
        chunk = int(_pick(getattr(args, "chunk_size", None), env, "MESH_CHUNK_SIZE", table, "chunk_size",
                          cache_d.chunk_size))
        margin = float(_pick(getattr(args, "fetch_margin", None), env, "MESH_FETCH_MARGIN", table, "fetch_margin",
                             cache_d.fetch_margin))
        serve_rate = float(_pick(getattr(args, "kv_serve_mb_s", None), env, "MESH_KV_SERVE_MB_S", table,
                                 "kv_serve_mb_s", cache_d.serve_mb_s))
        serve_burst = float(_pick(getattr(args, "kv_serve_burst_mb", None), env, "MESH_KV_SERVE_BURST_MB", table,
                                  "kv_serve_burst_mb", cache_d.serve_burst_mb))
    except ValueError as exc:
        raise ConfigError(f"invalid number in node settings: {exc}") from exc
    persist = _pick(getattr(args, "cache_dir", None), env, "MESH_KV_DIR", table, "kv_dir", None)
    legacy = [f"{LEGACY_KV_DIR}={env[LEGACY_KV_DIR]}" if LEGACY_KV_DIR in env else None,
              f"[node] cache_dir = {table['cache_dir']!r}" if "cache_dir" in table else None]
    for what in filter(None, legacy):
        log.warning("ignoring %s: models live under MESH_HOME; to persist the prompt cache, set "
                    "MESH_KV_DIR (or --cache-dir, or [node] kv_dir) to a directory of this node's own", what)
    cache = CacheConfig(
        enabled=not getattr(args, "no_cache", False) and not table.get("no_cache", False),
        budget_mb=cache_mb, chunk_size=chunk, fetch_margin=margin, serve_mb_s=serve_rate, serve_burst_mb=serve_burst,
        kv_wire=str(_pick(getattr(args, "kv_wire", None), env, "MESH_KV_WIRE", table, "kv_wire", cache_d.kv_wire)),
        persist_dir=Path(persist).expanduser() if persist else None,
    )
    return NodeConfig(
        cache=cache,
        name=str(name),
        broker=broker_address(args, env),
        model=str(_pick(getattr(args, "model", None), env, "MESH_MODEL", table, "model", DEFAULT_MODEL)),
        home=mesh_home(args, env),
        threads=threads,
        limits=Limits(max_queue=max_queue, max_context=max_context),
        timing=Timing(heartbeat_s=heartbeat, link_ping_s=link_ping),
    )


def cache_budget_given(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> bool:
    """Whether the user set the prompt cache's budget (else the node fits it to its memory)."""
    table = _toml(args, env).get("node", {})
    return _pick(getattr(args, "cache_mb", None), env, "MESH_CACHE_MB", table, "cache_mb", None) is not None


def node_weights(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str:
    """The node's weight format (``--weights``, ``MESH_WEIGHTS``, ``[node] weights``, default fp32)."""
    from mesh.weights.formats import DEFAULT_WEIGHTS, check_format

    table = _toml(args, env).get("node", {})
    return check_format(str(_pick(getattr(args, "weights", None), env, "MESH_WEIGHTS", table, "weights",
                                  DEFAULT_WEIGHTS)))


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every process that talks to the broker takes (read back by :func:`broker_address`)."""
    p.add_argument("--broker", help="HOST:PORT of the MQTT broker (default 127.0.0.1:1883, or MESH_BROKER)")
    p.add_argument("--username", help="broker username (MESH_USERNAME)")
    p.add_argument("--password-file", help="file holding the broker password (or MESH_PASSWORD)")
    p.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    p.add_argument("--tls-cert", help="client certificate for TLS")
    p.add_argument("--tls-key", help="client key for TLS")
    p.add_argument("--config", help="TOML config file (MESH_CONFIG)")
