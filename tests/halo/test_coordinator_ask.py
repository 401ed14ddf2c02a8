"""Coordinator._answer: an ask still carrying one of the removed comparison switches (halo_wire,
halo_link, halo_head_threads, halo_lean) is answered as any other, the field ignored and counted in
the rejects its heartbeat publishes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from mesh import wire
from mesh.model import Generation
from mesh.member import Job
from nodes.coordinator import IGNORED_ASK_FIELDS, Coordinator, CoordinatorConfig


class FakeEngine:
    def __init__(self) -> None:
        self.runs: list[bool] = []

    @contextmanager
    def run(self, strict: bool, measure: bool = False) -> Iterator[Any]:
        self.runs.append(strict)
        yield SimpleNamespace(figures=lambda: {"sync": "strict" if strict else "relaxed", "token_times_s": [0.1, 0.02]})


class FakeDecoder:
    step = None

    def encode(self, text: str) -> list[int]:
        return [1, 2, 3]

    def generate(self, ids: list[int], max_new: int, stop: tuple[str, ...], on_text: Any, prepare: Any = None
                 ) -> Generation:
        on_text("hi")
        return Generation(token_ids=[7, 8], text="hi", stop_reason="length")


@pytest.fixture
def coordinator() -> Iterator[tuple[Coordinator, list[tuple[wire.Kind, dict]]]]:
    c = Coordinator(CoordinatorConfig())  # not started: no broker, no model
    c.loaded, c.decoder, c.cache, c.engine = SimpleNamespace(key="tiny"), FakeDecoder(), None, FakeEngine()
    c.max_context = 1024  # what start() derives from the model (mesh.budget); the fake has no config
    sent: list[tuple[wire.Kind, dict]] = []
    c.member.reply = lambda job, kind, body: sent.append((kind, body))  # type: ignore[method-assign]
    yield c, sent


@pytest.mark.parametrize("field,value", [("halo_wire", "cbor"), ("halo_link", False),
                                         ("halo_head_threads", 1), ("halo_lean", False)])
def test_an_old_comparison_switch_is_ignored_and_counted(coordinator, field: str, value: Any) -> None:
    c, sent = coordinator
    body = {"text": "hi", "max_new_tokens": 2, "halo_sync": "strict", field: value}
    c._answer(Job(wire.Envelope(wire.Kind.ASK, "client", body, corr="k", reply_to="mesh/v1/reply/client"), 0.0))
    assert [k for k, _ in sent] == [wire.Kind.TOKEN, wire.Kind.ANSWER]
    answer = sent[-1][1]
    assert answer["token_ids"] == [7, 8] and answer["halo"]["sync"] == "strict" and c.engine.runs == [True]
    assert c.rejects.snapshot() == {"ignored-field." + field.replace("_", "-"): 1}


def test_an_ask_without_them_counts_nothing(coordinator) -> None:
    c, sent = coordinator
    body = {"text": "hi", "max_new_tokens": 2}
    c._answer(Job(wire.Envelope(wire.Kind.ASK, "client", body, corr="k", reply_to="mesh/v1/reply/client"), 0.0))
    assert sent[-1][0] is wire.Kind.ANSWER and c.rejects.snapshot() == {}
    assert set(IGNORED_ASK_FIELDS) == {"halo_wire", "halo_link", "halo_head_threads", "halo_lean"}
