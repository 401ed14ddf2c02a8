"""Heartbeat figures against physics (mesh.plausible): the impossible is refused, the honest kept."""

from __future__ import annotations

import math

import pytest

from mesh.plausible import MAX_ROWS_PER_S, heartbeat_problem

HONEST = {"seq": 12, "model": "smollm2-135m", "model_key": "k", "queue": 3, "queue_max": 32, "load": 0.42,
          "prefill_tps": 850.3, "decode_tps": 41.0, "rtt_ms": 0.4, "link_bw_Bps": 3.2e8, "heartbeat_s": 2.0,
          "link": {"rtt_ewma_ms": 0.5, "late_fraction": 0.0, "loss_fraction": None},
          "halo": {"compute_rows_per_s": 2.5e6, "heartbeat_s": 2.0, "groups": {}}}


def test_an_honest_heartbeat_passes() -> None:
    assert heartbeat_problem(HONEST) is None
    assert heartbeat_problem({"seq": 0, "model": "m", "model_key": "k", "queue": 0, "load": 0.0,
                              "prefill_tps": 0.0}) is None  # the coordinator's: no speed of its own


@pytest.mark.parametrize(("path", "value"), [
    ("queue", -1), ("queue", -10**9), ("queue", 10**9), ("queue", True), ("seq", -1),
    ("load", -0.1), ("load", 1.5), ("load", math.nan), ("prefill_tps", -1.0), ("prefill_tps", math.inf),
    ("prefill_tps", 1e308), ("decode_tps", "fast"), ("rtt_ms", -1e6), ("rtt_ms", math.nan),
    ("link_bw_Bps", -5.0), ("link_bw_Bps", 1e300), ("heartbeat_s", 0.0), ("heartbeat_s", 1e9),
    ("link.rtt_ewma_ms", -3.0), ("link.loss_fraction", 2.0), ("link.late_fraction", -0.5),
    ("halo.compute_rows_per_s", 1e308), ("halo.compute_rows_per_s", -1.0),
    ("halo.compute_rows_per_s", MAX_ROWS_PER_S * 10), ("halo.compute_rows_per_s", math.inf),
])
def test_an_impossible_figure_is_named(path: str, value: object) -> None:
    body = {**HONEST, "link": dict(HONEST["link"]), "halo": dict(HONEST["halo"])}  # type: ignore[arg-type]
    if "." in path:
        table, key = path.split(".")
        body[table][key] = value
    else:
        body[path] = value
    assert heartbeat_problem(body) == path


def test_a_sub_table_that_is_no_map_is_refused() -> None:
    assert heartbeat_problem({**HONEST, "halo": [1, 2]}) == "halo"
    assert heartbeat_problem({**HONEST, "link": "fast"}) == "link"
