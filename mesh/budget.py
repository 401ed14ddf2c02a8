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


class Abandoned(Exception):
    """An ask's work stopped before its answer: ``reason`` is DEADLINE or ASKER_GONE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def bytes_per_token(config: Any) -> int:
    """Memory one prompt token costs a node's forward: its fp32 K and V in every layer (kept for
    the whole ask, and in the capture cache), plus the prefill's activations of one layer at a
    time (the hidden state, and gate, up and their product in the MLP)."""
    c = _text_config(config)
    heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    kv = c.num_hidden_layers * 2 * heads * head_dim * 4
    activations = (4 * c.hidden_size + 3 * c.intermediate_size) * 4
    return int(kv + activations)


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
