"""The two packaged GGUFs taken through `mesh setup --gguf` register as user models that are the
packaged models: the same config for the forward, the same tokenizer tables, the same weights,
and so the same prompt-cache key as a node running the packaged model in the same format.

The weights come from the converter both routes share (``convert_gguf``) given those equal
configs; SmolLM2's q4 is checked tensor by tensor against the packaged fp32 copy (its q4 keeps
the GGUF's own blocks, so the two are equal bit for bit), Gemma's conversion is left out for time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mesh.lm.config import load_config
from mesh.model import MODELS, load_model
from mesh.text import load_tokenizer
from mesh.weights.formats import dequantize_groups, dequantize_groups8
from mesh.weights.load import open_weights
from nodes.setup import locate_gguf
from nodes.setup_gguf import setup_gguf
from tests.conftest import CACHE_ROOT, require_model


@pytest.mark.parametrize("key", sorted(MODELS))
def test_a_packaged_gguf_through_gguf_is_the_packaged_model(tmp_path: Path, key: str) -> None:
    packaged = require_model(key)
    spec = MODELS[key]
    done = setup_gguf(tmp_path, locate_gguf(spec, CACHE_ROOT), f"my-{key}", weights=())
    mine = Path(done[f"my-{key}"])
    assert load_config(mine) == load_config(packaged)  # every field the forward reads
    for field in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size"):
        assert getattr(load_config(mine), field) == getattr(load_config(packaged), field), field
    assert load_tokenizer(mine).digest == load_tokenizer(packaged).digest  # the same tables
    meta = json.loads((mine / "mesh-meta.json").read_text())
    assert meta["gguf_sha256"] == spec.gguf_sha256 and meta["source"] == "user"


def test_smollm2_q4_through_gguf_equals_the_packaged_weights(tmp_path: Path) -> None:
    from mesh.cache.keys import ModelKey
    from mesh.cache.node_cache import _tokenizer_id

    key = "smollm2-135m"
    packaged = require_model(key)
    setup_gguf(tmp_path, locate_gguf(MODELS[key], CACHE_ROOT), "my-smol", weights=("q4",))
    mine = open_weights(tmp_path / "models" / "my-smol" / "weights-q4.safetensors", "q4", MODELS[key].gguf_sha256)
    from safetensors import safe_open

    with safe_open(str(packaged / "model.safetensors"), framework="pt") as fp32:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.29.mlp.down_proj.weight", "model.layers.7.input_layernorm.weight"):
            base = name.removesuffix(".weight")
            if f"{base}.qweight" not in mine:
                got = mine[name]
            elif f"{base}.mins" in mine:
                got = dequantize_groups(mine[f"{base}.qweight"], mine[f"{base}.scales"], mine[f"{base}.mins"])
            else:
                got = dequantize_groups8(mine[f"{base}.qweight"], mine[f"{base}.scales"])
            assert torch.equal(got, fp32.get_tensor(name)), name
    # The same weights, format and tokenizer: the same KV key as the packaged model's node.
    a = load_model(tmp_path, "my-smol", weights="q4")
    b = load_model(CACHE_ROOT, key, weights="fp32")
    assert a.digest == f"{b.digest}+q4"
    assert _tokenizer_id(a).split("/gguf:")[0] == _tokenizer_id(b).split("/gguf:")[0]
    assert ModelKey(model_digest=a.digest, tokenizer=_tokenizer_id(a)) != \
        ModelKey(model_digest=b.digest, tokenizer=_tokenizer_id(b))  # fp32 and q4 stay apart
