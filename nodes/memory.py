"""Keep a long-running node's memory flat: glibc's allocator, tuned and trimmed.

A node lives for weeks and churns through KV tensors of every size (the prompt cache fills,
then replaces entries). With glibc's defaults the mmap threshold creeps up after large frees, so
later large blocks come from the heap, and freed heap pages stay with the process: RSS grows
with no leak behind it (`mesh bench load`, figures in README and results/). A fixed threshold
sends large blocks back to the kernel on free, and a periodic ``malloc_trim`` returns the free
pages in between.

The rest of the growth was the store's chunks themselves: one small tensor per layer and K/V for
each Gemma-3 chunk, all in the worker thread's malloc arena among short-lived blocks, so every
eviction left holes the next chunks did not fit. ``mesh.cache.kv.pack`` makes each chunk one
buffer; the fixed threshold here is what
sends such a buffer to its own mapping: glibc's dynamic threshold rises to the size of each
freed mapped block, so the first freed 1 MiB logits tensor would put chunks in the heap again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed


@functools.cache  # loaded once: the trimmer calls it every period
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def steady_malloc() -> bool:
    """Fix the mmap threshold (no dynamic creep); False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> bool:
    """Give free heap pages back to the kernel; True if any were released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def start_trimmer(stop: threading.Event, period_s: float = 30.0) -> threading.Thread | None:
    """A daemon thread that trims every ``period_s`` until ``stop`` is set (None without glibc)."""
    if _libc() is None:
        return None

    def loop() -> None:
        while not stop.wait(period_s):
            trim()

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread
