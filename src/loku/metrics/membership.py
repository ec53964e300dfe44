"""Membership inference: per-example scores of how likely a model was trained on a text, and their ROC AUC.

loku's convention: **a higher score means "more likely a member" (trained on)**, for every attack, and
`auc(members, nonmembers)` is the probability that a random member outscores a random non-member (1.0: the
model gives itself away on every pair; 0.5: members and non-members are indistinguishable; below 0.5: the
members look *less* familiar than never-seen text, which also gives them away).

OpenUnlearning (`src/evals/metrics/mia/`) signs every statistic the other way ("higher the score on an
example, less likely the membership", like a loss) and computes its AUC with the forget set labelled 0 and
the holdout 1; its AUC equals loku's on the same data (a sign flip of the scores together with a swap of
the labels leaves ROC AUC unchanged; tested).

Attacks (each over the scored tokens of an example: labels != -100, positions 1..T-1):
- `loss` (Yeom et al. 2018): minus the mean token cross-entropy.
- `zlib` (Carlini et al. 2021): minus the mean cross-entropy over the zlib-compressed size in bytes of the
  example's scored text (decoded without special tokens, as OpenUnlearning's `zlib.py`).
- `min_k` (Shi et al. 2024): the mean of the k share lowest token log-probabilities (at least one token;
  k = 0.4 as OpenUnlearning's configs).
- `min_k_plus_plus` (Zhang et al. 2024): the same over each token's log-probability standardised by the mean
  and standard deviation of log p under the model's own next-token distribution at that position
  (variance floored at 1e-6, as OpenUnlearning).
- `reference` (Carlini et al. 2022): the reference model's mean cross-entropy minus the model's (a
  reference model is any model that did not see the data, e.g. the base model before fine-tuning).

One difference from OpenUnlearning's code, on purpose: its token-wise attacks (Min-K%, Min-K%++; and
`tokenwise_logprobs` in general) drop each example's last scored token, meant as the end-of-sequence token
its chat formatting appends; loku scores every scored token, so all attacks see the same tokens (its
formatting of plain text has no EOS; for QA data the EOS loku's formatting appends is scored by every attack
alike). Tests compare with a transcription of OpenUnlearning's code given one extra trailing token.
"""

from __future__ import annotations

import zlib

import torch
from sklearn.metrics import roc_auc_score

from ..errors import LokuError
from .forward import check_features, per_feature, teacher_forced, text_features

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")
VARIANCE_FLOOR = 1e-6  # OpenUnlearning's min_k_plus_plus.py: sigma = clamp(var, min=1e-6)


# ---- pure functions over (logits, labels) -------------------------------------------------------------------

def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each next token (B, T-1), mask of the scored ones (B, T-1), the full log-softmax (B, T-1, V))."""
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != -100
    token = log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return token, mask, log_p


def mean_loss(token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored tokens of each row: (B,)."""
    return -(token * mask).sum(-1) / mask.sum(-1)


def lowest_k_mean(values: torch.Tensor, mask: torch.Tensor, k: float, at_least_one: bool = True) -> torch.Tensor:
    """Mean of the max(1, int(k x n)) smallest scored values of each row (n scored tokens): (B,).
    `at_least_one=False` takes int(k x n) as muse_bench does: NaN for a row where that is 0."""
    n = mask.sum(-1)  # (B,)
    take = (n.double() * k).floor()  # python's int(n * k), in float64 as there
    take = (take.clamp(min=1) if at_least_one else take).long()
    ordered = values.masked_fill(~mask, float("inf")).sort(-1).values  # (B, T-1), scored values first
    keep = torch.arange(values.shape[-1], device=values.device) < take[:, None]  # (B, T-1)
    return torch.where(keep, ordered, 0.0).sum(-1) / take


def standardized_log_probs(token: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Min-K%++'s token statistic (log p(x_t) - mu_t) / sigma_t, with mu_t and sigma_t^2 the mean and variance
    of log p(z) for z drawn from the model's next-token distribution at t: (B, T-1)."""
    p = log_p.exp()
    mu = (p * log_p).sum(-1)  # (B, T-1)
    var = (p * log_p.square()).sum(-1) - mu.square()
    return (token - mu) / var.clamp(min=VARIANCE_FLOOR).sqrt()


def membership_scores(logits: torch.Tensor, labels: torch.Tensor, *, k: float = 0.4,
                      zlib_sizes: list[int] | None = None, attacks=ATTACKS) -> dict[str, torch.Tensor]:
    """Every requested attack but `reference` (which needs a second model) from one batch's logits: name -> (B,)
    float64 scores, higher = more likely a member. `zlib` needs the rows' `zlib_sizes`."""
    token, mask, log_p = token_log_probs(logits, labels)
    loss = mean_loss(token, mask)
    out = {}
    if "loss" in attacks:
        out["loss"] = -loss
    if "zlib" in attacks:
        if zlib_sizes is None:
            raise ValueError("the zlib attack needs each row's zlib size (zlib_size of its scored text)")
        out["zlib"] = -loss / torch.tensor(zlib_sizes, dtype=loss.dtype, device=loss.device)
    if "min_k" in attacks:
        out["min_k"] = lowest_k_mean(token, mask, k)
    if "min_k_plus_plus" in attacks:
        out["min_k_plus_plus"] = lowest_k_mean(standardized_log_probs(token, log_p), mask, k)
    return {name: v.double() for name, v in out.items()}


def zlib_size(text: str) -> int:
    """Bytes of zlib's default compression of the UTF-8 text: Carlini et al.'s zlib entropy."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_sizes(tokenizer, features: list[dict]) -> list[int]:
    """zlib size of each feature's scored text (its labelled tokens decoded without special tokens, as
    OpenUnlearning's `extract_target_texts_from_processed_data`)."""
    return [zlib_size(tokenizer.decode([t for t in f["labels"] if t != -100], skip_special_tokens=True))
            for f in features]


# ---- models --------------------------------------------------------------------------------------------------

def mean_losses(model, features: list[dict], pad_id: int, batch_size: int = 8) -> list[float]:
    """Mean cross-entropy of each feature's scored tokens (what the reference attack needs of its model)."""
    def measure(logits, labels):
        return {"loss": mean_loss(*token_log_probs(logits, labels)[:2])}

    return per_feature(model, features, pad_id, measure, batch_size).get("loss", [])


def reference_scores(reference_losses: list[float], losses: list[float]) -> list[float]:
    """The reference attack: the reference model's loss minus the model's (higher = more likely a member)."""
    return [r - m for r, m in zip(reference_losses, losses)]


def feature_scores(model, features: list[dict], pad_id: int, *, attacks=ATTACKS, k: float = 0.4,
                   zlib: list[int] | None = None, reference_losses: list[float] | None = None,
                   batch_size: int = 8) -> dict[str, list[float]]:
    """Scores of tokenized features, one forward pass per batch for every attack (the reference model's losses
    come precomputed, `mean_losses(reference, ...)`, since they do not change with the model audited)."""
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        from ..registry import unknown_choice

        raise unknown_choice("membership attack", unknown[0], ATTACKS)
    if "reference" in attacks and reference_losses is None:
        raise LokuError("the reference attack needs a reference model: pass reference= (a model that never saw "
                        "the data, e.g. the one before fine-tuning), or leave 'reference' out of attacks")
    check_features(features)
    wanted = tuple(a for a in attacks if a != "reference") + (("loss",) if "reference" in attacks else ())
    out = {a: [0.0] * len(features) for a in wanted}
    for idx, logits, labels in teacher_forced(model, features, pad_id, batch_size):
        batch = membership_scores(logits, labels, k=k, zlib_sizes=None if zlib is None else [zlib[i] for i in idx],
                                  attacks=wanted)
        for name, values in batch.items():
            for i, v in zip(idx, values.tolist()):
                out[name][i] = v
    if "reference" in attacks:
        out["reference"] = reference_scores(reference_losses, [-v for v in out["loss"]])
    return {a: out[a] for a in attacks}


def tokenize(tokenizer, items: list, max_tokens: int | None = None, prompt_format: str = "auto") -> list[dict]:
    """Strings as plain text (no special tokens, every token but the first scored); {"question", "answer"}
    dicts in loku's QA format `prompt_format` (only the answer scored; see loku.data.qa)."""
    from ..data.qa import format_qa

    if all(isinstance(x, str) for x in items):
        return text_features(tokenizer, items, max_tokens)
    out = []
    for i, x in enumerate(items):
        if isinstance(x, dict) and "question" in x and "answer" in x:
            out.append(format_qa(tokenizer, x["question"], x["answer"], max_tokens or tokenizer.model_max_length,
                                 prompt_format))
        elif isinstance(x, dict) and "text" in x:
            out.extend(text_features(tokenizer, [x["text"]], max_tokens))
        elif isinstance(x, str):
            out.extend(text_features(tokenizer, [x], max_tokens))
        else:
            raise LokuError(f"item {i + 1} is neither text nor a question/answer pair: give strings or "
                            '{"question": ..., "answer": ...} dicts')
    return out


def attack_scores(model, tokenizer, texts: list, attacks=None, k: float = 0.4, reference=None,
                  batch_size: int = 8, max_tokens: int | None = None,
                  prompt_format: str = "auto") -> dict[str, list[float]]:
    """Membership scores of each text (or QA pair) under each attack, higher = more likely trained on.

    `attacks`: names from ATTACKS (default: all, `reference` only when a reference model is given). One
    forward pass per batch of the model gives every attack; the reference model makes its own pass."""
    if attacks is None:
        attacks = [a for a in ATTACKS if a != "reference" or reference is not None]
    features = tokenize(tokenizer, list(texts), max_tokens, prompt_format)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ref = mean_losses(reference, features, pad, batch_size) if reference is not None and "reference" in attacks \
        else None
    return feature_scores(model, features, pad, attacks=attacks, k=k,
                          zlib=zlib_sizes(tokenizer, features) if "zlib" in attacks else None,
                          reference_losses=ref, batch_size=batch_size)


def auc(members, nonmembers) -> float:
    """ROC AUC (scikit-learn) of telling members from non-members by score (higher = member): the probability
    that a random member scores above a random non-member, ties counting half."""
    members, nonmembers = list(members), list(nonmembers)
    if not members or not nonmembers:
        raise LokuError(f"a membership AUC needs members and non-members, got {len(members)} and "
                        f"{len(nonmembers)}: give both sets at least one example")
    return float(roc_auc_score([1] * len(members) + [0] * len(nonmembers), members + nonmembers))
