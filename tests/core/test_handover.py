"""The router's record of forwarded Home Assistant asks (mesh.handover, review M9)."""

from __future__ import annotations

from mesh import wire
from mesh.handover import Forwards, ask_digest


def ask(corr: str) -> wire.Envelope:
    return wire.Envelope(wire.Kind.ASK, "json-client", {"text": "hi", "reply_format": "json"}, corr=corr)


def test_an_ask_its_node_answered_is_forgotten_and_only_that_node_can_say_so() -> None:
    f = Forwards()
    f.sent(ask("a"), "n2", until=100.0)
    f.answered("n3", [ask_digest("a")])  # another node cannot close it
    assert len(f) == 1
    f.answered("n2", "not a list")
    f.answered("n2", [7, ask_digest("a")])
    assert len(f) == 0 and f.orphans({"n1"}, 1.0) == []


def test_an_ask_whose_node_died_is_routed_once_more_and_never_twice() -> None:
    f = Forwards()
    f.sent(ask("a"), "n2", until=100.0)
    f.sent(ask("b"), "n3", until=100.0)
    assert f.orphans({"n1", "n2", "n3"}, 1.0) == []
    (orphan,) = f.orphans({"n1", "n3"}, 2.0)
    assert orphan.env.corr == "a" and orphan.target == "n2" and not orphan.retried
    f.sent(orphan.env, "n3", until=100.0, retried=True)  # the retry
    again = f.orphans({"n1"}, 3.0)  # both on n3 now, and n3 died
    assert [o.env.corr for o in again] == ["b"]  # b's first loss: retried; a's second: not
    assert len(f) == 0 and f.dropped == 1


def test_an_expired_ask_is_dropped_not_retried_and_the_record_is_bounded() -> None:
    f = Forwards(max_tracked=3)
    f.sent(ask("old"), "n2", until=5.0)
    assert f.orphans({"n1"}, 6.0) == []  # past its deadline: nobody waits for it any more
    for i in range(5):
        f.sent(ask(f"x{i}"), "n2", until=100.0)
    assert len(f) == 3 and f.dropped == 2
    assert [o.env.corr for o in f.orphans(set(), 7.0)] == ["x2", "x3", "x4"]


def test_digests_name_asks_without_their_ids() -> None:
    assert ask_digest("ha-1") == ask_digest("ha-1") != ask_digest("ha-2")
    assert "ha-1" not in ask_digest("ha-1") and len(ask_digest("ha-1")) == 16
