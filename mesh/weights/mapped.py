"""One safetensors file, read a few tensors at a time through a short-lived memory mapping.

A HALO worker needs a slice of every MLP layer of a weight file, never the whole file at once: it
opens a :class:`Mapping` for one layer, copies the rows and columns it serves out of the mapped
tensors, and closes the mapping, so the pages it touched leave its resident set before the next
layer is read. Closing also drops those pages from the page cache (``posix_fadvise(DONTNEED)``
over the whole file: the tensors read and what the kernel's read-around brought in beside them,
8 MiB a fault on this machine's disk, which dropping the tensors' own ranges left behind; a page
another process maps stays): nothing reads them again until the next plan, and a memory cgroup (a
testbed device, a container) would otherwise keep them charged to the worker, a whole MLP's worth
after one plan (109 MiB of a SmolLM2 fp32 worker's 400 MiB, 2026-12-07). The next plan reads them
from disk again.

The safetensors layout (the format's own specification): an unsigned little-endian 64-bit header
length ``n``, then ``n`` bytes of JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the byte after the header) plus an optional
``"__metadata__"`` table of strings; then the data, each tensor C-contiguous in little-endian order.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from mesh.errors import ConfigError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
          "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}
MAX_HEADER_BYTES = 100 << 20  # what the format's reference implementation accepts


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes sit in the file (absolute offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """The tensors and metadata of a safetensors file, checked against the file's size; a
    ConfigError for a file that is missing, truncated or not safetensors."""
    if sys.byteorder != "little":
        raise ConfigError("reading safetensors needs a little-endian machine")
    try:
        with Path(path).open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header of {n} bytes in a file of {size}")
            raw = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{path} is no readable safetensors file ({exc})") from None
    base = 8 + n
    metadata = raw.pop("__metadata__", None) or {}
    entries: dict[str, Entry] = {}
    for name, e in raw.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: tensor {name!r} has an unreadable entry {e!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise ConfigError(f"{path}: tensor {name!r} does not fit the file (truncated?)")
        entries[name] = Entry(dtype, shape, base + begin, base + end)
    return Header(entries, {str(k): str(v) for k, v in metadata.items()})


def drop_cached(path: Path) -> None:
    """Drop the page cache of the whole file at ``path`` (pages a process maps stay): after a pass
    over all of it, such as checking its digest, that nothing reads again soon."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Mapping:
    """``with Mapping(path, header) as m: m.tensor(name)``: tensors as views of a private read-only
    mapping of the file, valid only inside the block. torch does not keep a mapping alive for the
    tensors over it, so nothing made by :meth:`tensor` may leave the block except owned copies
    (``index_select``, ``clone``); closing the mapping drops the pages read from the process and
    from the page cache (see the module docstring)."""

    def __init__(self, path: Path, header: Header) -> None:
        self.path, self.header = Path(path), header
        self._file = None
        self._map: mmap.mmap | None = None
        self._read: set[tuple[int, int]] = set()  # byte ranges of the tensors handed out

    def __enter__(self) -> "Mapping":
        self._file = self.path.open("rb")
        try:
            # copy-on-write (never written): a writable buffer, which torch.frombuffer wants
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            self._file.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            if hasattr(os, "posix_fadvise") and self._read:  # the whole file: read-around pages too
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._read.clear()
            self._file.close()
            self._file = None

    def has(self, name: str) -> bool:
        return name in self.header.entries

    def tensor(self, name: str) -> torch.Tensor:
        """A view of tensor ``name`` (do not keep it past the block)."""
        if self._map is None:
            raise RuntimeError("the mapping is closed")
        e = self.header.entries.get(name)
        if e is None:
            raise ConfigError(f"{self.path} has no tensor {name}")
        count = math.prod(e.shape)
        if count == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        self._read.add((e.start, e.stop))
        return torch.frombuffer(self._map, dtype=e.dtype, count=count, offset=e.start).view(e.shape)
