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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh import footprint, sysmem
    from mesh.config import NodeConfig

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


def _node_plan(config: "NodeConfig", weights: str, cache_explicit: bool, extra_weights: int = 0,
               ) -> "tuple[footprint.Plan, sysmem.MemoryLimit] | None":
    """``mesh.footprint.plan`` for a node of ``config`` in format ``weights`` (plus
    ``extra_weights`` bytes held beside its weights), or None when the weight file is missing."""
    import json

    from mesh import budget, footprint, sysmem
    from mesh.model import KV_DTYPE, converted_dir
    from mesh.text import FILE_NAME
    from mesh.weights.formats import weights_file

    model_dir = converted_dir(config.home, config.model)
    files = {"weights": weights_file(model_dir, weights), "tokenizer": model_dir / FILE_NAME}
    sizes = {k: p.stat().st_size if p.exists() else 0 for k, p in files.items()}
    if not sizes["weights"]:  # load_model says how to make it
        return None
    model_config = json.loads((model_dir / "config.json").read_text())
    text_config = model_config.get("text_config", model_config)

    class _Config:  # what mesh.budget reads, from config.json without building a model
        def __init__(self, d: dict) -> None:
            self.__dict__.update(d)

    cfg = _Config({**text_config, "kv_dtype": KV_DTYPE})  # the node's cache stores its KV in KV_DTYPE
    limit = sysmem.memory_limit()
    runtime = sysmem.process_memory().rss_bytes
    c = config.cache
    fit = footprint.plan(limit.bytes, limit.source, runtime, sizes["weights"] + extra_weights, sizes["tokenizer"],
                         budget.context_bytes_per_token(cfg), int(getattr(cfg, "max_position_embeddings", 0) or 2**31 - 1),
                         weights, max_context=config.limits.max_context,
                         cache_bytes=(int(c.budget_mb * footprint.MiB) if cache_explicit else None) if c.enabled else 0,
                         default_cache_bytes=int(c.budget_mb * footprint.MiB),
                         context_share=budget.MEMORY_SHARE, min_context=budget.MIN_CONTEXT,
                         prefill=budget.prefill_bytes(cfg))
    return fit, limit


def fit_node(config: "NodeConfig", weights: str, cache_explicit: bool) -> "NodeConfig":
    """``config`` with the context and cache budget that fit this process's memory limit
    (``mesh.footprint.plan``; ``mesh.sysmem.memory_limit``: its cgroup, else the board), or
    ``mesh.footprint.DoesNotFit`` naming what to change. Call it once torch is imported (the
    runtime is measured) and before the weights load."""
    import dataclasses

    from mesh import footprint

    planned = _node_plan(config, weights, cache_explicit)
    if planned is None:
        return config
    fit, limit = planned
    log.info("memory: %s of %.0f MiB (%s); max context %d tokens, cache %.0f MiB", fit.footprint.describe(),
             limit.bytes / footprint.MiB, limit.source, fit.max_context, fit.cache_bytes / footprint.MiB)
    c = config.cache
    if c.enabled and not fit.cache_bytes:
        log.warning("memory: no room left for a prompt cache; running without one")
    cache = dataclasses.replace(c, budget_mb=fit.cache_bytes / footprint.MiB, enabled=bool(fit.cache_bytes)) \
        if c.enabled else c
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_context=fit.max_context),
                               cache=cache)


def _copy_bytes(config: "NodeConfig", weights: str) -> int | None:
    """What the packed decode copy of ``config``'s weights may take (the weight file's size: the
    same codes and about as many group constants, an upper bound), or None where no copy is made:
    fp32, no vectorised 4-bit kernel here (aarch64), or no weight file."""
    from mesh.model import converted_dir
    from mesh.weights import packed
    from mesh.weights.formats import weights_file

    if weights == "fp32" or not packed.available():
        return None
    path = weights_file(converted_dir(config.home, config.model), weights)
    return path.stat().st_size if path.exists() else None


def decode_copy_fits(config: "NodeConfig", weights: str) -> bool:
    """Whether a node of ``config`` (already fitted: ``fit_node``; call it before the weights load,
    as ``fit_node``: the runtime is measured) may hold the packed decode copy
    of its weights (``mesh.weights.packed``) without a shorter context or a smaller cache: x86 with
    the 4-bit kernel, a quantised format, and room for a second copy the size of the weight file
    (the packed copy is the same codes and about as many group constants: an upper bound)."""
    from mesh import footprint

    copy = _copy_bytes(config, weights)
    if copy is None:
        return False
    try:
        planned = _node_plan(config, weights, True, extra_weights=copy)
    except footprint.DoesNotFit:
        return False
    return planned is not None and planned[0].max_context >= config.limits.max_context


PACKED_MIN_CONTEXT = 4096  # positions a chosen context may shrink to, to make room for the packed copy


def fit_for_packed_copy(chosen: "NodeConfig", fitted: "NodeConfig", weights: str) -> "NodeConfig | None":
    """Where the packed copy does not fit beside the context ``fit_node`` chose (a share of the
    limit, thousands of positions more than most asks use) and its cache: ``fitted`` with a
    shorter context that leaves room for the copy, the cache kept, if that context still holds
    :data:`PACKED_MIN_CONTEXT` positions (or all it held before, if fewer); else None. Only for a
    context the node chose (``chosen.limits.max_context`` 0), never one the user gave. Measured on
    the pi4-2gb profile (1.5 GiB): Gemma-3 q4 decoded at 0.11x llama.cpp unpacked, its peak a third
    of the cap, because its ~11k-position context and 256 MiB cache left no room for the copy."""
    import dataclasses

    from mesh import footprint

    copy = None if chosen.limits.max_context else _copy_bytes(fitted, weights)
    if copy is None:
        return None
    try:
        planned = _node_plan(dataclasses.replace(fitted, limits=chosen.limits), weights, True, extra_weights=copy)
    except footprint.DoesNotFit:
        return None
    if planned is None:
        return None
    fit = planned[0]
    if fit.max_context < min(PACKED_MIN_CONTEXT, fitted.limits.max_context):
        return None
    log.info("memory: max context %d tokens (not %d) to hold the packed decode copy of %.0f MiB",
             fit.max_context, fitted.limits.max_context, copy / footprint.MiB)
    return dataclasses.replace(fitted, limits=dataclasses.replace(fitted.limits, max_context=fit.max_context))


def fit_worker(config: "NodeConfig", weights: str, group_size: int) -> "footprint.WorkerFit":
    """A worker-only node's capacity in neuron groups of ``group_size`` (``mesh.footprint.plan_worker``:
    what its memory limit leaves after the runtime, the load transient and the slack), logged, or
    ``mesh.footprint.DoesNotFit`` when it cannot hold one group per layer. Call it once torch is
    imported (the runtime is measured), before the first plan."""
    from mesh import footprint, sysmem
    from mesh.halo.groups import GroupLayout
    from mesh.halo.probe import probe_groups
    from mesh.lm.config import load_config
    from mesh.model import converted_dir

    cfg = load_config(converted_dir(config.home, config.model))
    limit = sysmem.memory_limit()
    fit = footprint.plan_worker(limit.bytes, limit.source, sysmem.process_memory().rss_bytes,
                                cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, group_size,
                                probe_groups=len(probe_groups(GroupLayout(cfg.intermediate_size, group_size))))
    log.info("memory: HALO worker only, %s, of %.0f MiB (%s); %s weights", fit.describe(),
             limit.bytes / footprint.MiB, limit.source, weights)
    return fit
