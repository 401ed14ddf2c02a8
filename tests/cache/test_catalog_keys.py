"""Keyed catalogs between real NodeCaches (review finding M1): SmolLM2, the real CA, keyrings and
catalog keys (``mesh.auth.store``), no broker. Nodes that hold the mesh's catalog key share KV as
before; a node without it, or with another (a rotation half way), sees no hits and no error; a
node whose identity came before catalog keys publishes an unkeyed catalog that keyed nodes still
read; keyless nodes (no identities) share among themselves as before."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from mesh.auth import store as identities
from mesh.auth.keyring import Keyring
from mesh.cache.catalog import KEYED_VERSION
from mesh.model import LoadedModel
from tests.cache.kit import Q1
from tests.cache.test_provenance import Node, ask_via, ring


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with nodes a and b (holding the catalog key) and old, issued before catalog keys."""
    d = tmp_path_factory.mktemp("identity")
    identities.init_ca(d)
    for name in ("a", "b", "old"):
        identities.issue(d, name, "node")
    identities.catalog_key_path(d, "old").unlink()
    return d


def test_nodes_holding_the_catalog_key_share_kv(loaded: LoadedModel, ids_dir: Path) -> None:
    a, b = Node(loaded, ring(ids_dir, "a")), Node(loaded, ring(ids_dir, "b"))
    assert a.cache.catalog_key is not None and a.cache.catalog_key == b.cache.catalog_key
    b.cache.prepare_local(b.ids(Q1))
    assert b.cache.catalog().to_dict()["v"] == KEYED_VERSION
    got, _ = ask_via(a, b, "b", Q1)
    assert got.info["decision"] == "remote" and got.info["peer"] == "b" and got.info["full_hit"], got.info
    assert a.rejects.snapshot() == {}


def test_a_node_without_the_key_sees_no_hits_and_no_error(loaded: LoadedModel, ids_dir: Path) -> None:
    b = Node(loaded, ring(ids_dir, "b"))
    b.cache.prepare_local(b.ids(Q1))
    own = ring(ids_dir, "a")
    rotated = Keyring(own.identity, own.ca, own.crl, catalog_key=secrets.token_bytes(32))  # a rotation half way
    for asker in (Node(loaded, None), Node(loaded, rotated)):
        got, _ = ask_via(asker, b, "b", Q1)
        assert got.info["decision"] == "no-match" and got.info["remote_tokens"] == 0, got.info
        assert asker.cache.peers == {} and asker.cache.snapshot()["catalogs_unreadable"] == 1
        assert asker.rejects.snapshot() == {}
        # it answers from its own prefill, and its next ask of the same prompt is a local full hit
        again = asker.cache.prepare_local(asker.ids(Q1))
        assert again.info["decision"] == "local" and again.info["full_hit"]


def test_a_node_from_before_catalog_keys_still_shares_with_keyed_ones(loaded: LoadedModel, ids_dir: Path) -> None:
    old, a = Node(loaded, ring(ids_dir, "old")), Node(loaded, ring(ids_dir, "a"))
    assert old.cache.catalog_key is None and a.cache.catalog_key is not None
    old.cache.prepare_local(old.ids(Q1))
    assert old.cache.catalog().to_dict()["v"] == 1  # unkeyed: it hides nothing, and everyone reads it
    got, _ = ask_via(a, old, "old", Q1)
    assert got.info["decision"] == "remote" and got.info["peer"] == "old" and got.info["full_hit"], got.info
    # the other way, a keyed catalog tells the old node nothing until it is given the key
    b, fresh = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "old"))
    b.cache.prepare_local(b.ids(Q1))
    back, _ = ask_via(fresh, b, "b", Q1)
    assert back.info["decision"] == "no-match" and fresh.cache.snapshot()["catalogs_unreadable"] == 1, back.info


def test_keyless_nodes_share_among_themselves_as_before(loaded: LoadedModel) -> None:
    x, y = Node(loaded, None), Node(loaded, None)
    x.cache.prepare_local(x.ids(Q1))
    assert x.cache.catalog().to_dict()["v"] == 1
    got, _ = ask_via(y, x, "x", Q1)
    assert got.info["decision"] == "remote" and got.info["full_hit"], got.info
