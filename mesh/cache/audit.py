"""Auditing fetched KV: recompute one fetched chunk the peer could not predict, and compare.

A proof (``mesh.cache.provenance``) says who computed a chunk, not that it computed it honestly:
a node with valid credentials may sign any values. So after an answer that used fetched KV, the
asking node recomputes one of the fetched chunks, chosen with the operating system's CSPRNG
(:func:`pick`), over the prefix it holds before that chunk (one chunk's prefill), and compares.
On a full hit it always also recomputes the prompt's last position (and the tail) and compares
the top tokens of the last logits (:func:`logits_error`): they decide the first token of every
later full hit, the likeliest lie.

How close is close enough (:data:`CHUNK_BOUND`, :data:`LOGITS_BOUND`). The recomputation runs
the same weights as the computing node; they differ by summation order (a one-chunk prefill over
a restored prefix against one long prefill) and by the wire codec the chunk came in. The measure
is :func:`chunk_error`: per layer and per K or V tensor, the largest absolute difference over the
largest magnitude of the recomputed tensor, the worst of all. The codec bounds the rounding:
fp16 half an ulp (2^-11 of a value), int8 half a step of its channel's scale (1/254 of the
channel's largest value, at most of the tensor's). The bounds below are the honest differences
measured on SmolLM2-135M chunks (``results/2026-12-07/audit_tolerance.py``) times a margin;
another prompt's KV under the same keys differs by two orders of magnitude more.

What one audit proves, and what it does not, is in RELIABILITY.md (a liar that poisons ``k`` of
the ``n`` fetched chunks of one fetch, each inconsistent with the prefix before it, is caught with
probability ``k / n`` per ask; one that poisons one chunk and computes the rest over it, ``1 / n``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mesh.cache.kv import ChunkKV

# Honest audit differences of SmolLM2-135M (results/2026-12-07/audit_tolerance.py: 90 chunks of
# 6 prompts fetched in each codec into a float16 KV store, every chunk recomputed over the held
# prefix). fp32 and fp16 wires: 0.0 (the same kernels give the same bytes); the bound leaves ~20
# fp16 half-ulps for another machine's summation order. int8: max 0.027 (median 0.016: the int8
# prefix's rounding carried through attention, not just the chunk's own), bound 0.06 (x2.2);
# another prompt's KV under the same keys measured 0.136 at the least.
CHUNK_BOUND = {"fp32": 0.01, "fp16": 0.01, "int8": 0.06}
# The last logits (float32 top k on the wire): the largest absolute difference over the recomputed
# top LOGITS_TOP tokens (logits of magnitude ~20), measured max 0.00066 (fp32, fp16 chunks) and
# 0.073 (int8 chunks under the recomputed position).
LOGITS_BOUND = {"fp32": 0.02, "fp16": 0.02, "int8": 0.25}
LOGITS_TOP = 8  # recomputed top tokens that must be among the fetched ones, in the same order at the top


def pick(n: int) -> int:
    """An index in ``[0, n)`` from the CSPRNG (``secrets``): the peer cannot know it in advance."""
    if n <= 0:
        raise ValueError("nothing to pick from")
    return secrets.randbelow(n)


def chunk_error(got: ChunkKV, want: ChunkKV) -> float:
    """The worst, over layers and K/V, of ``max|got - want| / max|want|`` (``inf`` on a shape
    mismatch or a non-finite value)."""
    tensors = list(zip((*got.keys, *got.values), (*want.keys, *want.values)))
    if len(got.keys) != len(want.keys) or any(a.shape != b.shape for a, b in tensors):
        return float("inf")
    worst = 0.0
    for a, b in tensors:
        if a.numel() == 0:
            continue
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        scale = float(b32.abs().max())
        diff = float((a32 - b32).abs().max())
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / max(scale, 1e-6))
    return worst


def logits_error(got: torch.Tensor, want: torch.Tensor, top: int = LOGITS_TOP) -> float:
    """How far fetched last logits ``got`` (top k, ``-inf`` elsewhere) are from recomputed ones
    ``want``: ``inf`` unless the recomputed top ``top`` tokens are all among the fetched ones and
    both pick the same first token; else the largest absolute difference over those tokens."""
    got, want = got.reshape(-1).to(torch.float32), want.reshape(-1).to(torch.float32)
    if got.shape != want.shape:
        return float("inf")
    ids = torch.topk(want, min(top, want.numel())).indices
    if not bool(torch.isfinite(got[ids]).all()) or int(torch.argmax(got)) != int(ids[0]):
        return float("inf")
    return float((got[ids] - want[ids]).abs().max())


@dataclass
class Pending:
    """One fetch whose entries wait for their audit: the prompt's token ids and chunk keys, the
    fetched run ``keys[first:first + count]`` (and the prompt entry ``pkey`` on a full hit), who
    served them and in which codec."""

    ids: tuple[int, ...]
    keys: tuple[bytes, ...]
    first: int
    count: int
    pkey: bytes | None
    peer: str
    codec: str
    tries: int = 0  # audits started and given way to an ask

    def fetched(self) -> list[bytes]:
        return [*self.keys[self.first:self.first + self.count], *([self.pkey] if self.pkey is not None else [])]


@dataclass
class Verdict:
    """An audit's outcome. ``passed``; else ``culprit``: the computer (proven by its signature;
    the serving peer of an unsigned entry) of the first held unit that a recomputation from the
    first token contradicts (``wrong``), or None when none does (nobody is blamed, the chain is
    dropped). ``unit`` is the audited unit (a chunk index, ``-1``: the prompt entry), ``error``
    its distance over the held prefix in units of its bound, ``seconds`` the recomputations'
    time. ``unit`` is the last unit audited (the first one outside its bound, if any)."""

    passed: bool
    unit: int
    error: float
    seconds: float
    culprit: str | None = None
    wrong: int = 0  # the unit found wrong from the first token (the culprit's), else ``unit``
    audited: tuple[int, ...] = ()  # the units recomputed: the picked chunk, and -1 on a full hit
    evidence: dict[str, object] = field(default_factory=dict)


def within(error: float, codec_name: str) -> bool:
    """Whether a chunk's :func:`chunk_error` is an honest one for a chunk that came in ``codec_name``."""
    return error <= CHUNK_BOUND.get(codec_name, max(CHUNK_BOUND.values()))


def logits_within(error: float, codec_name: str) -> bool:
    return error <= LOGITS_BOUND.get(codec_name, max(LOGITS_BOUND.values()))


def prefix_ids(ids: Sequence[int], unit: int, chunk_size: int) -> list[int]:
    """The tokens a recomputation of chunk ``unit`` needs: every one up to its end."""
    return list(ids[:(unit + 1) * chunk_size])
