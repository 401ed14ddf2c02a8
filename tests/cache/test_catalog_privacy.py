"""Review finding M1, the offline form of E10: a node's retained catalog, read from a real broker
by anyone the ACL lets read it (every node, the asker, the coordinator), must not confirm a
candidate prompt to whoever holds the public model but not the mesh's catalog key. And nodes that
hold the key still share KV through those catalogs.

Real node processes (SmolLM2, keyed like ``mesh up``: the throwaway CA hands node identities the
catalog key, ``mesh.auth.store``), a real amqtt broker; the attacker computes the keys of each
candidate with the mesh's own functions (``NodeCache.keys``, the review's expression) and tests
them both through ``Catalog.from_dict(...).contains`` and on the raw bits with the public
(unkeyed) indices, as one who ignores the catalog's version would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from mesh.cache.catalog import Catalog, bloom_indices
from mesh.cache.node_cache import NodeCache
from mesh.config import CacheConfig
from mesh.errors import ProtocolError
from mesh.model import Decoder, LoadedModel
from nodes.client import MeshClient
from tests.cache.kit import retained_catalog
from tests.cache.test_cache_privacy import OTHERS, VICTIM
from tests.conftest import CACHE_ROOT, Broker, NodeProcess, asker_keys, start_node

pytestmark = pytest.mark.e2e

HOLDER, FETCHER = "ck1", "ck2"
# The review's E10 template behind a Home Assistant preamble of the home's devices: a templated
# prompt whose questions an attacker can list, long enough that fetching its KV clearly beats
# recomputing it on this machine.
TEMPLATE = ("You are the voice assistant of a smart home. The home has these devices: front door lock, back door "
            "lock, garage door, kitchen light, living room light, bedroom light, hall thermostat, dog feeder, "
            "washing machine, dishwasher, porch camera, garden sprinkler, office heater. Answer in a few words, "
            "never more than one sentence, and say when a device does not answer. Question: {}\nShort answer:")


@pytest.fixture(scope="module")
def nodes(amqtt_broker: Broker, log_dir: Path) -> Iterator[dict[str, NodeProcess]]:
    started = {HOLDER: start_node(amqtt_broker, HOLDER, "smollm2-135m", log_dir),
               # fetch whenever the estimate says it is faster (no safety margin): the remote hit must
               # not hang on this machine's load
               FETCHER: start_node(amqtt_broker, FETCHER, "smollm2-135m", log_dir, "--fetch-margin", "1")}
    yield started
    for n in started.values():
        n.stop()


def bit_set(body: Mapping[str, Any], key: bytes) -> bool:
    """Whether the filter has ``key``'s bits set at the public (unkeyed) indices."""
    return all(body["bits"][j >> 3] & 1 << (j & 7) for j in bloom_indices(key, body["m"], body["k"]))


def confirmed(body: Mapping[str, Any], candidates: Mapping[str, tuple[list[bytes], bytes]]) -> set[str]:
    """The candidates an attacker without the catalog key confirms: every chunk key and the prompt
    key present, by the catalog's own API or by the raw bits."""
    try:
        cat: Catalog | None = Catalog.from_dict(dict(body))  # the review's expression
    except ProtocolError:
        cat = None
    out = set()
    for question, (keys, pkey) in candidates.items():
        by_api = cat is not None and all(cat.contains(k) for k in [*keys, pkey])
        by_bits = all(bit_set(body, k) for k in [*keys, pkey])
        if by_api or by_bits:
            out.add(question)
    return out


def held_by(client: MeshClient, node: str, peer: str, items: int, timeout: float = 60.0) -> None:
    """Until ``node``'s heartbeat says it holds ``peer``'s catalog with at least ``items`` keys, and
    both have measured their links (before that the cost model assumes a slow default link)."""
    deadline = time.monotonic() + timeout
    seen, measured = None, False
    while time.monotonic() < deadline:
        beats = {v.name: v.heartbeat for v in client.nodes()}
        seen = (beats.get(node, {}).get("cache") or {}).get("peer_catalogs", {}).get(peer)
        measured = all("link_bw_Bps" in beats.get(n, {}) for n in (node, peer))
        if seen is not None and seen[1] >= items and measured:
            return
        time.sleep(0.05)
    raise AssertionError(f"{node} never held {peer}'s catalog with {items} keys (last seen {seen}), "
                         f"links measured: {measured}")


def test_a_retained_catalog_does_not_confirm_a_prompt_without_the_catalog_key(
        amqtt_broker: Broker, nodes: dict[str, NodeProcess], loaded: LoadedModel) -> None:
    attacker = NodeCache(loaded, CacheConfig(), Decoder(loaded))  # the public model, no identity
    candidates = {q: attacker.keys(attacker.decoder.encode(TEMPLATE.format(q))) for q in (VICTIM, *OTHERS)}
    keys, pkey = candidates[VICTIM]
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as operator:
        before = retained_catalog(amqtt_broker, HOLDER, 0)["n"]
        victim = operator.ask(TEMPLATE.format(VICTIM), node=HOLDER, max_new_tokens=2, timeout=120)
        body = retained_catalog(amqtt_broker, HOLDER, before + len(keys) + 1)

        # the attack: on an unkeyed catalog (the code before catalog keys) it confirms the victim's
        # question and only that one; on a keyed one it confirms nothing
        assert confirmed(body, candidates) == set(), (
            f"the retained catalog confirms what was asked to anyone with the public model: {body['v']=}")

        # the filter is keyed, not empty: a holder of the catalog key (a node) reads the victim's
        # prompt in it, and none of the others
        from mesh.auth import store

        secret = store.read_catalog_key(store.catalog_key_path(store.identity_dir(CACHE_ROOT), HOLDER))
        assert secret is not None and body["v"] == 2
        mine = Catalog.from_dict(body, secret=secret)
        assert {q for q, (ks, pk) in candidates.items() if all(mine.contains(k) for k in [*ks, pk])} == {VICTIM}

        # and two real nodes still share KV through keyed catalogs: the other node fetches it all
        held_by(operator, FETCHER, HOLDER, before + len(keys) + 1)
        again = operator.ask(TEMPLATE.format(VICTIM), node=FETCHER, max_new_tokens=2, timeout=120,
                             cache_figures=True)
    c = again.node_figures["cache"]
    assert c["decision"] == "remote" and c["peer"] == HOLDER and c["remote_tokens"] >= len(keys) * 16, c
    assert again.node_figures["token_ids"] == victim.node_figures["token_ids"]
