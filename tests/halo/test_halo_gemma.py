"""HALO with Gemma-3 270M (GELU-tanh MLP, 18 layers): strict sync through real workers is lossless."""

from __future__ import annotations

import pytest

from mesh.model import Decoder, load_model
from nodes.client import MeshClient
from nodes.up import MeshProcesses, free_port
from tests.conftest import CACHE_ROOT, asker_keys, require_model

pytestmark = pytest.mark.e2e


def test_strict_gemma_generation_through_two_workers_equals_the_plain_model(log_dir) -> None:  # type: ignore[no-untyped-def]
    require_model("gemma3-270m")
    procs = MeshProcesses(["gw1", "gw2"], "gemma3-270m", free_port(), home=CACHE_ROOT, log_dir=log_dir / "halo-gemma",
                          node_args=["--roles", "worker", "--no-cache", "--threads", "1"], coordinator=True)
    prompt = "The capital of France is"
    with procs:
        with MeshClient(procs.address, keyring=asker_keys()) as client:
            got = client.ask(prompt, node="coordinator", max_new_tokens=12, timeout=300, no_cache=True,
                             extra={"halo_sync": "strict"})
    loaded = load_model(CACHE_ROOT, "gemma3-270m")
    decoder = Decoder(loaded)
    ref = decoder.generate(decoder.encode(prompt), 12)
    halo = got.node_figures.get("halo") or {}
    assert got.node == "coordinator" and halo.get("partials_late", 0) == 0
    assert got.node_figures["token_ids"] == ref.token_ids, (got.answer, ref.text)
