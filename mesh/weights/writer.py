"""A safetensors file written tensor by tensor, so a converter never holds the whole model.

``safetensors.torch.save_file`` takes every tensor at once; a Pi Zero converting Gemma-3 cannot
hold them. The format is simple and fixed (little-endian u64 header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, padded with spaces to 8 bytes,
then the tensors' bytes back to back), so the header is written first from the planned shapes
and the data streams after it; the file is read back with safetensors itself.

Everything goes to a temporary name beside the target and is fsynced before the rename: a
crash or an error leaves no half-written file under the real name. Every ``drop_every`` bytes
the data written so far is synced and dropped from the page cache: a memory cgroup (v1) charges
a file's cache to the writer, and a Pi Zero's 400 MiB cannot hold a 270 MB output beside the
converter (reading the file back later reads it from disk, as a node's memory map does anyway). The header carries an
xxh3-128 digest of the data (patched in place at the end: a fixed-width hex string), so a
loader can tell a file whose bytes were damaged after it was written.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import xxhash

DATA_DIGEST = "data_xxh3_128"  # metadata key of the data digest
DROP_EVERY = 16 << 20  # bytes written between syncing and dropping the file's page cache
_PLACEHOLDER = "0" * 32
_DTYPES = {torch.int8: ("I8", 1), torch.uint8: ("U8", 1), torch.float32: ("F32", 4),
           torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2)}


def entry_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]


class StreamWriter:
    """Write the planned tensors, in plan order, then :meth:`finish` (or :meth:`abort`).

    ``plan`` is ``[(name, dtype, shape), ...]`` in file order; each :meth:`write` appends the
    next rows of the current tensor (a tensor may arrive in several row blocks)."""

    def __init__(self, path: Path, plan: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str], drop_every: int = DROP_EVERY) -> None:
        self.path = Path(path)
        self.drop_every = drop_every
        self._undropped = 0  # bytes written since the page cache was last dropped
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        header: dict[str, object] = {"__metadata__": {**metadata, DATA_DIGEST: _PLACEHOLDER}}
        self.sizes: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in plan:
            n = entry_bytes(dtype, shape)
            header[name] = {"dtype": _DTYPES[dtype][0], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + n]}
            self.sizes.append((name, n))
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._header = text
        self._digest_at = 8 + text.index(_PLACEHOLDER.encode())
        self._hash = xxhash.xxh3_128()
        self._index, self._done = 0, 0  # current tensor, bytes of it written
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self._f: BinaryIO = self.tmp.open("wb")
        self._f.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append ``rows`` (the next part of tensor ``name``, in its planned dtype)."""
        want, size = self.sizes[self._index]
        if name != want:
            raise ValueError(f"writer expected tensor {want}, got {name}")
        data = rows.detach().contiguous().cpu().numpy().tobytes()
        if self._done + len(data) > size:
            raise ValueError(f"tensor {name}: more bytes than planned")
        self._f.write(data)
        self._hash.update(data)
        self._done += len(data)
        self._undropped += len(data)
        if self._undropped >= self.drop_every:
            self._drop_cache()
        if self._done == size:
            self._index, self._done = self._index + 1, 0

    def _drop_cache(self) -> None:
        """Write back what is written so far and drop it from the page cache (clean pages only
        can be dropped, hence the sync first)."""
        self._f.flush()
        fd = self._f.fileno()
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._undropped = 0

    def finish(self) -> Path:
        """Check every planned byte arrived, write the digest, fsync, rename into place."""
        if self._index != len(self.sizes):
            raise ValueError(f"writer: {len(self.sizes) - self._index} planned tensors never written")
        self._f.seek(self._digest_at)
        self._f.write(self._hash.hexdigest().encode())
        self._f.flush()
        os.fsync(self._f.fileno())
        os.posix_fadvise(self._f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._f.close()
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (after an error): nothing is left under any name."""
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)
