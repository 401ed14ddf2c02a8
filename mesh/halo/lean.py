"""A decode step (one new position) through a LLaMA-architecture model, without HF's forward.

The HALO coordinator runs the attention half of every layer itself, one token at a time, while
the workers wait for its next MLP input: the time it spends per layer is on every step's critical
path, and a good part of it is HF's per-forward and per-module Python (mask and cache-position
bookkeeping, module dispatch, the kernel-hub wrappers around each norm, three projections where
one will do, measured in results/); this step does the
same arithmetic in the same order with plain tensor calls: q, k and v come from one matrix whose
row blocks *are* the model's three projection weights (views, no copy), RMSNorm and the rotary
embedding are written out as in ``modeling_llama``, attention is ``scaled_dot_product_attention``
over the model's own cache, and every layer's MLP is called as the module it is (routed or not).
On one thread its logits are bitwise those of the HF forward (tests/halo/test_lean.py; the
coordinator runs one thread). Prefills stay on the HF forward.

:func:`lean_step` returns None for anything it does not cover (other architectures, attention
biases, a non-SDPA attention implementation, tensor-parallel pretraining slices, sliding windows);
the caller then keeps the HF forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _rms(x: Tensor, norm: nn.Module) -> Tensor:
    # LlamaRMSNorm.forward, operation for operation.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanStep:
    """``step(token_id, cache) -> logits (V,)``: one decode position through ``model``, appending
    its keys and values to ``cache`` (a transformers ``DynamicCache``)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.model = model
        self.layers = list(model.model.layers)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        attn0 = self.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.gqa = self.heads != self.kv_heads
        self.split = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        self.qkv: list[Tensor] = []
        for layer in self.layers:
            a = layer.self_attn
            fused = torch.cat([a.q_proj.weight.detach(), a.k_proj.weight.detach(), a.v_proj.weight.detach()])
            # The projections keep working (prefill, HF forward) on views of the fused matrix.
            q, k, v = fused.split(self.split)
            a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data = q, k, v
            self.qkv.append(fused)
        self._ids = torch.empty((1, 1), dtype=torch.long)
        self._pos = torch.empty((1, 1), dtype=torch.long)

    @torch.inference_mode()
    def __call__(self, token_id: int, cache: Any) -> Tensor:
        m = self.model.model
        position = cache.get_seq_length()
        self._ids[0, 0], self._pos[0, 0] = token_id, position
        h = m.embed_tokens(self._ids)  # (1, 1, H)
        cos, sin = m.rotary_emb(h, self._pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = F.linear(_rms(h, layer.input_layernorm), self.qkv[i]).split(self.split, dim=-1)
            q = q.view(1, 1, nq, d).transpose(1, 2)
            k = k.view(1, 1, nkv, d).transpose(1, 2)
            v = v.view(1, 1, nkv, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = cache.update(k, v, i)
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scaling, enable_gqa=self.gqa)
            h = h + F.linear(o.transpose(1, 2).reshape(1, 1, nq * d), a.o_proj.weight)
            h = h + layer.mlp(_rms(h, layer.post_attention_layernorm))
        return self.model.lm_head(m.norm(h))[0, -1]


def lean_step(model: nn.Module) -> LeanStep | None:
    """A :class:`LeanStep` for ``model``, or None where it would not be the HF forward's arithmetic."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        return None
    if (getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(cfg, "pretraining_tp", 1) != 1
            or getattr(cfg, "attention_bias", False) or getattr(cfg, "sliding_window", None)
            or getattr(getattr(model, "model", None), "layers", None) is None):
        return None
    for layer in model.model.layers:
        a = getattr(layer, "self_attn", None)
        projections = [getattr(a, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if a is None or any(p is None or getattr(p, "bias", None) is not None for p in projections):
            return None
    return LeanStep(model)
