"""The HALO coordinator's LM head on two threads (:class:`TwoThreadHead`): a decode step's head
runs while the workers wait for the next MLP input, so a second core is idle then."""

from __future__ import annotations

import threading

import torch

from mesh.model import bind_threads


class TwoThreadHead(torch.nn.Module):
    """An LM head whose one-position product runs on two threads: the vocabulary rows in halves,
    one on the caller's thread and one on a helper (torch releases the GIL in the matmul). Each
    logit is the same row product as the plain head's when torch runs one thread per caller (checked
    bitwise in the tests; a multi-threaded product may sum in another order), so the argmax, and
    greedy generation, are unchanged. Worth it where another core is idle during the head: the
    HALO coordinator's workers wait for the next MLP input then (measured in results/).
    Multi-position calls use the plain product.
    """

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.weight = head.weight  # the same (possibly tied) parameter
        self.bias = getattr(head, "bias", None)
        self._half = int(self.weight.shape[0]) // 2
        self._go, self._done = threading.Event(), threading.Event()
        self._lock = threading.Lock()  # one caller at a time: the helper serves one job
        self._job: torch.Tensor | None = None
        self._out: torch.Tensor | BaseException | None = None
        threading.Thread(target=self._helper, name="lm-head", daemon=True).start()

    def _helper(self) -> None:
        bind_threads()
        while True:
            self._go.wait()
            self._go.clear()
            try:
                with torch.inference_mode():
                    b = None if self.bias is None else self.bias[self._half:]
                    self._out = torch.nn.functional.linear(self._job, self.weight[self._half:], b)
            except BaseException as exc:  # handed to the caller
                self._out = exc
            self._done.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        if x.shape[:-1].numel() != 1:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        with self._lock:
            self._job, self._out = x, None
            self._done.clear()
            self._go.set()
            try:
                a = torch.nn.functional.linear(x, self.weight[:self._half],
                                               None if self.bias is None else self.bias[:self._half])
            finally:
                # Even when this half raised: the helper's answer to this job must not be read
                # as the next caller's.
                self._done.wait()
                b, self._job = self._out, None
        if isinstance(b, BaseException):
            raise b
        return torch.cat([a, b], dim=-1)


def two_thread_head(model: torch.nn.Module) -> TwoThreadHead:
    """Put a :class:`TwoThreadHead` in place of ``model``'s LM head (idempotent); returns it."""
    head = model.get_output_embeddings()
    if not isinstance(head, TwoThreadHead):
        head = TwoThreadHead(head)
        model.set_output_embeddings(head)
    return head
