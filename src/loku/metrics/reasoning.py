"""Reasoning accuracy of the TDEC protocol: multiple choice by summed log-likelihood, LAMBADA by greedy match.

Both rest on one primitive, `score_continuations`: for each (context, continuation) pair, the summed
log-probability of the continuation's tokens given the context, and whether greedy decoding would have
produced exactly those tokens. Jang et al. score options with no length normalisation (a long option is
penalised for its length); we keep that, since the numbers are meant to be compared with theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.eval_tasks import Completion, MultipleChoice
from ..losses import sequence_logprob
from .extraction import argmax_hits
from .forward import pad_id, teacher_forced


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float   # sum over the continuation's tokens of log p(token | everything before it)
    greedy: bool     # every continuation token is the argmax at its position
    n_tokens: int
    argmax: tuple[int, ...] = ()  # the argmax token at each continuation position (teacher-forced)


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context + continuation, and how many of them are the continuation.

    The two are tokenized separately (as Jang et al. and lm-evaluation-harness do), so the option's tokens
    are the same whatever the context. The context gets the tokenizer's special tokens (a BOS where the
    model has one), the continuation none; an empty context is replaced by the BOS/EOS token so the first
    option token has something to condition on. Too long a pair loses tokens on the LEFT, keeping the
    question and the option (Jang et al. first cut the context on the right to 512 tokens)."""
    ctx = tokenizer(context).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    if not cont:
        raise ValueError(f"continuation {continuation!r} has no tokens")
    if not ctx:
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    ids = (ctx + cont)[-(max_length + 1):]  # the last token is only a target: inputs are ids[:-1]
    return ids, min(len(cont), len(ids) - 1)


def score_continuations(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                        max_length: int = 512) -> list[ContinuationScore]:
    """Score many (context, continuation) pairs, `batch_size` sequences per teacher-forced pass
    (`loku.metrics.forward`: right padding, masked; only the continuation tokens are labelled), in input order.

    Slow equivalent (the test's reference): for each pair alone, no padding,
    `log_softmax(model(ids[:-1]).logits)[-n:]` gathered at `ids[-n:]` and summed."""
    encoded = [encode_pair(tokenizer, c, x, max_length) for c, x in pairs]
    features = [{"input_ids": ids, "labels": [-100] * (len(ids) - n) + ids[-n:]} for ids, n in encoded]
    out: list[ContinuationScore | None] = [None] * len(encoded)
    for idx, logits, labels in teacher_forced(model, features, pad_id(tokenizer), batch_size):
        logprob = sequence_logprob(logits, labels)                                 # (b,)
        hit, mask = argmax_hits(logits, labels)                                    # (b, T-1)
        best = logits[:, :-1].argmax(-1)                                           # (b, T-1)
        for r, i in enumerate(idx):
            out[i] = ContinuationScore(logprob=float(logprob[r]), greedy=bool(hit[r][mask[r]].all()),
                                       n_tokens=encoded[i][1], argmax=tuple(best[r][mask[r]].tolist()))
    return out  # type: ignore[return-value]


def multiple_choice_results(model, tokenizer, items: list[MultipleChoice], batch_size: int = 8,
                            max_length: int = 512) -> list[dict]:
    """Per item: index, option log-likelihoods, prediction (first best on ties, as argmin in Jang et al.),
    gold, correct (1.0/0.0). All options of all items are scored in the same batched pass."""
    pairs = [(it.context, opt) for it in items for opt in it.options]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size, max_length))
    results = []
    for index, it in enumerate(items):
        logprobs = [next(scores).logprob for _ in it.options]
        pred = max(range(len(logprobs)), key=lambda k: (logprobs[k], -k))
        results.append({"index": index, "prediction": pred, "gold": it.gold, "correct": float(pred == it.gold),
                        "scores": logprobs})
    return results


def completion_results(model, tokenizer, items: list[Completion], batch_size: int = 8,
                       max_length: int = 512) -> list[dict]:
    """LAMBADA per item: correct (1.0/0.0) when the greedy continuation's tokens equal the target's tokens;
    `prediction` is the decoded argmax at each target position (teacher-forced, so after the first wrong
    token it is not what free generation would write).

    One teacher-forced pass suffices: greedy generation reproduces the target iff the argmax at every target
    position is the target token. Jang et al. also count an item correct when the decoded argmax text
    matches after SQuAD normalisation; we keep the stricter token test (it differs only on case/punctuation)."""
    scores = score_continuations(model, tokenizer, [(it.context, it.target) for it in items], batch_size,
                                 max_length)
    return [{"index": i, "prediction": tokenizer.decode(list(s.argmax)), "gold": it.target,
             "correct": float(s.greedy), "scores": [s.logprob]}
            for i, (it, s) in enumerate(zip(items, scores))]
