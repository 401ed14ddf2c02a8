"""Bounded CBOR decoding of untrusted bytes: any payload decodes or is refused in time linear in
its length, and never builds more than a fixed number of values.

Why a first pass of our own: cbor2 builds the whole value before anyone can look at it, and its
value-sharing tags (28 marks a value shareable, 29 refers back to it) let a few hundred bytes
stand for millions of list nodes; a walk over such a value takes minutes to days (C1 in the
security review). :func:`scan` walks the item headers of the raw bytes with an explicit stack and
builds nothing; each item costs O(1) (a string is skipped by its declared length) and the walk
stops at ``max_items``. It refuses everything the mesh never sends (its encoder is
``cbor2.dumps(..., canonical=True)`` of dicts, lists, str, bytes, ints, floats, bools and None):

- any semantic tag (``shared-value`` for 28/29, ``cbor-tag`` for the rest);
- indefinite lengths (``indefinite-length``): a canonical encoder never writes them;
- map keys that are not text (``bad-key``): ints, floats and tuples hash predictably, so a map of
  colliding keys costs quadratic time to build; text hashes are salted per process;
- nesting deeper than ``max_depth`` (``too-deep``), more than ``max_items`` items
  (``too-many-items``, checked against a container's declared count before its items are read);
- simple values other than false/true/null, a declared length beyond the bytes that follow, a
  reserved header, trailing bytes (``malformed``).

It returns the top-level map's short text and unsigned int fields, so the wire can learn the
envelope's kind and apply that kind's caps before cbor2 runs. :func:`loads` is the whole pipeline: the scan, then cbor2
with every built-in semantic decoder replaced by a refusal, a tag hook that refuses the rest, no
indefinite lengths, no duplicate keys, text-or-bytes keys only and a depth limit (a second line,
should the scan and cbor2 ever disagree), then :func:`walk`: an iterative walk of the decoded
value with a visited set of container ids (a container met twice is shared: refused) and the node
budget, which also refuses integers beyond CBOR's 64-bit major types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from mesh.errors import ProtocolError

MAX_DEPTH = 16  # deepest real nesting: envelope > body > chunks > chunk > layers > layer > tensor > shape
MAX_INT = 2**64 - 1
SHARING_TAGS = (28, 29)
# The tags cbor2 6 decodes itself (the rest reach the tag hook): probed over 0..69,999 and the
# 32/64-bit extremes; tests/core/test_cbor_bounds.py re-probes them, so a new cbor2 cannot add one silently.
BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
                43000, 55799)
_TOP_TEXT_MAX = 64  # top-level text fields worth returning (the kind, the sender)


@dataclass(frozen=True)
class Bounds:
    """What one payload may cost: its bytes, its CBOR items (every value, key and container
    counts one) and its nesting depth."""

    max_bytes: int
    max_items: int
    max_depth: int = MAX_DEPTH


@dataclass(frozen=True)
class Scan:
    items: int
    top: dict[str, str | int]  # the top-level map's fields whose values are short text or unsigned ints


def _top_text(data: bytes, pos: int, length: int) -> str | None:
    return data[pos:pos + length].decode("utf-8", "replace") if length <= _TOP_TEXT_MAX else None


def scan(data: bytes, max_items: int, max_depth: int = MAX_DEPTH) -> Scan:
    """Check one CBOR data item in ``data`` without building it (module docstring); raises a
    ProtocolError with a counted reason on the first thing the mesh never sends."""
    n, pos, items = len(data), 0, 0
    left: list[int] = []  # per open container: items still to read (a map counts keys and values)
    maps: list[bool] = []  # per open container: is it a map
    top: dict[str, str | int] = {}
    top_key: str | None = None
    from_bytes = int.from_bytes
    while True:
        if pos >= n:
            raise ProtocolError("malformed", "truncated item")
        items += 1
        if items > max_items:
            raise ProtocolError("too-many-items", f"more than {max_items} items")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 31
        if info < 24:
            arg = info
        elif info < 28:
            end = pos + (1 << (info - 24))  # 1, 2, 4 or 8 bytes follow
            if end > n:
                raise ProtocolError("malformed", "truncated header")
            arg = from_bytes(data[pos:end], "big")
            pos = end
        elif info == 31:
            raise ProtocolError("indefinite-length" if 2 <= major <= 5 else "malformed",
                                f"indefinite length or break (major type {major})")
        else:
            raise ProtocolError("malformed", f"reserved additional info {info}")
        depth = len(left)
        is_key = depth > 0 and maps[-1] and not left[-1] & 1
        if is_key and major != 3:
            raise ProtocolError("bad-key", f"map key of major type {major}")
        count = 0
        if major == 2 or major == 3:
            if arg > n - pos:
                raise ProtocolError("malformed", f"string of {arg} bytes, {n - pos} follow")
            if depth == 1 and maps[0]:  # the envelope's own fields
                if is_key:
                    top_key = _top_text(data, pos, arg)
                else:
                    value = _top_text(data, pos, arg) if major == 3 else None
                    if top_key is not None and value is not None:
                        top.setdefault(top_key, value)
                    top_key = None
            pos += arg
        else:
            if depth == 1 and maps[0]:  # a value (keys are text): keep small unsigned ints
                if major == 0 and top_key is not None:
                    top.setdefault(top_key, arg)
                top_key = None
            if major == 4 or major == 5:
                if depth >= max_depth:
                    raise ProtocolError("too-deep", f"nesting deeper than {max_depth}")
                count = arg * 2 if major == 5 else arg
                if count > n - pos:  # every item takes at least one byte
                    raise ProtocolError("malformed", f"{count} items declared, {n - pos} bytes follow")
                if items + count > max_items:
                    raise ProtocolError("too-many-items", f"{count} items declared, at most {max_items}")
            elif major == 6:
                raise ProtocolError("shared-value" if arg in SHARING_TAGS else "cbor-tag", f"semantic tag {arg}")
            elif major == 7 and (info == 24 or info < 20 or info == 23):
                raise ProtocolError("malformed", f"simple value {arg}")
        if depth:
            left[-1] -= 1
        if count:
            left.append(count)
            maps.append(major == 5)
        while left and not left[-1]:
            left.pop()
            maps.pop()
        if not left:
            break
    if pos != n:
        raise ProtocolError("malformed", f"{n - pos} trailing bytes")
    return Scan(items=items, top=top)


def _refuse_tag(tag: Any, *_: Any) -> Any:
    number = getattr(tag, "tag", tag)
    raise ProtocolError("shared-value" if number in SHARING_TAGS else "cbor-tag", f"semantic tag {number}")


def _refuser(number: int) -> Any:
    def refuse(*_: Any) -> Any:
        raise ProtocolError("shared-value" if number in SHARING_TAGS else "cbor-tag", f"semantic tag {number}")
    return refuse


_REFUSE_BUILTINS = {t: _refuser(t) for t in BUILTIN_TAGS}


def cbor2_loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """cbor2 itself, configured to refuse every tag, indefinite lengths, duplicate keys and keys
    other than text or bytes (the second line; :func:`loads` runs :func:`scan` first). cbor2's own
    errors become ``malformed``; a refusal raised in a hook keeps its reason."""
    try:
        return cbor2.loads(data, semantic_decoders=_REFUSE_BUILTINS, tag_hook=_refuse_tag,
                           max_depth=max_depth - 1, allow_indefinite=False, allow_duplicate_keys=False,
                           strict_hashable_types=True)
    except Exception as exc:  # cbor2 raises several types on garbage (and wraps our hooks' errors)
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ProtocolError):
            raise ProtocolError(cause.reason, cause.detail) from exc
        if "nesting" in str(exc):  # cbor2's max_depth counts from 0: ours minus one is the same bound
            raise ProtocolError("too-deep", str(exc)[:80]) from exc
        raise ProtocolError("malformed", f"not CBOR: {type(exc).__name__}: {str(exc)[:80]}") from exc


def walk(value: Any, max_items: int, max_depth: int = MAX_DEPTH) -> int:
    """Count the values in a decoded ``value`` iteratively; refuse a container met twice
    (``shared-value``, checked as each container is first reached, so a shared chain is refused at
    its first repeat), more than ``max_items`` values, nesting beyond ``max_depth`` and integers
    beyond 64 bits (``bad-field``). Returns the count. Fast on what cbor2 builds from what the scan
    lets through (dict, list, str, bytes, int, float, bool, None); the containers only a tag makes
    (a tuple, a set, another mapping) are walked too."""
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = []
    count = 1

    def reach(x: Any, depth: int) -> None:  # every value but the leaves the fast loop skips
        if isinstance(x, int):
            if not -MAX_INT - 1 <= x <= MAX_INT:
                raise ProtocolError("bad-field", "an integer beyond 64 bits")
        elif type(x) is dict or type(x) is list or isinstance(x, _OTHER_CONTAINERS):
            if id(x) in seen:
                raise ProtocolError("shared-value", "a container appears twice")
            seen.add(id(x))
            todo.append((x, depth))

    reach(value, 0)
    while todo:
        v, depth = todo.pop()
        if depth >= max_depth:
            raise ProtocolError("too-deep", f"nesting deeper than {max_depth}")
        if type(v) is list:
            children: Any = v
        elif isinstance(v, Mapping):
            children = [x for pair in v.items() for x in pair]
        else:
            children = list(v)
        count += len(children)
        if count > max_items:
            raise ProtocolError("too-many-items", f"more than {max_items} values")
        depth += 1
        for x in children:
            if type(x) not in _LEAVES:
                reach(x, depth)
    return count


_LEAVES = frozenset({str, bytes, float, bool, type(None)})
_OTHER_CONTAINERS = (Mapping, tuple, set, frozenset)


def loads(data: bytes, bounds: Bounds) -> Any:
    """Untrusted bytes -> a value, within ``bounds``, or a ProtocolError with a counted reason."""
    if len(data) > bounds.max_bytes:
        raise ProtocolError("oversized", f"{len(data)} bytes > {bounds.max_bytes}")
    scan(data, bounds.max_items, bounds.max_depth)
    value = cbor2_loads(data, bounds.max_depth)
    walk(value, bounds.max_items, bounds.max_depth)
    return value
