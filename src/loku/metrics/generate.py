"""Greedy generation in left-padded batches: what TOFU's answers, MUSE's VerbMem/KnowMem continuations and
the TDEC dialogue replies are scored from.

Each prompt (token ids) gets its own budget of new tokens and stops at the first stop token, so a result
does not depend on which prompts share its batch: it is what one-prompt `model.generate` gives.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..data.batches import pad_rows
from ..models import model_device


def stop_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the model's generation EOS ids (chat models have several) and the
    tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def greedy_answers(model, tokenizer, prompts: list[list[int]], budgets: list[int], batch_size: int = 8, *,
                   stop_strings: list[str] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), at most `budgets[i]` new tokens, cut at the first
    stop token. Batches are left-padded and grouped by prompt length. `stop_strings` only ends a batch
    early once every row has written one (the caller cuts the text); `progress` is told each batch's size.

    Slow equivalent (the tests'): each prompt alone, `model.generate(ids, max_new_tokens=budget,
    do_sample=False)`, cut at the first EOS."""
    from transformers import GenerationConfig

    device, stops = model_device(model), stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad,
                              stop_strings=stop_strings)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        idx = [i for i in rows if budgets[i] > 0]
        if idx:
            ids, mask = pad_rows([prompts[i] for i in idx], pad, "left")   # (B, W), (B, W)
            width = ids.shape[1]
            config.max_new_tokens = max(budgets[i] for i in idx)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 tokenizer=tokenizer if stop_strings else None)[:, width:].tolist()  # (B, new)
            for row, i in enumerate(idx):
                tokens = gen[row][: budgets[i]]
                cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
                out[i] = tokens[:cut]
        if progress:
            progress(len(rows))
    return out
