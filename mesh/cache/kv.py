"""Between transformers 5 caches and KV chunks, and the KV wire codecs.

Chunk layout: :class:`ChunkKV` holds, for every decoder layer ``l``, ``keys[l]`` and
``values[l]`` of shape ``[H_kv, C, D]`` (batch 1 dropped): the states of absolute positions
``[i*C, (i+1)*C)`` for chunk ``i`` (0-based). Every layer stores the full chunk, sliding-window
layers included, so that any prefix can be restored, however long.

Gemma-3 sliding-window layers (``DynamicSlidingWindowLayer``) keep only the last ``W - 1`` states
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

Wire form of a chunk (CBOR-able; little-endian data; the batch dimension is not sent)::

    {"v": 1, "codec": "fp16" | "int8" | "fp32", "key": <16 B chunk key>, "model": <16 B model digest>,
     "layers": [{"k": T, "v": T}, ...],   # one per decoder layer
     "sum": xxh3_64(model || key || every data and scale buffer in order)}
    T = {"dtype": "float16" | "float32", "shape": [H, C, D], "data": bytes}       (fp16, fp32)
    T = {"dtype": "int8", "shape": [H, C, D], "data": bytes,
         "scale": {"dtype": "float32", "shape": [H, 1, D], "data": bytes}}         (int8)

(dtype names and the ``{dtype, shape, data}`` layout are those of ``mesh.wire.pack_tensor``.)

Wire form of a complete prompt's last logits (sent first, so an asker with a full match can emit
the first token before the KV arrives)::

    {"v": 1, "key": <16 B prompt key>, "model": <16 B model digest>, "n": vocab size,
     "ids": int32 LE token ids (the top k by logit, descending), "vals": float32 LE logits,
     "sum": xxh3_64(model || key || ids || vals)}

Only the top ``k`` logits travel (default 256 of Gemma's 262,144: 2 KB instead of 0.5-1 MB); the
receiver rebuilds a dense vector with ``-inf`` elsewhere. Greedy decoding takes the argmax, which
the top k hold exactly (fp32, not rounded), so the answer does not change; sampling would see a
truncated distribution (the mesh decodes greedily).

int8 is symmetric with one scale per (layer, tensor, head, head-dim channel) over the chunk's C
tokens: ``scale = max|x| / 127``, ``q = round(x / scale)``. ``sum`` binds the bytes to their key
and model key (it catches corruption and mislabelled chunks; it is not a signature).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from mesh.errors import ProtocolError

WIRE_VERSION = 1
CODECS = ("fp16", "int8", "fp32")
DEFAULT_CODEC = "fp16"
_NP = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
_DATA_DTYPE = {"fp16": "float16", "fp32": "float32", "int8": "int8"}


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


def wire_bytes_per_token(config: Any, codec: str = DEFAULT_CODEC, chunk_size: int = 16) -> float:
    """Wire payload bytes per token (data plus int8 scales amortised over the chunk)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    item = {"fp16": 2, "fp32": 4, "int8": 1}[codec]
    total = 0.0
    for heads, dim in kv_layout(config):
        per_tensor = heads * dim * item + (heads * dim * 4 / chunk_size if codec == "int8" else 0)
        total += 2 * per_tensor
    return total


# -- caches <-> chunks ---------------------------------------------------------------------------


def capture_cache(config: Any) -> DynamicCache:
    """An empty cache whose sliding layers keep every state until :func:`end_capture`."""
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.activate_past_recording()
    return cache


def end_capture(cache: DynamicCache) -> None:
    """Trim sliding layers back to their window and stop recording (before decoding)."""
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.record_past:
            if layer.is_initialized:
                layer.crop(0)
            layer.record_past = False


def _held_span(layer: Any) -> tuple[int, int]:
    """Absolute positions ``[first, end)`` whose states ``layer.keys`` holds."""
    if not isinstance(layer, DynamicLayer):
        raise ValueError(f"unsupported cache layer {type(layer).__name__}")
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return 0, 0
    held = int(layer.keys.shape[-2])
    end = int(layer.get_seq_length())  # cumulative_length on sliding layers
    return end - held, end


def cut_chunks(cache: DynamicCache, first: int, count: int, chunk_size: int) -> list[ChunkKV]:
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


def cut_span(cache: DynamicCache, start: int, stop: int) -> ChunkKV:
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
) -> DynamicCache:
    """A ``DynamicCache`` holding the prefix made of ``chunks`` (in order); see module docstring.

    Prefilling only the suffix tokens with it gives the same logits as a full prefill. ``dtype``
    converts the states (e.g. chunks kept as fp16 in memory, restored for an fp32 model).
    """
    cache = capture_cache(config) if capture else DynamicCache(config=config)
    if not chunks:
        return cache
    n_layers = len(cache.layers)
    if any(len(c.keys) != n_layers or len(c.values) != n_layers for c in chunks):
        raise ValueError(f"chunks do not have {n_layers} layers")
    prefix = sum(c.length for c in chunks)
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, DynamicLayer):
            raise ValueError(f"unsupported cache layer {type(layer).__name__}")
        sliding = isinstance(layer, DynamicSlidingWindowLayer)
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


# -- wire codecs ---------------------------------------------------------------------------------


def _tensor(arr: np.ndarray, dtype: str) -> dict[str, Any]:
    data = arr.astype(_NP[dtype], copy=False).tobytes()
    return {"dtype": dtype, "shape": list(arr.shape), "data": data}


def _encode_tensor(t: torch.Tensor, codec: str) -> dict[str, Any]:
    x = t.detach().to(torch.float32).contiguous()  # [H, C, D]
    if codec == "fp16":
        return _tensor(x.to(torch.float16).numpy(), "float16")
    if codec == "fp32":
        return _tensor(x.numpy(), "float32")
    if x.shape[1] == 0:  # an empty tail (a prompt of whole chunks): nothing to scale
        scale = torch.zeros((x.shape[0], 1, x.shape[2]), dtype=torch.float32)
    else:
        scale = x.abs().amax(dim=1, keepdim=True) / 127.0  # [H, 1, D]: per head, per channel
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp(-127, 127).to(torch.int8)
    out = _tensor(q.numpy(), "int8")
    out["scale"] = _tensor(scale.numpy(), "float32")
    return out


def encode_chunk(
    chunk: ChunkKV, codec: str = DEFAULT_CODEC, key: bytes = b"", model: bytes = b""
) -> dict[str, Any]:
    """A chunk in its wire form (module docstring); ``key``/``model`` are bound by ``sum``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    layers = [
        {"k": _encode_tensor(k, codec), "v": _encode_tensor(v, codec)}
        for k, v in zip(chunk.keys, chunk.values)
    ]
    return {
        "v": WIRE_VERSION,
        "codec": codec,
        "key": bytes(key),
        "model": bytes(model),
        "layers": layers,
        "sum": _checksum(bytes(model), bytes(key), layers),
    }


def _checksum(model: bytes, key: bytes, layers: Sequence[Mapping[str, Any]]) -> int:
    h = xxhash.xxh3_64(model)
    h.update(key)
    for layer in layers:
        for name in ("k", "v"):
            t = layer[name]
            h.update(t["data"])
            if "scale" in t:
                h.update(t["scale"]["data"])
    return h.intdigest()


def _decode_array(t: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(t, Mapping) or t.get("dtype") != dtype:
        raise ProtocolError("bad-chunk", f"tensor dtype must be {dtype}")
    got = t.get("shape")
    if not isinstance(got, list | tuple) or tuple(got) != shape:
        raise ProtocolError("bad-chunk", f"shape {got!r}, expected {list(shape)}")
    data = t.get("data")
    want = int(np.prod(shape)) * _NP[dtype].itemsize
    if not isinstance(data, bytes | bytearray) or len(data) != want:
        got_len = len(data) if isinstance(data, bytes | bytearray) else "?"
        raise ProtocolError("bad-chunk", f"data size {got_len} != {want}")
    arr = np.frombuffer(data, dtype=_NP[dtype]).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ProtocolError("bad-chunk", "non-finite values")
    return arr


def decode_chunk(
    data: Any,
    layout: Sequence[tuple[int, int]],
    chunk_size: int,
    key: bytes | None = None,
    model: bytes | None = None,
    dtype: torch.dtype = torch.float32,
) -> ChunkKV:
    """Parse and validate a wire chunk against the expected ``layout`` (:func:`kv_layout`),
    chunk size, key and model digest; raises ProtocolError on any mismatch."""
    if not isinstance(data, Mapping):
        raise ProtocolError("bad-chunk", "not a map")
    if data.get("v") != WIRE_VERSION:
        raise ProtocolError("bad-version", f"chunk version {data.get('v')!r}")
    codec = data.get("codec")
    if codec not in CODECS:
        raise ProtocolError("bad-chunk", f"codec {codec!r}")
    got_key, got_model, layers = data.get("key"), data.get("model"), data.get("layers")
    if not isinstance(got_key, bytes) or not isinstance(got_model, bytes):
        raise ProtocolError("bad-chunk", "key and model must be bytes")
    if key is not None and got_key != bytes(key):
        raise ProtocolError("wrong-key", got_key.hex())
    if model is not None and got_model != bytes(model):
        raise ProtocolError("wrong-model", got_model.hex())
    if not isinstance(layers, list) or len(layers) != len(layout):
        raise ProtocolError("bad-chunk", f"expected {len(layout)} layers")
    keys, values = [], []
    for (heads, dim), layer in zip(layout, layers):
        if not isinstance(layer, Mapping):
            raise ProtocolError("bad-chunk", "layer is not a map")
        for name, sink in (("k", keys), ("v", values)):
            t = layer.get(name)
            arr = _decode_array(t, _DATA_DTYPE[codec], (heads, chunk_size, dim)).astype(np.float32)
            if codec == "int8":
                scale = _decode_array(t.get("scale"), "float32", (heads, 1, dim))
                if (scale < 0).any():
                    raise ProtocolError("bad-chunk", "negative scale")
                arr = arr * scale
            sink.append(torch.from_numpy(arr).to(dtype))
    if data.get("sum") != _checksum(got_model, got_key, layers):
        raise ProtocolError("bad-checksum", got_key.hex())
    return pack(keys, values)  # it may go into the store: one buffer (see pack)


# -- last logits -------------------------------------------------------------------------------

LOGITS_TOP_K = 256


def _logits_sum(model: bytes, key: bytes, ids: bytes, vals: bytes) -> int:
    h = xxhash.xxh3_64(model)
    for part in (key, ids, vals):
        h.update(part)
    return h.intdigest()


def encode_logits(logits: torch.Tensor, key: bytes = b"", model: bytes = b"",
                  top_k: int = LOGITS_TOP_K) -> dict[str, Any]:
    """The top ``top_k`` of a 1-D logits vector in wire form (module docstring)."""
    x = logits.detach().to(torch.float32).reshape(-1)
    finite = torch.isfinite(x)
    k = min(top_k, int(finite.sum()))
    vals, ids = torch.topk(torch.where(finite, x, torch.full_like(x, -torch.inf)), k)
    ids_b = ids.to(torch.int32).numpy().astype("<i4").tobytes()
    vals_b = vals.numpy().astype("<f4").tobytes()
    return {"v": WIRE_VERSION, "key": bytes(key), "model": bytes(model), "n": int(x.numel()),
            "ids": ids_b, "vals": vals_b, "sum": _logits_sum(bytes(model), bytes(key), ids_b, vals_b)}


def decode_logits(data: Any, vocab: int, key: bytes | None = None, model: bytes | None = None) -> torch.Tensor:
    """A dense float32 ``[vocab]`` vector from :func:`encode_logits` output (``-inf`` outside the
    top k); raises ProtocolError on any mismatch (key, model, size, ids, values, checksum)."""
    if not isinstance(data, Mapping) or data.get("v") != WIRE_VERSION:
        raise ProtocolError("bad-logits", "not a version-1 map")
    got_key, got_model, ids_b, vals_b = data.get("key"), data.get("model"), data.get("ids"), data.get("vals")
    if not all(isinstance(b, bytes) for b in (got_key, got_model, ids_b, vals_b)):
        raise ProtocolError("bad-logits", "key, model, ids and vals must be bytes")
    if key is not None and got_key != bytes(key):
        raise ProtocolError("wrong-key", got_key.hex())
    if model is not None and got_model != bytes(model):
        raise ProtocolError("wrong-model", got_model.hex())
    if data.get("n") != vocab or len(ids_b) != len(vals_b) or len(ids_b) % 4 or not ids_b or len(ids_b) > 4 * vocab:
        raise ProtocolError("bad-logits", "size")
    ids = np.frombuffer(ids_b, dtype="<i4")
    vals = np.frombuffer(vals_b, dtype="<f4")
    if (ids < 0).any() or (ids >= vocab).any() or len(np.unique(ids)) != len(ids) or not np.isfinite(vals).all():
        raise ProtocolError("bad-logits", "ids out of range, repeated, or values not finite")
    if data.get("sum") != _logits_sum(got_model, got_key, ids_b, vals_b):
        raise ProtocolError("bad-checksum", got_key.hex())
    out = torch.full((vocab,), -torch.inf, dtype=torch.float32)
    out[torch.from_numpy(ids.astype(np.int64))] = torch.from_numpy(vals.astype(np.float32))
    return out
