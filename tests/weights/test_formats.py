"""The int8 format's arithmetic, the streamed safetensors writer and the refusals of a bad file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mesh.errors import ConfigError
from mesh.weights.formats import (
    QUANT_FORMAT,
    check_format,
    dequantize_rows,
    parse_formats,
    quantize_rows,
)
from mesh.weights.load import open_weights
from mesh.weights.modules import Int8Embedding, Int8Linear, int8_matmul
from mesh.weights.writer import DATA_DIGEST, StreamWriter


def test_quantize_rows_error_is_at_most_half_a_step_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different scale
    w[7] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (300,) and int(q.abs().max()) == 127
    err = (dequantize_rows(q, s) - w).abs().amax(dim=1)
    assert torch.all(err <= s / 2 + 1e-7 * w.abs().amax(dim=1))
    assert torch.equal(q[7], torch.zeros(96, dtype=torch.int8)) and float(s[7]) == 1.0
    # A row's largest magnitude is exact: the scale is chosen from it.
    assert torch.allclose(dequantize_rows(q, s).abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)


def test_formats_are_checked_with_the_fix_named() -> None:
    assert parse_formats("fp32, int8,fp32") == ("fp32", "int8")
    with pytest.raises(ConfigError, match="--weights fp32 or int8"):
        check_format("int4")
    with pytest.raises(ConfigError, match="no weight format"):
        parse_formats(" , ")


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("kernel", ["int8mm", "dequant"])
@pytest.mark.parametrize("n", [40, 70_000])  # one block, and many blocks of the dequant kernel
def test_int8_matmul_kernels_equal_the_dequantised_matmul(kernel: str, m: int, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    q, s = quantize_rows(torch.randn(n, 64, generator=g))
    x = torch.randn(m, 64, generator=g)
    ref = x.double() @ dequantize_rows(q, s).double().T
    got = int8_matmul(x, q, s, kernel)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_int8_modules_match_linear_and_scaled_embedding() -> None:
    g = torch.Generator().manual_seed(2)
    q, s = quantize_rows(torch.randn(50, 32, generator=g))
    w = dequantize_rows(q, s)
    x = torch.randn(2, 3, 32, generator=g)
    assert torch.allclose(Int8Linear(q, s)(x), torch.nn.functional.linear(x, w), atol=1e-5)
    ids = torch.tensor([[0, 49, 7], [3, 3, 1]])
    scale = torch.tensor(25.3)
    assert torch.equal(Int8Embedding(q, s)(ids), torch.nn.functional.embedding(ids, w))
    assert torch.allclose(Int8Embedding(q, s, scale)(ids), torch.nn.functional.embedding(ids, w) * scale)


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], split: bool = False) -> Path:
    w = StreamWriter(path, [(k, v.dtype, list(v.shape)) for k, v in tensors.items()], meta)
    for k, v in tensors.items():
        if split and v.dim() == 2:  # rows arrive in several blocks
            for part in v.split(3):
                w.write(k, part)
        else:
            w.write(k, v)
    return w.finish()


META = {"gguf_sha256": "ab" * 32, "mesh_weights": "int8", "mesh_quant_format": str(QUANT_FORMAT)}


def test_streamed_file_reads_back_with_safetensors(tmp_path: Path) -> None:
    q, s = quantize_rows(torch.randn(10, 8))
    tensors = {"a.qweight": q, "__pad__": torch.zeros(4, dtype=torch.uint8),
               "a.scales": s, "norm.weight": torch.randn(8)}
    path = _write(tmp_path / "w.safetensors", tensors, META, split=True)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["gguf_sha256"] == META["gguf_sha256"] and len(f.metadata()[DATA_DIGEST]) == 32
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    got = open_weights(path, "int8", META["gguf_sha256"])
    assert torch.equal(got["a.qweight"], q) and torch.equal(got["a.scales"], s)


def test_writer_refuses_a_short_or_wrong_plan_and_leaves_nothing(tmp_path: Path) -> None:
    w = StreamWriter(tmp_path / "w.safetensors", [("x", torch.float32, [4]), ("y", torch.int8, [2])], META)
    w.write("x", torch.zeros(4))
    with pytest.raises(ValueError, match="expected tensor y"):
        w.write("x", torch.zeros(4))
    with pytest.raises(ValueError, match="never written"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path: Path) -> Path:
    q, s = quantize_rows(torch.randn(64, 64))
    return _write(tmp_path / "weights-int8.safetensors", {"a.qweight": q, "a.scales": s}, META)


def test_truncated_file_is_refused_with_the_fix(good: Path) -> None:
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConfigError, match=r"truncated or damaged.*mesh setup --weights int8"):
        open_weights(good, "int8", META["gguf_sha256"])


def test_damaged_bytes_are_refused_by_the_digest(good: Path) -> None:
    data = bytearray(good.read_bytes())
    data[-10] ^= 0x40  # one bit in the int8 data: safetensors alone cannot see it
    good.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"damaged.*digest.*mesh setup --weights int8"):
        open_weights(good, "int8", META["gguf_sha256"])


def test_damaged_header_missing_file_other_gguf_and_other_format_are_refused(good: Path) -> None:
    with pytest.raises(ConfigError, match="built from another GGUF"):
        open_weights(good, "int8", "cd" * 32)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["mesh_weights"] = "int4"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    good.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(ConfigError, match="holds 'int4' weights"):
        open_weights(good, "int8", META["gguf_sha256"])
    good.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="truncated or damaged"):
        open_weights(good, "int8", META["gguf_sha256"])
    with pytest.raises(ConfigError, match="run `mesh setup --weights int8`"):
        open_weights(good.with_name("missing.safetensors"), "int8", META["gguf_sha256"])


def test_dequant_kernel_runs_outside_inference_mode_after_running_inside() -> None:
    """The kernel's per-thread scratch buffer, first made under ``torch.inference_mode`` (a
    node's forward), must stay writable for a later call outside it (a test, a bench)."""
    import threading

    q, s = quantize_rows(torch.randn(40, 64))
    x = torch.randn(1, 64)
    errors: list[BaseException] = []

    def run() -> None:  # a fresh thread: a fresh scratch buffer
        try:
            with torch.inference_mode():
                inside = int8_matmul(x, q, s, "dequant")
            outside = int8_matmul(x, q, s, "dequant")
            assert torch.equal(inside, outside)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors
