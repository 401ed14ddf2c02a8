"""Between KV caches and KV chunks (the wire form is mesh.cache.codec's).

The cache is a node's (or HALO coordinator's) :class:`mesh.lm.cache.KVCache` (its config a
:class:`mesh.lm.config.LmConfig`) or, in the tests that compare with transformers' classes, a
transformers 5 ``DynamicCache``: both have the same layer attributes (``keys``, ``values``, ``is_sliding``,
``sliding_window``, ``cumulative_length``, ``record_past``, ``update``, ``crop``), so one code path
serves both, and the kind of ``config`` decides which cache is built.

Chunk layout: :class:`ChunkKV` holds, for every decoder layer ``l``, ``keys[l]`` and
``values[l]`` of shape ``[H_kv, C, D]`` (batch 1 dropped): the states of absolute positions
``[i*C, (i+1)*C)`` for chunk ``i`` (0-based). Every layer stores the full chunk, sliding-window
layers included, so that any prefix can be restored, however long.

Gemma-3 sliding-window layers keep only the last ``W - 1`` states
after each forward. Two consequences, both handled here:

1. *Capture*: during the prefill whose KV is cut into chunks, sliding layers must keep everything.
   :func:`capture_cache` returns a ``DynamicCache`` whose sliding layers have
   ``activate_past_recording()`` on: their ``update`` keeps all states (attention still only sees
   the window, via the mask). Cut the chunks with :func:`cut_chunks`, then call
   :func:`end_capture` to trim them back to the window before decoding. (A config-less
   ``DynamicCache()`` also keeps everything, as plain layers, and gives the same logits, but then
   decoding never trims the sliding layers.)
2. *Restore*: :func:`restore_cache` fills a config-built ``DynamicCache`` with the concatenated
   prefix; a sliding layer keeps the last ``W - 1`` states and its ``cumulative_length`` is set to
   the prefix length ``P``, which is what positions and the sliding mask are derived from. (A
   layer restored from only its trimmed ``W - 1`` states would believe the prefix is ``W - 1``
   tokens long: wrong positions. That is the pitfall in DESIGN.md.) ``capture=True`` restores
   with past recording on, so chunks computed after the prefix can be cut from the same cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mesh.lm.cache import KVCache
from mesh.lm.config import LmConfig


@dataclass(frozen=True)
class ChunkKV:
    """One chunk's K/V for every layer: ``keys[l]``, ``values[l]`` are ``[H_kv, C, D]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        """Tokens in the chunk (C)."""
        return int(self.keys[0].shape[1])

    @property
    def nbytes(self) -> int:
        """In-memory size of all tensors (what the store budgets)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, dtype: torch.dtype) -> ChunkKV:
        """The same chunk in another dtype (fp16 halves a store's memory; restore converts back)."""
        return pack([k.to(dtype) for k in self.keys], [v.to(dtype) for v in self.values])


def pack(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> ChunkKV:
    """A chunk whose tensors are copies in views of one buffer (all tensors must share a dtype).

    Why one buffer: a node's store holds thousands of chunks and replaces them as it evicts. As
    2 x layers separate tensors (16 KiB each for Gemma-3 270M) they lived in the malloc heap among
    short-lived allocations, and every eviction left holes that later chunks did not fit: the
    heap, and RSS, kept growing with the cache full (``mesh bench load``). One allocation of the
    whole chunk (576 KiB) is above glibc's mmap threshold (fixed by ``nodes.memory``): it gets
    its own mapping, which goes back to the kernel whole when the chunk is evicted.
    """
    parts = [*keys, *values]
    if len({t.dtype for t in parts}) > 1:
        raise ValueError("a chunk's tensors must share one dtype")
    flat = torch.empty(sum(t.numel() for t in parts), dtype=parts[0].dtype if parts else torch.float32)
    out, at = [], 0
    for t in parts:
        view = flat[at:at + t.numel()].view(t.shape)
        view.copy_(t)
        out.append(view)
        at += t.numel()
    return ChunkKV(keys=tuple(out[:len(keys)]), values=tuple(out[len(keys):]))


def kv_layout(config: Any) -> list[tuple[int, int]]:
    """``(H_kv, D)`` per decoder layer of a (text) model config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return [(heads, head_dim)] * cfg.num_hidden_layers


# -- caches <-> chunks ---------------------------------------------------------------------------


def new_cache(config: Any) -> Any:
    """An empty cache for a model of ``config``: :class:`KVCache` for :mod:`mesh.lm`, else
    transformers' ``DynamicCache``."""
    if isinstance(config, LmConfig):
        return KVCache(config)
    from transformers import DynamicCache

    return DynamicCache(config=config)


def _sliding(layer: Any) -> bool:
    return bool(getattr(layer, "is_sliding", False))


def capture_cache(config: Any) -> Any:
    """An empty cache whose sliding layers keep every state until :func:`end_capture`."""
    cache = new_cache(config)
    for layer in cache.layers:
        if _sliding(layer):
            layer.activate_past_recording()
    return cache


def end_capture(cache: Any) -> None:
    """Trim sliding layers back to their window and stop recording (before decoding)."""
    for layer in cache.layers:
        if _sliding(layer) and layer.record_past:
            if layer.is_initialized:
                layer.crop(0)
            layer.record_past = False


def _held_span(layer: Any) -> tuple[int, int]:
    """Absolute positions ``[first, end)`` whose states ``layer.keys`` holds."""
    if not hasattr(layer, "keys") or not hasattr(layer, "get_seq_length"):
        raise ValueError(f"unsupported cache layer {type(layer).__name__}")
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return 0, 0
    held = int(layer.keys.shape[-2])
    end = int(layer.get_seq_length())  # cumulative_length on sliding layers
    return end - held, end


def cut_chunks(cache: Any, first: int, count: int, chunk_size: int) -> list[ChunkKV]:
    """Chunks ``first .. first+count-1`` (positions ``[first*C, (first+count)*C)``), cloned.

    Raises ValueError when a layer no longer holds those positions (a sliding layer that was not
    capturing: use :func:`capture_cache` or ``restore_cache(..., capture=True)``).
    """
    if count <= 0:
        return []
    start, stop = first * chunk_size, (first + count) * chunk_size
    per_layer = []
    for idx, layer in enumerate(cache.layers):
        lo, hi = _held_span(layer)
        if start < lo or stop > hi:
            raise ValueError(
                f"layer {idx} holds positions [{lo}, {hi}), chunks need [{start}, {stop}); "
                "sliding layers must capture (capture_cache / restore_cache(capture=True))"
            )
        if layer.keys.shape[0] != 1:
            raise ValueError("only batch size 1 is supported")
        span = slice(start - lo, stop - lo)
        per_layer.append((layer.keys[0, :, span], layer.values[0, :, span]))  # [H, S, D] views
    out = []
    for i in range(count):
        a, b = i * chunk_size, (i + 1) * chunk_size
        # copied (pack): a view would keep the whole cache tensor alive inside the store
        out.append(pack([k[:, a:b] for k, _ in per_layer], [v[:, a:b] for _, v in per_layer]))
    return out


def cut_span(cache: Any, start: int, stop: int) -> ChunkKV:
    """Positions ``[start, stop)`` of every layer as one (possibly partial, possibly empty) chunk,
    cloned: the tail after a prompt's last full chunk, kept for full hits."""
    if not 0 <= start <= stop:
        raise ValueError("bad span")
    keys, values = [], []
    for idx, layer in enumerate(cache.layers):
        lo, hi = _held_span(layer)
        if start < lo or stop > hi:
            if start == stop:  # an empty span of a layer that holds nothing yet
                lo = hi = start
            else:
                raise ValueError(f"layer {idx} holds positions [{lo}, {hi}), span needs [{start}, {stop})")
        if start == stop:
            heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
            empty = layer.keys.new_empty((heads, 0, dim))
            keys.append(empty)
            values.append(empty.clone())
            continue
        keys.append(layer.keys[0, :, start - lo:stop - lo])
        values.append(layer.values[0, :, start - lo:stop - lo])
    return pack(keys, values)


def restore_cache(
    config: Any,
    chunks: Sequence[ChunkKV],
    capture: bool = False,
    dtype: torch.dtype | None = None,
) -> Any:
    """A cache (:func:`new_cache`) holding the prefix made of ``chunks`` (in order); see module docstring.

    Prefilling only the suffix tokens with it gives the same logits as a full prefill. ``dtype``
    converts the states (e.g. chunks kept as fp16 in memory, restored for an fp32 model).
    """
    cache = capture_cache(config) if capture else new_cache(config)
    if not chunks:
        return cache
    n_layers = len(cache.layers)
    if any(len(c.keys) != n_layers or len(c.values) != n_layers for c in chunks):
        raise ValueError(f"chunks do not have {n_layers} layers")
    prefix = sum(c.length for c in chunks)
    for idx, layer in enumerate(cache.layers):
        if not hasattr(layer, "update"):
            raise ValueError(f"unsupported cache layer {type(layer).__name__}")
        sliding = _sliding(layer)
        parts = list(chunks)
        if sliding and not capture:
            # only the chunks that overlap the last W-1 positions are needed
            need, taken = layer.sliding_window - 1, 0
            tail = []
            for c in reversed(parts):
                if taken >= need:
                    break
                tail.append(c)
                taken += c.length
            parts = tail[::-1]
        k = torch.cat([c.keys[idx] for c in parts], dim=1).unsqueeze(0)  # [1, H, S, D]
        v = torch.cat([c.values[idx] for c in parts], dim=1).unsqueeze(0)
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        layer.update(k, v)
        if sliding:
            # positions and the sliding mask derive from cumulative_length: it must be the whole
            # prefix, not the number of states passed in
            layer.cumulative_length = prefix
    return cache
