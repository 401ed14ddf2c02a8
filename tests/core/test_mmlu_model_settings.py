"""MMLU prompt building, the decoder's stop handling, and configuration at the edge."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nodes import mmlu
from mesh.config import BrokerAddress
from mesh.errors import ConfigError
from mesh.model import _stop_cut, model_spec
from nodes.settings import node_config

Q = mmlu.Question("high_school_geography", "Which is a continent?", ("Asia", "Nile", "Alps", "Sahara"), 0)
EX = mmlu.Question("high_school_geography", "Largest ocean?", ("Atlantic", "Pacific", "Indian", "Arctic"), 1)


def test_one_shot_prompt_layout() -> None:
    p = mmlu.one_shot_prompt(EX, Q)
    assert p.startswith("The following are multiple choice questions (with answers) about high school geography.\n\n")
    assert "Largest ocean?\nA. Atlantic\nB. Pacific\nC. Indian\nD. Arctic\nAnswer: B\n\n" in p
    assert p.endswith("Which is a continent?\nA. Asia\nB. Nile\nC. Alps\nD. Sahara\nAnswer:")


@pytest.mark.parametrize(("text", "letter"), [(" B", "B"), ("C. Alps", "C"), (" (D)", "D"), ("none", None),
                                              ("Asia", None), (" a", None)])
def test_parse_letter(text: str, letter: str | None) -> None:
    assert mmlu.parse_letter(text) == letter


def test_stop_cut_takes_the_earliest_stop() -> None:
    assert _stop_cut("abc\ndef.", ["\n", "."]) == 3
    assert _stop_cut("abc", ["\n"]) == -1
    assert _stop_cut("abc", [""]) == -1


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        model_spec("gpt-5")


def _args(**kw: object) -> argparse.Namespace:
    base = dict(name=None, model=None, home=None, cache_dir=None, threads=None, heartbeat=None, max_queue=None, broker=None, cache_mb=None, chunk_size=None, kv_wire=None, no_cache=False, fetch_margin=None, link_ping=None,
                username=None, password_file=None, tls_ca=None, tls_cert=None, tls_key=None, config=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_flags_beat_environment_beat_toml(tmp_path: Path) -> None:
    toml = tmp_path / "mesh.toml"
    toml.write_text('[broker]\naddress = "10.0.0.2:1884"\nusername = "pi1"\n[node]\nname = "pi1"\nthreads = 3\n')
    cfg = node_config(_args(config=str(toml)), env={})
    assert (cfg.name, cfg.broker.host, cfg.broker.port, cfg.broker.username, cfg.threads) == \
        ("pi1", "10.0.0.2", 1884, "pi1", 3)
    cfg = node_config(_args(config=str(toml)), env={"MESH_BROKER": "10.0.0.3:1885", "MESH_NODE_NAME": "pi2"})
    assert (cfg.name, cfg.broker.port) == ("pi2", 1885)
    cfg = node_config(_args(config=str(toml), name="pi3", broker="h:1"), env={"MESH_NODE_NAME": "pi2"})
    assert (cfg.name, str(cfg.broker)) == ("pi3", "h:1")


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        node_config(_args(), env={})  # no name
    with pytest.raises(ConfigError):
        node_config(_args(name="a/b"), env={})
    with pytest.raises(ConfigError):
        node_config(_args(name="a", broker="h:99999"), env={})
    with pytest.raises(ConfigError):
        node_config(_args(name="a", config=str(tmp_path / "missing.toml")), env={})
    assert BrokerAddress.parse(":1999").host == "127.0.0.1"
