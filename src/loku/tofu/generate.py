"""Greedy answers and their ROUGE recall against the ground truth, as TOFU scores them.

TOFU generates with `max_length=200` and no `max_new_tokens`: the 200 tokens include the (left-padded)
prompt, so how much an answer may say depends on the longest prompt in its batch of 30. Here each item
gets 200 minus its own prompt length (`max_new_tokens` overrides), the same result TOFU would give with
batch size 1 and independent of batching.
"""

from __future__ import annotations

import torch

from ..data.batches import pad_rows
from ..models import model_device

ROUGE_TYPES = ("rouge1", "rougeL")


def stop_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the model's generation EOS ids (chat models have several) and the
    tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def greedy_answers(model, tokenizer, prompts: list[list[int]], budgets: list[int],
                   batch_size: int = 8) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), at most `budgets[i]` new tokens, cut at the first
    stop token. Batches are left-padded and grouped by prompt length."""
    from transformers import GenerationConfig

    device, stops = model_device(model), stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start:start + batch_size] if budgets[i] > 0]
        if not idx:
            continue
        ids, mask = pad_rows([prompts[i] for i in idx], pad, "left")   # (B, W), (B, W)
        width = ids.shape[1]
        config.max_new_tokens = max(budgets[i] for i in idx)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)[:, width:].tolist()  # (B, new)
        for row, i in enumerate(idx):
            tokens = gen[row][: budgets[i]]
            cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            out[i] = tokens[:cut]
    return out


def rouge_recalls(generations: list[str], ground_truths: list[str]) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L recall of each generation against its ground truth (Porter stemmer), as
    TOFU's `eval_rouge_recall`: `scorer.score(target=ground truth, prediction=generation)`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {f"{t}_recall": [] for t in ROUGE_TYPES}
    for gen, gt in zip(generations, ground_truths):
        scores = scorer.score(gt, gen)
        for t in ROUGE_TYPES:
            out[f"{t}_recall"].append(scores[t].recall)
    return out
