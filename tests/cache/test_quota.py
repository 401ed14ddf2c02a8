"""What a node serves a KV fetch (mesh.cache.quota): the reply topic, the codec, the byte budget."""

from __future__ import annotations

import pytest

from mesh.cache.quota import MAX_REQUESTERS, ByteBuckets, fetch_reply_ok, pick_codec
from mesh.errors import ConfigError


def test_only_the_requesters_own_inbox_gets_an_answer() -> None:
    assert fetch_reply_ok("pi1", "mesh/v1/reply/node-pi1") and fetch_reply_ok("pi1", "mesh/v1/reply/pi1")
    assert not fetch_reply_ok("pi1", "mesh/v1/reply/node-pi2") and not fetch_reply_ok("pi1", "mesh/v1/answer")
    assert not fetch_reply_ok("pi1", "homeassistant-mesh/briefing") and not fetch_reply_ok("pi1", None)
    assert not fetch_reply_ok("a/b", "mesh/v1/reply/a/b") and not fetch_reply_ok("+", "mesh/v1/reply/+")


def test_the_server_picks_the_codec_and_never_fp32_but_its_own() -> None:
    assert pick_codec(["fp16"], "fp16") == "fp16"
    assert pick_codec(["fp32"], "fp16") is None  # a requester cannot double the bytes
    assert pick_codec(["fp32", "int8"], "fp16") == "int8"
    assert pick_codec(["fp32", "fp16", "int8"], "int8") == "int8"  # our own first
    assert pick_codec(["fp32"], "fp32") == "fp32"
    assert pick_codec(["zstd"], "fp16") is None


def test_bytes_are_metered_per_requester_and_in_all() -> None:
    b = ByteBuckets(rate=100.0, burst=1000.0, total_rate=150.0, total_burst=1500.0)
    assert b.available("a", 0.0) == 1000.0
    b.charge("a", 1200, 0.0)  # the last part may overdraw
    assert b.available("a", 0.0) == 0.0 and b.available("a", 1.0) == 0.0  # -200 + 100
    assert b.available("a", 5.0) == 300.0  # -200 + 5 s x 100
    assert b.available("b", 5.0) == 1000.0  # another requester has its own bucket ...
    b.charge("b", 1000, 5.0)
    assert b.available("c", 5.0) == pytest.approx(50.0)  # ... but all of them share one: 1500 - 1200 + 750 - 1000
    assert b.available("a", 100.0) == 1000.0  # refilled up to the burst, no more


def test_made_up_names_are_forgotten_oldest_first() -> None:
    b = ByteBuckets(1.0, 10.0, 1e9, 1e9)
    b.charge("first", 10, 0.0)
    for i in range(MAX_REQUESTERS):
        b.available(f"n{i}", 0.0)
    assert b.available("first", 0.0) == 10.0  # forgotten: a fresh bucket (the total still bounds it)


def test_rates_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        ByteBuckets(0.0, 1.0, 1.0, 1.0)
