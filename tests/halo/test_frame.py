"""The HALO hot-path frame (mesh.halo.frame): round trip, golden header, every defect a counted reason."""

from __future__ import annotations

import struct

import pytest
import torch

from mesh.halo import frame as halo_wire
from mesh.errors import ProtocolError

MAX = 1 << 20


def test_round_trip_keeps_every_field_and_the_exact_bytes() -> None:
    x = torch.randn(1, 3, 576).half()
    data = halo_wire.encode(halo_wire.MLP, "coordinator", 17, 2**50 + 3, 29, x, reply_to="mesh/v1/reply/coordinator-halo")
    f = halo_wire.decode(data, MAX)
    assert (f.kind, f.sender, f.epoch, f.step, f.layer, f.reply_to) == (
        halo_wire.MLP, "coordinator", 17, 2**50 + 3, 29, "mesh/v1/reply/coordinator-halo")
    assert f.tensor.dtype == torch.float16 and torch.equal(f.tensor, x)
    # Header, shape, names, then the raw little-endian fp16 bytes: 2 bytes per element.
    assert len(data) == 33 + 3 * 4 + len("coordinator") + len("mesh/v1/reply/coordinator-halo") + 3 * 576 * 2
    y = torch.randn(1, 1, 8)
    p = halo_wire.decode(halo_wire.encode(halo_wire.PARTIAL, "w1", 1, 2, 3, y, compute_s=0.000417), MAX)
    assert p.tensor.dtype == torch.float32 and torch.equal(p.tensor, y) and p.compute_s == pytest.approx(0.000417)


def test_golden_header() -> None:
    data = halo_wire.encode(halo_wire.PARTIAL, "w", 1, 2, 3, torch.zeros(1, dtype=torch.float16), compute_s=5e-6)
    assert data.hex() == ("48414c4f" "02" "02" "01" "01" "0100000000000000" "0200000000000000" "0300" "01" "0000"
                          "05000000" "01000000" "77" "0000")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: d[:20], "malformed"),
    (lambda d: b"HALX" + d[4:], "malformed"),
    (lambda d: d[:4] + b"\x01" + d[5:], "bad-version"),  # version 1 had no tags
    (lambda d: d + b"\x00" * 15, "bad-tensor"),  # not a whole tag
    (lambda d: d[:5] + b"\x07" + d[6:], "bad-frame"),
    (lambda d: d[:6] + b"\x09" + d[7:], "bad-frame"),
    (lambda d: d[:-1], "bad-tensor"),
    (lambda d: d + b"\x00", "bad-tensor"),
    (lambda d: d[:33] + struct.pack("<III", 1, 1 << 20, 1 << 20) + d[45:], "bad-tensor"),
    (lambda d: d[:45] + b"co/rd" + d[50:], "malformed"),  # a name with "/" is no topic level
    (lambda d: d[:45 + 11] + b"+" + d[45 + 12:], "bad-reply-topic"),
])
def test_every_defect_is_a_protocol_error_with_a_reason(damage, reason: str) -> None:
    x = torch.randn(1, 1, 4).half()
    data = halo_wire.encode(halo_wire.MLP, "coordinator", 1, 2, 3, x, reply_to="mesh/v1/reply/c-halo")
    assert halo_wire.decode(data, MAX).layer == 3
    with pytest.raises(ProtocolError) as err:
        halo_wire.decode(damage(data), MAX)
    assert err.value.reason == reason
    with pytest.raises(ProtocolError) as err:
        halo_wire.decode(data, len(data) - 1)
    assert err.value.reason == "oversized"


def test_tags_bind_every_byte_and_each_worker_finds_its_own() -> None:
    k1, k2, kc = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
    x = torch.randn(1, 1, 8).half()
    data = halo_wire.encode(halo_wire.MLP, "coordinator", 7, 99, 4, x, reply_to="mesh/v1/reply/c-halo", keys=[k1, None, k2])
    f = halo_wire.decode(data, MAX)
    assert len(f.tags) == 3 and torch.equal(f.tensor, x) and f.signed == data[:-48]
    assert f.tag_ok(k1, 0) and f.tag_ok(k2, 2) and not f.tag_ok(k1, 2) and not f.tag_ok(k2, 1)
    assert not f.tag_ok(k1, 3) and not f.tag_ok(k1, -1)
    for at in (5, 13, 21, 29, 40, len(data) - 49):  # kind, epoch, step, layer, shape/sender, tensor
        bad = bytearray(data)
        bad[at] ^= 1
        try:
            g = halo_wire.decode(bytes(bad), MAX)
        except ProtocolError:
            continue
        assert not g.tag_ok(k1, 0) and not g.tag_ok(k2, 2), at
    # A partial's tag is not an MLP input's: the same key and bytes but another kind never pass.
    p = halo_wire.decode(halo_wire.encode(halo_wire.PARTIAL, "w1", 7, 99, 4, x, keys=[kc]), MAX)
    assert p.tag_ok(kc) and not p.tag_ok(k1)
    as_mlp = halo_wire.Frame(halo_wire.MLP, p.sender, p.epoch, p.step, p.layer, p.tensor, tags=p.tags, signed=p.signed)
    assert not as_mlp.tag_ok(kc)
    assert halo_wire.decode(halo_wire.encode(halo_wire.PARTIAL, "w1", 7, 99, 4, x), MAX).tags == ()
