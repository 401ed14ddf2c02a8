"""The HALO hot-path frame: one layer step's MLP input, and a worker's partial, as raw bytes.

Every layer of every token sends one MLP input and gets one partial per worker back, so these two
messages are the mesh's hot path (30 round trips per token for SmolLM2). The CBOR envelope of
``mesh.wire`` costs a canonical map encode, a schema and bignum walk and a nested tensor dict per
message; this frame is a fixed little-endian header, two short strings and the tensor's bytes,
decoded with one ``struct.unpack_from``. Everything else (plans, acks, heartbeats) stays CBOR.

Layout (little-endian, version 2)::

    magic   4s  b"HALO"
    version B   FRAME_VERSION; anything else is rejected ("bad-version")
    kind    B   1 = MLP input (coordinator -> workers), 2 = partial (worker -> coordinator)
    dtype   B   1 = float16, 2 = float32
    ndim    B   1..8
    epoch   Q   plan epoch
    step    Q   the coordinator's layer-step number
    layer   H
    sender  B   length of the sender's name (1..64)
    reply   H   length of the reply topic (MLP input: 1..256; partial: 0)
    compute I   partial: the worker's compute time in microseconds; MLP input: 0
    shape   ndim x I
    sender name (UTF-8), reply topic (UTF-8), tensor data (C order)
    tags    zero or more TAG_BYTES MACs, as many as the length leaves (``mesh.auth.pairs``)

The tags authenticate the frame to its pair (REVIEW-SECURITY.md H1: any node could answer every
MLP step first in every worker's name): each is a keyed BLAKE2b over every byte before the tags,
so it binds kind, epoch, step, layer, sender, reply topic and tensor. A partial carries one tag
(the worker's key with its coordinator); an MLP input, published once for every worker of the
plan, carries one per worker in the order of the plan's sorted worker names, each under that
worker's key. A process without keys sends no tags, and one with keys refuses such frames
(``mesh.halo.keys``). Version 1 (no tags) is gone: a worker and its coordinator upgrade together.

Receivers turn every defect into :class:`~mesh.errors.ProtocolError` with a counted reason, like
``mesh.wire.decode``; nothing from the network raises anything else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
import torch

from mesh.auth.pairs import TAG_BYTES, tag, tag_ok
from mesh.config import check_name
from mesh.errors import ConfigError, ProtocolError
from mesh.wire import check_reply_topic

MAGIC = b"HALO"
FRAME_VERSION = 2
MLP, PARTIAL = 1, 2
_HEADER = struct.Struct("<4sBBBBQQHBHI")
_DTYPES = {1: torch.float16, 2: torch.float32}
_CODES = {v: k for k, v in _DTYPES.items()}
MAX_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Frame:
    kind: int
    sender: str
    epoch: int
    step: int
    layer: int
    tensor: torch.Tensor
    reply_to: str = ""  # MLP input only
    compute_s: float = 0.0  # partial only
    tags: tuple[bytes, ...] = ()
    signed: bytes = b""  # the bytes the tags cover

    def tag_ok(self, key: bytes, index: int = 0) -> bool:
        """Whether tag ``index`` is this frame's MAC under ``key``."""
        return 0 <= index < len(self.tags) and tag_ok(key, self.signed, _PERSON[self.kind], self.tags[index])


_PERSON = {MLP: b"mesh-halo-mlp", PARTIAL: b"mesh-halo-part"}  # a tag of one kind never passes as the other


def encode(kind: int, sender: str, epoch: int, step: int, layer: int, tensor: torch.Tensor,
           reply_to: str = "", compute_s: float = 0.0, keys: Sequence[bytes | None] = ()) -> bytes:
    """A frame, with one tag per key in ``keys`` (None: a zero tag no key passes, keeping the
    others in place)."""
    t = tensor.detach().contiguous()
    code = _CODES.get(t.dtype)
    if code is None:
        raise ProtocolError("bad-tensor", f"dtype {t.dtype} not allowed in a HALO frame")
    name, reply = sender.encode(), reply_to.encode()
    if kind not in (MLP, PARTIAL) or not 0 < len(name) <= 64 or len(reply) > 256 or not 1 <= t.ndim <= 8:
        raise ProtocolError("bad-frame", "kind, sender, reply topic or rank out of range")
    head = _HEADER.pack(MAGIC, FRAME_VERSION, kind, code, t.ndim, epoch, step, layer, len(name), len(reply),
                        min(int(compute_s * 1e6), 2**32 - 1))
    body = b"".join((head, struct.pack(f"<{t.ndim}I", *t.shape), name, reply, t.view(torch.uint8).numpy().tobytes()))
    if not keys:
        return body
    person = _PERSON[kind]
    return b"".join((body, *(tag(k, body, person) if k is not None else bytes(TAG_BYTES) for k in keys)))


def decode(payload: bytes, max_bytes: int) -> Frame:
    """Untrusted bytes -> Frame, or ProtocolError with a counted reason."""
    if len(payload) > max_bytes:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {max_bytes}")
    if len(payload) < _HEADER.size:
        raise ProtocolError("malformed", "HALO frame shorter than its header")
    magic, version, kind, code, ndim, epoch, step, layer, n_name, n_reply, compute_us = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError("malformed", "not a HALO frame")
    if version != FRAME_VERSION:
        raise ProtocolError("bad-version", f"HALO frame version {version}")
    if kind not in (MLP, PARTIAL) or code not in _DTYPES or not 1 <= ndim <= 8:
        raise ProtocolError("bad-frame", f"kind {kind}, dtype {code}, rank {ndim}")
    if (kind == MLP) != (n_reply > 0) or epoch >= 2**63 or step >= 2**63:
        raise ProtocolError("bad-frame", "reply topic or counters out of range")
    pos = _HEADER.size
    end_shape = pos + 4 * ndim
    if len(payload) < end_shape:
        raise ProtocolError("malformed", "HALO frame shorter than its shape")
    shape = struct.unpack_from(f"<{ndim}I", payload, pos)
    count = math.prod(shape)
    dtype = _DTYPES[code]
    size = count * (2 if dtype is torch.float16 else 4)
    data_at = end_shape + n_name + n_reply
    # max(d, 1): an empty tensor with huge other dims ((0, 2**32-1, 2**32-1)) overflows torch's strides.
    extra = len(payload) - data_at - size
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS or extra < 0 or extra % TAG_BYTES:
        raise ProtocolError("bad-tensor", "HALO frame length does not match its shape")
    try:
        sender = check_name(payload[end_shape:end_shape + n_name].decode())
        reply = payload[end_shape + n_name:data_at].decode()
    except (UnicodeDecodeError, ConfigError) as exc:
        raise ProtocolError("malformed", "HALO frame sender or reply topic") from exc
    if kind == MLP:
        check_reply_topic(reply)
    end = data_at + size
    tensor = (torch.frombuffer(bytearray(payload[data_at:end]), dtype=dtype).reshape(shape) if count
              else torch.empty(shape, dtype=dtype))
    tags = tuple(payload[i:i + TAG_BYTES] for i in range(end, len(payload), TAG_BYTES))
    return Frame(kind, sender, epoch, step, layer, tensor, reply, compute_us / 1e6, tags, payload[:end] if tags else b"")

