"""`mesh bench halo`'s teacher-forced evaluation on the coordinator (an ask with ``halo_eval``):
perplexity, top-1 agreement and MMLU scores of the routed model, with the run's HALO figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mesh import wire
from mesh.errors import ProtocolError

if TYPE_CHECKING:
    from mesh.halo.engine import HaloEngine


def evaluate(engine: HaloEngine, spec: dict[str, Any], strict: bool) -> dict[str, Any]:
    """``{"ids": [...], "start": k, "score_ids": [...]}``: prefill ``ids[:k]``, then feed the rest
    one token at a time; per fed position the NLL of the true next token and the argmax, and at
    the end the logits of ``score_ids``."""
    ids, vocab = spec.get("ids"), engine.model.config.vocab_size
    score_ids = spec.get("score_ids", [])
    start = spec.get("start", 1)
    if (not isinstance(ids, list) or not 1 <= len(ids) <= wire.MAX_EVAL_IDS or not isinstance(score_ids, list)
            or not all(type(i) is int and 0 <= i < vocab for i in [*ids, *score_ids])
            or type(start) is not int or not 1 <= start <= len(ids)):
        raise ProtocolError("bad-halo-eval", "ids/start/score_ids")
    nll: list[float] = []
    top: list[int] = []
    with engine.run(strict, measure=True) as run:
        logits, cache = engine.decoder.prefill(ids[:start])
        for pos in range(start, len(ids)):
            nll.append(-float(torch.log_softmax(logits.float(), -1)[ids[pos]]))
            top.append(int(torch.argmax(logits)))
            if pos + 1 < len(ids) or score_ids:
                logits = engine.decoder.next_logits(ids[pos], cache)
    figures = run.figures()
    times = figures.pop("token_times_s")
    return {"prompt_tokens": len(ids), "halo": figures,
            "tpot_s": round(sum(times[1:]) / len(times[1:]), 6) if len(times) > 1 else None,
            "eval": {"nll": nll, "argmax": top, "scores": [float(logits[i]) for i in score_ids]}}
