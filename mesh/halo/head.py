"""The HALO coordinator's LM head on two threads (:class:`TwoThreadHead`): a decode step's head
runs while the workers wait for the next MLP input, so a second core is idle then."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mesh.model import bind_threads
from mesh.weights import modules as qmod

Half = Callable[[Tensor], Tensor]


def _halves(head: nn.Module, half: int) -> tuple[Half, Half]:
    """The products of the head's first ``half`` vocabulary rows and of the rest, over views of
    its weight (float32, int8 or q4 rows: a row of any of them is one output)."""
    if type(head) is nn.Linear:
        w, b = head.weight, head.bias
        return (lambda x: F.linear(x, w[:half], None if b is None else b[:half]),
                lambda x: F.linear(x, w[half:], None if b is None else b[half:]))
    bias = getattr(head, "bias", None)
    cut = (slice(None, half), slice(half, None))
    if isinstance(head, qmod.Int8Linear):
        a, b = (qmod.Int8Linear(head.qweight[c], head.scales[c], None if bias is None else bias[c]) for c in cut)
    elif isinstance(head, qmod.GroupLinear):
        mins = head.mins
        a, b = (qmod.GroupLinear(head.qweight[c], head.scales[c], None if mins is None else mins[c],
                                 None if bias is None else bias[c]) for c in cut)
    else:
        raise TypeError(f"no two-thread product for a {type(head).__name__} head")
    return a, b


class TwoThreadHead(torch.nn.Module):
    """An LM head whose one-position product runs on two threads: the vocabulary rows in halves,
    one on the caller's thread and one on a helper (torch releases the GIL in the matmul). For a
    float32 head each logit is the same row product as the plain head's when torch runs one thread
    per caller (checked bitwise in the tests; a multi-threaded product may sum in another order), so
    the argmax, and greedy generation, are unchanged; an int8 or q4 head's halves run its own
    kernel (the decode kernel on both threads inside ``mesh.weights.modules.decoding``) on its rows.
    Worth it where another core is idle during the head: the HALO coordinator's workers wait for
    the next MLP input then (measured in results/). Multi-position calls use the plain product.
    """

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.plain = head
        self.weight = getattr(head, "weight", None)  # the same (possibly tied) parameter, for a float32 head
        self.bias = getattr(head, "bias", None)
        rows = int(head.weight.shape[0]) if type(head) is nn.Linear else int(head.out_features)
        self._half = rows // 2
        self._first, self._second = _halves(head, self._half)
        self._go, self._done = threading.Event(), threading.Event()
        self._lock = threading.Lock()  # one caller at a time: the helper serves one job
        self._job: torch.Tensor | None = None
        self._decode = False
        self._out: torch.Tensor | BaseException | None = None
        threading.Thread(target=self._helper, name="lm-head", daemon=True).start()

    def _helper(self) -> None:
        bind_threads()
        while True:
            self._go.wait()
            self._go.clear()
            try:
                with torch.inference_mode(), qmod.decoding() if self._decode else contextlib.nullcontext():
                    self._out = self._second(self._job)
            except BaseException as exc:  # handed to the caller
                self._out = exc
            self._done.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        if x.shape[:-1].numel() != 1:
            return self.plain(x)
        with self._lock:
            self._job, self._decode, self._out = x, qmod.in_decoding(), None
            self._done.clear()
            self._go.set()
            try:
                a = self._first(x)
            finally:
                # Even when this half raised: the helper's answer to this job must not be read
                # as the next caller's.
                self._done.wait()
                b, self._job = self._out, None
        if isinstance(b, BaseException):
            raise b
        return torch.cat([a, b], dim=-1)


def two_thread_head(model: torch.nn.Module) -> TwoThreadHead | None:
    """Put a :class:`TwoThreadHead` in place of ``model``'s LM head (idempotent); returns it, or
    None for a head it has no halves for."""
    head = model.get_output_embeddings()
    if isinstance(head, TwoThreadHead):
        return head
    if not (type(head) is nn.Linear or isinstance(head, (qmod.Int8Linear, qmod.GroupLinear))):
        return None
    head = TwoThreadHead(head)
    model.set_output_embeddings(head)
    return head
