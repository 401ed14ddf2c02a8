"""The decoder forward a node runs: LLaMA (and Qwen2) and Gemma-3, in plain torch, no transformers.

transformers' model classes cost a node ~90 MiB of resident memory before the first weight
(measured, ``mesh bench memory``) and most of a decode step's time goes to their per-module Python.
This is the same arithmetic in the same order as ``modeling_llama`` / ``modeling_gemma3``
(tests/lm/test_model.py checks logits and greedy tokens against them), over modules whose names
are transformers' (``model.layers.3.self_attn.q_proj``...), so a weight file and the code that
reads a model by name (HALO's group extraction, :mod:`mesh.weights.load`) take either.

- Prefill and decode are one :meth:`CausalLM.forward` (``T`` new positions after what the cache
  holds); :meth:`CausalLM.step` is the one-token call a decode loop makes.
- Attention is ``scaled_dot_product_attention`` with the causal or sliding-window pattern made
  explicit only where it is needed (a prefill after a restored prefix, or longer than the window).
- A projection is ``nn.Linear`` (fp32) or :class:`mesh.weights.modules.Int8Linear`; the
  embedding ``nn.Embedding`` or ``Int8Embedding``. A Gemma-3 embedding is scaled by sqrt(hidden).
- ``stop`` (a callable) is asked before every decoder layer of a forward; when it says so the
  forward ends with :class:`Interrupted` (the cache then holds a partial state: discard it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mesh.lm.cache import KVCache
from mesh.budget import PREFILL_CHUNK
from mesh.lm.config import LmConfig
from mesh.weights.modules import in_decoding


# The MLP activations the supported families use, by their config names (transformers' ACT2FN
# entries compute the same: F.silu and the tanh GELU).
ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class Interrupted(Exception):
    """A forward ended between two decoder layers because its ``stop`` callback said so."""


def _proj(module: nn.Module, x: Tensor) -> Tensor:
    if type(module) is nn.Linear:  # skip the module call: most of a small matmul's overhead
        return F.linear(x, module.weight, module.bias)
    return module.forward(x)  # likewise: this model's modules carry no hooks (a decode step makes ~150 calls)


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` (LLaMA) or ``* (1 + w)`` (Gemma-3), in float32 as both define it."""

    def __init__(self, size: int, eps: float, plus_one: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps, self.plus_one = eps, plus_one
        self.mult: Tensor | None = None  # w or 1 + w, made once the weight is loaded

    def prepare(self) -> None:
        w = self.weight.detach()
        self.mult = 1.0 + w.float() if self.plus_one else w

    def forward(self, x: Tensor) -> Tensor:
        assert self.mult is not None
        # one call for the five operations below (the same numbers, bit for bit: tests/lm): a
        # decode step runs 61 (SmolLM2) of these on one row, where each call's overhead is the cost
        # h = x.float(); h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); h * mult
        return F.rms_norm(x.float(), (x.shape[-1],), self.mult, self.eps)


class ScaledEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows are multiplied by ``embed_scale`` (Gemma-3: sqrt(hidden))."""

    embed_scale: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight)
        return rows if self.embed_scale is None else rows * self.embed_scale


class MLP(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act = ACT_FNS[cfg.hidden_act]
        self.gate_up: Any = None  # gate and up as one packed product at decode (mesh.weights.packed)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None and x.numel() == x.shape[-1] and in_decoding():
            gate, up = self.gate_up(x.reshape(1, -1))
            return _proj(self.down_proj, (self.act(gate) * up).view(*x.shape[:-1], -1))
        return _proj(self.down_proj, self.act(_proj(self.gate_proj, x)) * _proj(self.up_proj, x))


class Attention(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        self.qkv: Any = None  # q, k and v as one packed product at decode (mesh.weights.packed)
        if cfg.family == "gemma3":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, True)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, True)
            self.qk_mult: Tensor | None = None  # (heads + kv heads, 1, D): the two norms' multipliers


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        gemma = cfg.family == "gemma3"
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True)


class TextModel(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        # given its (uninitialised) weight: nn.Embedding's own init on the meta device imports
        # torch's Python meta kernels, ~800 modules and 71 MiB resident a node never uses
        self.embed_tokens: nn.Module = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                       _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family == "gemma3")


def _rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` as transformers computes it, in fewer operations:
    rotate_half(x) = (-x2, x1) and x.roll(half) = (x2, x1), so with the first half of ``sin``
    negated (``sin_signed``) the products are the same numbers (a sign flip is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class CausalLM(nn.Module):
    """A decoder-only LM. Build it on the meta device, attach weights (:mod:`mesh.weights.load`),
    then call :meth:`prepare` once."""

    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head: nn.Module = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict[str, Tensor] = {}
        self._gemma = cfg.family == "gemma3"

    # -- the names transformers' code and ours look a model up by
    def get_decoder(self) -> TextModel:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Module) -> None:
        """Another LM head module (HALO's coordinator: its head on two threads, mesh.halo.head)."""
        self.lm_head = head

    def tied_names(self) -> dict[str, str]:
        """Parameters a weight file may leave out because they are another's (a tied LM head)."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def prepare(self) -> CausalLM:
        """Derived tensors, made once the weights are attached (norm multipliers, rotary
        frequencies, the embedding scale)."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.prepare()
        d = cfg.head_dim
        for kind, theta in cfg.rope_theta.items():
            self._inv_freq[kind] = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if self._gemma:
            for layer in self.model.layers:  # q's and k's norm multipliers, one row per head
                a = layer.self_attn
                a.qk_mult = torch.cat((a.q_norm.mult.expand(cfg.num_attention_heads, 1, d),
                                       a.k_norm.mult.expand(cfg.num_key_value_heads, 1, d)))
            scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32)
            embed = self.model.embed_tokens
            if isinstance(embed, ScaledEmbedding):
                embed.embed_scale = scale
            elif getattr(embed, "embed_scale", None) is None:
                embed.embed_scale = scale
        self.eval()
        return self

    def new_cache(self, record: bool = False) -> KVCache:
        cache = KVCache(self.config)
        if record:
            for layer in cache.layers:
                if layer.is_sliding:
                    layer.activate_past_recording()
        return cache

    def _rotary(self, start: int, count: int) -> dict[str, tuple[Tensor, Tensor]]:
        pos = torch.arange(start, start + count, dtype=torch.float32)
        out = {}
        for kind, inv in self._inv_freq.items():
            freqs = pos[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            sin[:, :sin.shape[1] // 2].neg_()  # for _rope
            out[kind] = (emb.cos()[None, None], sin[None, None])  # (1, 1, T, D)
        return out

    @torch.inference_mode()
    def forward(self, ids: Sequence[int] | Tensor, cache: KVCache, logits_to_keep: int = 1,
                stop: Callable[[], bool] | None = None) -> Tensor:
        """Logits ``(logits_to_keep, V)`` of the last positions after feeding ``ids`` onto
        ``cache`` (appended to it). A prompt longer than :data:`PREFILL_CHUNK` goes through in
        chunks of that many positions, so a prefill's activations and attention scores are bounded
        by the chunk, not the prompt (each chunk attends to the cache, as after a restored prefix)."""
        ids_t = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
        ids_t = ids_t.reshape(-1)
        t = int(ids_t.shape[0])
        keep_from = t - min(logits_to_keep, t)  # the first position whose logits are returned
        out = []
        for at in range(0, t, PREFILL_CHUNK):
            h = self._layers(ids_t[at:at + PREFILL_CHUNK], cache, stop)
            lo = max(keep_from - at, 0)
            if lo < h.shape[1]:
                out.append(self._logits(h[:, lo:]))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _logits(self, h: Tensor) -> Tensor:
        logits = _proj(self.lm_head, self.model.norm(h))[0]
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _layers(self, ids_t: Tensor, cache: KVCache, stop: Callable[[], bool] | None) -> Tensor:
        """The last hidden states ``(1, T, H)`` of ``ids_t`` (T positions) appended to ``cache``."""
        cfg = self.config
        ids_t = ids_t.reshape(1, -1)
        t = int(ids_t.shape[1])
        start = cache.get_seq_length()
        h = self.model.embed_tokens(ids_t)  # (1, T, H)
        rope = self._rotary(start, t)
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        gqa = nq != nkv
        masks: dict[tuple[int, int, int | None], Tensor] = {}  # one per (first key, keys, window)
        for i, layer in enumerate(self.model.layers):
            if stop is not None and stop():
                raise Interrupted("the forward was asked to stop")
            a = layer.self_attn
            x = layer.input_layernorm.forward(h)
            cos, sin = rope[cfg.layer_types[i]]
            if t == 1 and a.qkv is not None and in_decoding():
                # q and k side by side in the fused product: one rotation for both heads' rows
                # (Gemma-3: one norm too, each row times its head's multiplier after, the numbers
                # of the norm with the multiplier inside, bit for bit: tests/lm)
                y = a.qkv.whole(x.view(1, -1))
                qk = y[:, :(nq + nkv) * d].view(1, nq + nkv, 1, d)
                if self._gemma and a.qk_mult is not None:
                    qk = F.rms_norm(qk, (d,), None, a.q_norm.eps).mul_(a.qk_mult)
                elif self._gemma:  # each norm with its own multiplier (what the one above equals)
                    qk = torch.cat((a.q_norm.forward(qk[:, :nq]), a.k_norm.forward(qk[:, nq:])), dim=1)
                qk = _rope(qk, cos, sin)
                q, k, v = qk[:, :nq], qk[:, nq:], y[:, (nq + nkv) * d:].view(1, nkv, 1, d)
            else:
                if t == 1:  # (1, H, 1, D) is (1, 1, H, D) transposed: a view
                    if a.qkv is not None and in_decoding():
                        qf, kf, vf = a.qkv(x.view(1, -1))
                    else:
                        qf, kf, vf = _proj(a.q_proj, x), _proj(a.k_proj, x), _proj(a.v_proj, x)
                    q, k, v = qf.view(1, nq, 1, d), kf.view(1, nkv, 1, d), vf.view(1, nkv, 1, d)
                else:
                    q = _proj(a.q_proj, x).view(1, t, nq, d).transpose(1, 2)
                    k = _proj(a.k_proj, x).view(1, t, nkv, d).transpose(1, 2)
                    v = _proj(a.v_proj, x).view(1, t, nkv, d).transpose(1, 2)
                if self._gemma:
                    q, k = a.q_norm.forward(q), a.k_norm.forward(k)
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kv = cache.layers[i]
            keys, values = kv.update(k, v)
            window = kv.sliding_window
            first = start + t - int(keys.shape[2])  # absolute position of keys[..., 0, :]
            mask, causal = None, False
            if t == 1:
                if window is not None and keys.shape[2] > window:  # a recording layer holds more
                    keys, values = keys[:, :, -window:], values[:, :, -window:]
            elif first == start and (window is None or t <= window):
                causal = True  # the keys are exactly the new positions
            else:
                shape = (first, int(keys.shape[2]), window)
                if shape not in masks:
                    masks[shape] = _mask(start, t, *shape)
                mask = masks[shape]
            if keys.dtype != q.dtype:  # float16 storage: attend in float32
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                               scale=cfg.attention_scale, enable_gqa=gqa)
            o = _proj(a.o_proj, o.reshape(1, 1, nq * d) if t == 1 else o.transpose(1, 2).reshape(1, t, nq * d))
            if self._gemma:
                h = h + layer.post_attention_layernorm.forward(o)
                h = h + layer.post_feedforward_layernorm.forward(
                    layer.mlp.forward(layer.pre_feedforward_layernorm.forward(h)))
            else:
                h = h + o
                h = h + layer.mlp.forward(layer.post_attention_layernorm.forward(h))
        return h

    def step(self, token_id: int, cache: KVCache) -> Tensor:
        """Logits (V,) of the position after ``token_id`` (appended to ``cache``), with the
        decode kernel of a quantised format (:func:`mesh.weights.modules.decoding`)."""
        from mesh.weights.modules import decoding

        with decoding():
            return self.forward(torch.tensor([token_id], dtype=torch.long), cache)[-1]


def _mask(start: int, count: int, first: int, keys: int, window: int | None) -> Tensor:
    """Which keys (absolute positions ``first..``) each new position (``start..``) may see."""
    p = torch.arange(start, start + count)[:, None]
    j = torch.arange(first, first + keys)[None, :]
    allowed = j <= p
    if window is not None:
        allowed &= j > p - window
    return allowed


def is_mesh_lm(model: Any) -> bool:
    return isinstance(model, CausalLM)
