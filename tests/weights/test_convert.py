"""The GGUF converter against transformers' own GGUF loading, on a small random-weight LLaMA GGUF
written here with the ``gguf`` package (quantised blocks of several types, q/k permutation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mesh.errors import ConfigError
from mesh.weights.convert import _tensor_reader, convert_gguf
from mesh.weights.formats import quantize_rows
from mesh.weights.load import build_model, open_weights

H, HEADS, KV, FF, LAYERS, VOCAB = 64, 4, 2, 128, 2, 320


def _config():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=FF,
                       num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)


def write_gguf(path: Path, seed: int = 0, vocabulary: int = 0) -> Path:
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    if vocabulary:  # a tokenizer-sized array field (Gemma's has 262,144 entries)
        w.add_token_list([f"token{i}" for i in range(vocabulary)])
        w.add_token_scores([float(i) for i in range(vocabulary)])

    def add(name: str, rows: int, cols: int, qtype: T) -> None:
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", VOCAB, H, T.Q8_0)
    w.add_tensor("output_norm.weight", rng.standard_normal(H).astype(np.float32))
    types = [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1]
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(H).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.standard_normal(H).astype(np.float32))
        for j, (name, rows, cols) in enumerate([("attn_q", HEADS * 16, H), ("attn_k", KV * 16, H),
                                                ("attn_v", KV * 16, H), ("attn_output", H, HEADS * 16),
                                                ("ffn_gate", FF, H), ("ffn_up", FF, H), ("ffn_down", H, FF)]):
            add(f"blk.{i}.{name}.weight", rows, cols, types[(i + j) % len(types)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path: Path) -> dict[str, torch.Tensor]:
    """What transformers makes of the GGUF: the fp32 weights the mesh's fp32 format holds."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(_config())
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta)["tensors"]


@pytest.mark.parametrize("block_bytes", [1 << 30, 4096])  # whole tensors, and row blocks
def test_int8_file_is_transformers_fp32_quantised_per_row(tmp_path: Path, block_bytes: int) -> None:
    src = write_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(src, tmp_path / "weights-int8.safetensors", "int8", _config(), {"gguf_sha256": "00"},
                       block_bytes=block_bytes)
    got = open_weights(out, "int8", "00")
    ref = _reference(src)
    assert ref and len(got) >= len(ref) * 1  # every tensor of the reference has its counterpart
    for name, w in ref.items():
        if w.dim() == 2:
            base = name.removesuffix(".weight")
            q, s = quantize_rows(w)
            assert torch.equal(got[f"{base}.qweight"], q), name
            assert torch.equal(got[f"{base}.scales"], s), name
        else:
            assert torch.equal(got[name], w.float()), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf", "weights-int8.safetensors"]


def test_model_on_int8_file_matches_fp32_model_on_dequantised_weights(tmp_path: Path) -> None:
    """The meta-built int8 model computes what an fp32 model holding ``q * scale`` computes."""
    from transformers import AutoModelForCausalLM

    src = write_gguf(tmp_path / "tiny.gguf", seed=3)
    out = convert_gguf(src, tmp_path / "weights-int8.safetensors", "int8", _config(), {"gguf_sha256": "00"})
    tensors = open_weights(out, "int8", "00")
    model = build_model(_config(), tensors, out, "int8")
    assert not [n for n, p in model.named_parameters() if p.dim() == 2]  # no float matrix anywhere
    assert model.lm_head.qweight.data_ptr() == model.model.embed_tokens.qweight.data_ptr()  # tied, shared
    ref = AutoModelForCausalLM.from_config(_config()).eval()
    state = {}
    for name, p in ref.state_dict().items():
        base = name.removesuffix(".weight")
        if f"{base}.qweight" in tensors:
            state[name] = tensors[f"{base}.qweight"].float() * tensors[f"{base}.scales"][:, None]
        elif name == "lm_head.weight":
            state[name] = tensors["model.embed_tokens.qweight"].float() * tensors["model.embed_tokens.scales"][:, None]
        else:
            state[name] = tensors[name]
    ref.load_state_dict(state)
    ids = torch.tensor([[1, 5, 300, 7, 42, 42, 9]])
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    # float32 summation order differs (the scale multiplies the output, not the weight)
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_config_that_does_not_fit_the_gguf_leaves_nothing(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    src = write_gguf(tmp_path / "tiny.gguf")
    wrong = LlamaConfig(**{**_config().to_dict(), "intermediate_size": FF * 2})
    with pytest.raises(ConfigError, match="ffn_gate.weight is .* wants"):
        convert_gguf(src, tmp_path / "weights-int8.safetensors", "int8", wrong, {"gguf_sha256": "00"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    with pytest.raises(ConfigError, match="not by the quantising converter"):
        convert_gguf(src, tmp_path / "x.safetensors", "fp32", _config(), {})


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_tensor_reader_skips_array_fields_and_keeps_the_tensor_index(tmp_path: Path) -> None:
    import gguf

    src = write_gguf(tmp_path / "vocab.gguf", vocabulary=100_000)
    before = _anon_mib()
    lean = _tensor_reader(src)
    grown = _anon_mib() - before
    full = gguf.GGUFReader(str(src))
    assert grown < 40, f"the converter's reader grew by {grown:.0f} MiB"
    assert len(full.fields["tokenizer.ggml.tokens"].data) == 100_000
    assert lean.fields["tokenizer.ggml.tokens"].data == []  # skipped, not parsed
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in lean.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in full.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(lean.tensors, full.tensors))


@pytest.mark.parametrize("source", ["tiny-llama", "smollm2-135m", "gemma3-270m"])
def test_name_map_from_the_mesh_model_equals_transformers(source: str) -> None:
    """The converter reads names and shapes off mesh.lm's model (no transformers model class is
    imported: ~85 MiB on a Pi Zero); the GGUF -> HF map and every shape equal those over
    transformers' own model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    from mesh.weights.convert import _name_map
    from tests.conftest import require_model

    config = _config() if source == "tiny-llama" else AutoConfig.from_pretrained(require_model(source))
    arch = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    names, _, shapes = _name_map(config, arch)
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(config)
    want = get_gguf_hf_weights_map(hf, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict()))
    assert names == want and len(names) > 10
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {hf_name: shapes[hf_name] for hf_name in names.values()} == \
        {hf_name: hf_shapes[hf_name] for hf_name in names.values()}
