"""Reasoning accuracy of the TDEC protocol: multiple choice by summed log-likelihood, LAMBADA by greedy match.

Both rest on one primitive, `score_continuations`: for each (context, continuation) pair, the summed
log-probability of the continuation's tokens given the context, and whether greedy decoding would have
produced exactly those tokens. Jang et al. score options with no length normalisation (a long option is
penalised for its length); we keep that, since the numbers are meant to be compared with theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batches import pad_rows
from ..data.eval_tasks import Completion, MultipleChoice
from ..models import model_device


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


def pad_id(tokenizer) -> int:
    """Any id works as padding here (pads are never attended to nor scored): pad, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def score_continuations(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                        max_length: int = 512) -> list[ContinuationScore]:
    """Score many (context, continuation) pairs, `batch_size` sequences per forward pass.

    Pairs are run longest first (little padding; an out-of-memory shows on the first batch) and returned in
    input order. Right padding: a causal model's real tokens never see the pads that follow them, positions
    start at 0 for every row, and only the logits at real continuation positions are read. Only those
    positions go through log_softmax, in float32, so memory stays at one (batch, length, vocab) logits tensor.

    Slow equivalent (the test's reference): for each pair alone, no padding,
    `log_softmax(model(ids[:-1]).logits)[-n:]` gathered at `ids[-n:]` and summed."""
    encoded = [encode_pair(tokenizer, c, x, max_length) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device, pad = model_device(model), pad_id(tokenizer)
    out: list[ContinuationScore | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = pad_rows([encoded[i][0][:-1] for i in rows], pad)   # (B, T), (B, T)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # (B,T,V)
        for r, i in enumerate(rows):
            ids, n = encoded[i]
            end = len(ids) - 1                                                     # = len(inputs[r])
            logp = torch.log_softmax(logits[r, end - n:end].float(), dim=-1)       # (n, V)
            target = torch.tensor(ids[-n:], device=logp.device)                   # (n,)
            best = logp.argmax(-1)                                                 # (n,)
            out[i] = ContinuationScore(
                logprob=float(logp.gather(1, target[:, None]).sum()),
                greedy=bool((best == target).all()),
                n_tokens=n,
                argmax=tuple(best.tolist()),
            )
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
