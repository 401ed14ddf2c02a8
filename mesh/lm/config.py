"""A decoder's shape and arithmetic, read from the converted model's ``config.json``.

:class:`LmConfig` holds what :mod:`mesh.lm.model` needs, under the names transformers uses, so
code written against an HF config (``mesh.budget``, ``mesh.cache.kv``, ``mesh.halo.groups``) reads
it unchanged; any other key of the file is still readable as an attribute (``max_position_embeddings``,
``bos_token_id``...). A config this forward would compute differently from the model's definition
(rotary scaling, logit soft-capping inside attention, an unknown family) is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError

FULL, SLIDING = "full_attention", "sliding_attention"
# model_type -> family: how norms, embeddings and the layer's residual path are arranged.
FAMILIES = {"llama": "llama", "qwen2": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # mesh.lm.model.ACT_FNS


@dataclass(frozen=True)
class LmConfig:
    model_type: str
    family: str  # "llama" (LLaMA, Qwen2) or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    layer_types: tuple[str, ...]
    rope_theta: dict[str, float]  # per layer type
    sliding_window: int | None
    attention_scale: float  # multiplies q.k (Gemma-3: query_pre_attn_scalar ** -0.5)
    attention_bias: bool  # q, k and v projections carry a bias (Qwen2)
    tie_word_embeddings: bool
    final_logit_softcapping: float | None = None
    kv_dtype: str = "float32"  # what the KV cache stores (mesh.lm.cache; a node runs "float16")
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getattr__(self, name: str) -> Any:  # any other key of config.json
        raw = self.__dict__.get("raw", {})
        if name in raw:
            return raw[name]
        raise AttributeError(name)

    @property
    def hidden_activation(self) -> str:
        return self.hidden_act

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self.raw.get("eos_token_id")
        return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos or ()])

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it attends to every earlier position)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


def _rope(raw: dict[str, Any], types: set[str]) -> dict[str, float]:
    params = raw.get("rope_parameters")
    if params is None:  # older files: rope_theta (+ rope_local_base_freq) at the top level
        params = {"rope_theta": raw.get("rope_theta", 10000.0), "rope_type": "default"}
        if SLIDING in types and "rope_local_base_freq" in raw:
            params = {FULL: params, SLIDING: {"rope_theta": raw["rope_local_base_freq"], "rope_type": "default"}}
    per_type = params if all(t in params for t in types) else {t: params for t in types}
    out = {}
    for t in types:
        p = per_type[t] or {}
        kind = p.get("rope_type", "default")
        if kind != "default" or raw.get("rope_scaling"):
            raise ConfigError(f"rotary scaling {kind!r} is not supported by the mesh's forward")
        out[t] = float(p["rope_theta"])
    return out


def from_dict(raw: dict[str, Any]) -> LmConfig:
    """The config of a model whose ``config.json`` is ``raw``; ConfigError if this forward cannot run it."""
    model_type = str(raw.get("model_type", ""))
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"model type {model_type!r} is not supported; known: {', '.join(sorted(FAMILIES))}")
    if raw.get("attn_logit_softcapping"):
        raise ConfigError("attention logit soft-capping is not supported by the mesh's forward")
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    layers = int(raw["num_hidden_layers"])
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window"):
        window = None
    types = tuple(raw.get("layer_types") or [FULL] * layers)
    if len(types) != layers or any(t not in (FULL, SLIDING) for t in types):
        raise ConfigError(f"layer_types {types!r} do not describe {layers} layers")
    if SLIDING in types and not window:
        raise ConfigError("sliding-window layers without a sliding_window")
    types = tuple(t if window else FULL for t in types)
    act = str(raw.get("hidden_activation") or raw.get("hidden_act") or "")
    if act not in ACTIVATIONS:
        raise ConfigError(f"MLP activation {act!r} is not supported; known: {', '.join(ACTIVATIONS)}")
    if family == "gemma3":
        scale = float(raw.get("query_pre_attn_scalar") or head_dim) ** -0.5
        bias = bool(raw.get("attention_bias", False))
    else:
        scale = head_dim ** -0.5
        bias = bool(raw.get("attention_bias", model_type == "qwen2"))
    if raw.get("mlp_bias"):
        raise ConfigError("MLP biases are not supported by the mesh's forward")
    softcap = raw.get("final_logit_softcapping")
    return LmConfig(
        model_type=model_type, family=family, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), hidden_act=act, layer_types=types,
        rope_theta=_rope(raw, set(types)), sliding_window=int(window) if window else None,
        attention_scale=scale, attention_bias=bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", family == "gemma3")),
        final_logit_softcapping=float(softcap) if softcap else None, raw=dict(raw),
    )


def load_config(model_dir: Path) -> LmConfig:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); run `mesh setup`") from None
    return from_dict(raw)
