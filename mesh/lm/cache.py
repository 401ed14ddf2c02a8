"""The KV cache :mod:`mesh.lm.model` decodes with: one growable buffer per layer.

States are stored in the cache's dtype: float16 on a node (half the memory of one ask's context
and of the prompt cache's chunks, the same rounding the fp16 wire codec applies, as llama.cpp's
default f16 cache), float32 where a test compares with transformers bit for bit. The forward
attends over the stored states (converted back to float32), so a recompute and a restored prefix
see the same numbers.

A layer's states live in a preallocated ``(1, H_kv, capacity, D)`` buffer and the layer shows a
view of the positions it holds, so a decode step writes one position in place instead of copying
the whole cache (``torch.cat`` per token, as a list of growing tensors does). The buffer grows by
a quarter (never doubling: on a Pi the cache's slack is memory a node does not have).

A sliding-window layer (Gemma-3's local layers) needs only the last ``W - 1`` states once a forward
is done: it keeps those, and ``cumulative_length`` still counts every position seen, which is what
positions derive from. While *recording* (``record_past``: the prompt cache cuts chunks out of a
prefill) it keeps everything until :meth:`KVLayer.crop` trims it back.

The attribute names are those of transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``
(``keys``, ``values``, ``is_sliding``, ``sliding_window``, ``cumulative_length``, ``record_past``,
``update``, ``crop``), so :mod:`mesh.cache.kv` cuts and restores either kind with one code path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_MIN_GROW = 64  # positions


class KVLayer:
    def __init__(self, sliding_window: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.sliding_window = sliding_window
        self.dtype = dtype
        self.is_sliding = sliding_window is not None
        self.record_past = False
        self.cumulative_length = 0  # positions seen (the last one held is cumulative_length - 1)
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._start = 0  # buffer index of the first held position
        self._end = 0

    @property
    def is_initialized(self) -> bool:
        return self._k is not None

    @property
    def held(self) -> int:
        return self._end - self._start

    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, self._start:self._end]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, self._start:self._end]

    def first_position(self) -> int:
        """Absolute position of the first state held."""
        return self.cumulative_length - self.held

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _room(self, k: Tensor, extra: int) -> None:
        """Make the buffer hold ``extra`` more positions after the held ones."""
        if self._k is None:
            b, h, _, d = k.shape
            cap = max(extra, _MIN_GROW)
            self._k = k.new_empty((b, h, cap, d), dtype=self.dtype)
            self._v = k.new_empty((b, h, cap, d), dtype=self.dtype)
            self._start = self._end = 0
            return
        assert self._v is not None
        held, cap = self.held, self._k.shape[2]
        if self._end + extra <= cap:
            return
        need = held + extra
        if need <= cap and held <= cap // 2:  # slide the held states to the front, in place
            src = slice(self._start, self._end)
            self._k[:, :, :held] = self._k[:, :, src].clone()
            self._v[:, :, :held] = self._v[:, :, src].clone()
        else:
            new_cap = max(need, cap + cap // 4, _MIN_GROW)
            k_new = self._k.new_empty((*self._k.shape[:2], new_cap, self._k.shape[3]))
            v_new = self._v.new_empty(k_new.shape)
            k_new[:, :, :held] = self._k[:, :, self._start:self._end]
            v_new[:, :, :held] = self._v[:, :, self._start:self._end]
            self._k, self._v = k_new, v_new
        self._start, self._end = 0, held

    def update(self, key_states: Tensor, value_states: Tensor, *_: Any, **__: Any) -> tuple[Tensor, Tensor]:
        """Append ``(1, H, T, D)`` states (converted to the cache's dtype); return every stored
        state the new positions may attend to (held + new), before a sliding layer forgets what
        falls out of its window."""
        t = key_states.shape[-2]
        self._room(key_states, t)
        assert self._k is not None and self._v is not None
        self._k[:, :, self._end:self._end + t] = key_states
        self._v[:, :, self._end:self._end + t] = value_states
        self._end += t
        self.cumulative_length += t
        k, v = self.keys, self.values
        assert k is not None and v is not None
        if self.is_sliding and not self.record_past:
            self._trim()
        return k, v

    def _trim(self) -> None:
        assert self.sliding_window is not None
        keep = self.sliding_window - 1
        if self.held > keep:
            self._start = self._end - keep

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(0)``: a sliding layer forgets what is outside its window (as transformers')."""
        if tokens_to_remove:
            raise ValueError("only crop(0) is supported")
        if self.is_sliding:
            self._trim()

    def activate_past_recording(self) -> None:
        self.record_past = True

    def nbytes(self) -> int:
        """Bytes of the buffers (held states and their slack)."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)


class KVCache:
    """One :class:`KVLayer` per decoder layer, windows as the config says."""

    def __init__(self, config: Any) -> None:
        dtype = getattr(torch, getattr(config, "kv_dtype", "float32"))
        self.layers = [KVLayer(config.window(i), dtype) for i in range(config.num_hidden_layers)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].cumulative_length if self.layers else 0

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *_: Any, **__: Any) -> tuple[Tensor, Tensor]:
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
