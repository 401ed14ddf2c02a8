"""What one ask may cost a node: tokens against a per-node maximum context, and time against a
deadline the asker gives as a relative budget.

Characters are no measure of work: neither tokenizer has a multi-digit token, so 32,000 digits
are ~32,000 tokens, each with its fp32 KV in every layer, prefill activations and minutes of CPU.
So a node refuses (``too-long``) an ask whose prompt tokens plus ``max_new_tokens`` exceed its
maximum context: the model's positions, and what a share of the device's memory holds
(:func:`default_max_context`), unless the operator set ``--max-context``.

Time: an ask may carry ``deadline_s``, a budget in seconds. Pis have no real-time clock before
NTP, so it is relative, and the receiver measures it on its own monotonic clock from when it took
the ask (a router's forwarding is negligible against it). Without one the node's default applies
(``Timing.ask_timeout_s``). Work stops between decoder layers and between tokens once the deadline
passed (``deadline``) or the asker is gone (``asker-gone``: its last will said ``offline``), so a
node never works for nobody.

Pure: no clock, no socket; the caller passes ``now`` and the model's configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

TOO_LONG = "too-long"
DEADLINE = "deadline"
ASKER_GONE = "asker-gone"
BAD_DEADLINE = "bad-deadline"

MAX_DEADLINE_S = 3600.0  # no ask may hold a node longer than an hour, whatever it asks for
MEMORY_SHARE = 0.25  # of the device's memory, for one ask's KV and activations (the model, the
# prompt cache, the broker and the system keep the rest)
MIN_CONTEXT = 64  # a node that can hold less than this is misconfigured, not protected
PREFILL_CHUNK = 128  # positions per prefill pass of mesh.lm (activations bounded by the chunk)
PREFILL_SCRATCH = 4 << 20  # the float32 block a quantised layer dequantises into (mesh.weights.modules)


class Abandoned(Exception):
    """An ask's work stopped before its answer: ``reason`` is DEADLINE or ASKER_GONE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _shape(config: Any) -> tuple[Any, int, int, int]:
    c = _text_config(config)
    heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return c, heads, head_dim, int(c.num_attention_heads)


def kv_bytes_per_token(config: Any) -> int:
    """One position's K and V in every layer, in the dtype the cache stores (``kv_dtype``:
    mesh.lm's config says; transformers' caches are float32)."""
    c, heads, head_dim, _ = _shape(config)
    item = 2 if getattr(c, "kv_dtype", "float32") == "float16" else 4
    return c.num_hidden_layers * 2 * heads * head_dim * item


def context_bytes_per_token(config: Any) -> int:
    """What one position of a node's context costs at its peak: its KV with the quarter a cache
    buffer grows by (mesh.lm.cache), and as a key of the prefill's last chunk its attention
    scores (PREFILL_CHUNK x query heads, float32) and its K and V as float32 for every query
    head (a float16 cache is converted to attend)."""
    _, _, head_dim, q_heads = _shape(config)
    return kv_bytes_per_token(config) * 5 // 4 + (PREFILL_CHUNK * q_heads + 2 * q_heads * head_dim) * 4


def activation_bytes_per_token(config: Any) -> int:
    """What one position of a prefill pass adds to its peak beyond the KV: one layer's activations
    at a time (hidden state, q/k/v and their rotated copies, attention output, gate, up and
    their product, each float32): ``(12 h + 6 i) * 4`` bytes, an upper bound on what
    ``results/2026-12-07/prefill_peak.py`` measured (peak RSS growth over a prefill)."""
    c = _text_config(config)
    return (12 * c.hidden_size + 6 * c.intermediate_size) * 4


def bytes_per_token(config: Any) -> int:
    """Memory one prompt token costs a forward that takes the whole prompt in one pass
    (transformers' classes: HALO's coordinator): its KV, kept for the whole ask, and its share of
    the prefill's activations."""
    return kv_bytes_per_token(config) + activation_bytes_per_token(config)


def prefill_bytes(config: Any) -> int:
    """The peak a node's prefill adds beyond the KV, whatever the prompt's length: mesh.lm runs a
    prompt in chunks of PREFILL_CHUNK positions, and a quantised layer dequantises into a
    PREFILL_SCRATCH block."""
    return PREFILL_CHUNK * activation_bytes_per_token(config) + PREFILL_SCRATCH


def default_max_context(config: Any, memory_bytes: int, share: float = MEMORY_SHARE) -> int:
    """The model's positions, or fewer where ``share`` of ``memory_bytes`` cannot hold them."""
    positions = int(getattr(_text_config(config), "max_position_embeddings", 0) or 2**31 - 1)
    fits = int(memory_bytes * share) // bytes_per_token(config)
    return max(MIN_CONTEXT, min(positions, fits))


def context_problem(prompt_tokens: int, max_new_tokens: int, max_context: int) -> str | None:
    """TOO_LONG when the prompt and the answer cannot both fit the node's maximum context."""
    return TOO_LONG if prompt_tokens + max_new_tokens > max_context else None


def deadline_problem(body: Mapping[str, Any]) -> str | None:
    """BAD_DEADLINE for a ``deadline_s`` that is no finite number of seconds in (0, MAX_DEADLINE_S]."""
    value = body.get("deadline_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return BAD_DEADLINE
    return None if 0 < value <= MAX_DEADLINE_S else BAD_DEADLINE


def deadline_at(received: float, body: Mapping[str, Any], default_s: float) -> float:
    """The monotonic time an ask taken at ``received`` must be done by (its budget, else the
    node's default, never beyond MAX_DEADLINE_S)."""
    value = body.get("deadline_s")
    budget = float(value) if deadline_problem(body) is None and value is not None else default_s
    return received + min(budget, MAX_DEADLINE_S)
