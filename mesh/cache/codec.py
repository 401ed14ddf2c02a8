"""The KV wire codecs: a chunk and a prompt's last logits in CBOR-able form (what peers
exchange), and a node's own cache records on disk (fp32, so a restarted node answers
bit-identically). Chunk layout: ``mesh.cache.kv``.

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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cbor2
import numpy as np
import torch
import xxhash

from mesh import cbor_bounds, wire
from mesh.cache.kv import ChunkKV, kv_layout, pack
from mesh.errors import ProtocolError

WIRE_VERSION = 1
CODECS = ("fp16", "int8", "fp32")
DEFAULT_CODEC = "fp16"
_NP = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
_DATA_DTYPE = {"fp16": "float16", "fp32": "float32", "int8": "int8"}


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


def wire_buffers(layers: Sequence[Mapping[str, Any]]) -> Iterator[bytes]:
    """A wire chunk's data buffers in wire order (per layer: k data, k scale, v data, v scale):
    what its checksum and its provenance digest cover."""
    for layer in layers:
        for name in ("k", "v"):
            t = layer[name]
            yield t["data"]
            if "scale" in t:
                yield t["scale"]["data"]


def _checksum(model: bytes, key: bytes, layers: Sequence[Mapping[str, Any]]) -> int:
    h = xxhash.xxh3_64(model)
    h.update(key)
    for data in wire_buffers(layers):
        h.update(data)
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
    masked = torch.where(finite, x, torch.full_like(x, -torch.inf))
    vals, ids = torch.topk(masked, k)
    if k:
        # One canonical answer among equal logits (value descending, then id ascending), so a node
        # re-encoding the vector it rebuilt from these bytes sends the same bytes again (their
        # digest is signed: mesh.cache.provenance); topk itself may order and pick ties freely.
        above = torch.nonzero(masked > vals[-1]).flatten()
        ids = torch.cat([above, torch.nonzero(masked == vals[-1]).flatten()[: k - above.numel()]])
        vals = masked[ids]
        order = torch.from_numpy(np.lexsort((ids.numpy(), -vals.numpy())))
        ids, vals = ids[order], vals[order]
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


# -- the node's own records on disk (mesh.cache.store's load_dir / save_dir) ----------------------


def encode_record(payload: ChunkKV | dict[str, Any]) -> bytes:
    """A stored chunk, or a prompt entry ``{"tail": ChunkKV, "logits": tensor}``, as fp32 CBOR."""
    if isinstance(payload, ChunkKV):
        return cbor2.dumps({"chunk": encode_chunk(payload, "fp32")})
    return cbor2.dumps({"tail": encode_chunk(payload["tail"], "fp32"), "len": payload["tail"].length,
                        "logits": wire.pack_tensor(payload["logits"])})


# A record is one fp32 chunk or prompt tail (~8 items per layer) and its logits; a disk we wrote
# ourselves, but a damaged or planted file must not cost more than a KV part from the network.
RECORD_BOUNDS = cbor_bounds.Bounds(max_bytes=1 << 30, max_items=1 << 18)


def decode_record(data: bytes, layout: Sequence[tuple[int, int]], chunk_size: int) -> ChunkKV | dict[str, Any]:
    """The inverse of :func:`encode_record`; raises on a damaged record (the loader skips it).
    Decoded within :data:`RECORD_BOUNDS` (``mesh.cbor_bounds``: no tags, no sharing)."""
    obj = cbor_bounds.loads(data, RECORD_BOUNDS)
    if not isinstance(obj, dict):
        raise ProtocolError("bad-chunk", "record is not a map")
    if "chunk" in obj:
        return decode_chunk(obj["chunk"], layout, chunk_size)
    return {"tail": decode_chunk(obj["tail"], layout, int(obj["len"])),
            "logits": wire.unpack_tensor(obj["logits"])}


def record_size(payload: ChunkKV | dict[str, Any]) -> int:
    """In-memory bytes of a stored chunk or prompt entry (what the store budgets)."""
    if isinstance(payload, ChunkKV):
        return payload.nbytes
    return payload["tail"].nbytes + payload["logits"].numel() * payload["logits"].element_size()
