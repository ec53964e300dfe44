"""Extraction strength (ES) and exact memorization (EM) from one teacher-forced pass, against
(1) the greedy-decoding definition, decoded token by token without a cache, and
(2) a transcription of OpenUnlearning's code: locuslab/open-unlearning, commit
d3d7cf9e6b3c125d16687d4232680d8d83548f1a, src/evals/metrics/memorization.py (extraction_strength,
exact_memorization) over src/evals/metrics/utils.py tokenwise_vocab_logprobs(return_labels=True).
"""

import pytest
import torch

from conftest import memorize, tiny_llama
from loku.metrics.extraction import extraction_metrics, extraction_strength, teacher_forced_memorization
from loku.metrics.forward import text_features

IGNORE_INDEX = -100


@pytest.fixture(scope="module")
def partly(memorized):
    """Models at three stages of memorizing A: extraction strength spread over (0, 1)."""
    full, tok, a, b = memorized
    return [memorize(tiny_llama(len(tok), seed=4), tok, a, steps=s) for s in (50, 60)] + [full], tok, a, b


@torch.no_grad()
def greedy_es(model, prompt: list[int], target: list[int]) -> float:
    """ES by its definition: the smallest k such that greedy decoding from prompt + target[:k] emits exactly
    target[k:] (decoded one token at a time, the whole context re-run each step)."""
    L = len(target)
    for k in range(L + 1):
        ids = prompt + target[:k]
        ok = True
        for j in range(k, L):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt != target[j]:
                ok = False
                break
            ids = ids + [nxt]
        if ok:
            return 1 - k / L
    raise AssertionError("unreachable: k = L always reproduces the empty suffix")


def ou_es_em(model, feature: dict, eos: int) -> tuple[float, float]:
    """memorization.py's _extraction_strength / _exact_memorization for one example, which gets one extra
    trailing EOS token because tokenwise_vocab_logprobs drops the last scored token."""
    ids, labels = feature["input_ids"] + [eos], feature["labels"] + [eos]
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        logits = model(**batch).logits
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    lab = batch["labels"][0]
    actual_indices = (lab != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
    start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
    log_probs, labels = log_probs[0, start_idx - 1: end_idx], lab[actual_indices]
    valid_len = len(labels)
    preds = torch.argmax(log_probs, dim=-1)
    for k in range(valid_len):
        if torch.equal(preds[k:], labels[k:]):
            break
    es = 1 - (k / valid_len)
    em = ((preds == labels).sum() / valid_len).item()
    return es, em


def _features(tok, texts, prompt_tokens=0):
    feats = text_features(tok, texts, max_tokens=40)
    if prompt_tokens:   # the first tokens become an unscored prompt, as in QA data and prefix probes
        feats = [{**f, "labels": [IGNORE_INDEX] * prompt_tokens + f["labels"][prompt_tokens:]} for f in feats]
    return feats


@pytest.mark.parametrize("prompt_tokens", [0, 12])
def test_es_equals_greedy_decoding(partly, prompt_tokens):
    models, tok, a, b = partly
    values = []
    for model in models:
        feats = _features(tok, a[:3] + b[:2], prompt_tokens)
        got = teacher_forced_memorization(model, feats, tok.pad_token_id, batch_size=3)["es"]
        for f, es in zip(feats, got):
            start = next(i for i, label in enumerate(f["labels"]) if label != IGNORE_INDEX)
            assert es == pytest.approx(greedy_es(model, f["input_ids"][:start], f["input_ids"][start:]), abs=1e-12)
        values += got
    assert min(values) == 0.0 and max(values) == 1.0 and any(0 < v < 1 for v in values)  # every regime seen


def test_es_em_equal_openunlearning(partly):
    models, tok, a, b = partly
    differ = 0
    for model in models:
        feats = _features(tok, a[:4] + b[:4])
        got = teacher_forced_memorization(model, feats, tok.pad_token_id, batch_size=8)
        for f, es, em in zip(feats, got["es"], got["em"]):
            ou_es, ou_em = ou_es_em(model, f, tok.eos_token_id)
            assert em == pytest.approx(ou_em, abs=1e-6)
            with torch.no_grad():
                last_hit = int(model(input_ids=torch.tensor([f["input_ids"]])).logits[0, -2].argmax()) == \
                    f["input_ids"][-1]
            L = len(f["input_ids"]) - 1
            if last_hit:
                assert es == pytest.approx(ou_es, abs=1e-12)
            else:   # OpenUnlearning's loop stops at k = L - 1 when no suffix matches; loku's definition at L
                assert (es, ou_es) == (0.0, pytest.approx(1 / L))
                differ += 1
    assert differ > 0   # the difference was exercised


def test_em_is_ma_on_plain_text(memorized):
    model, tok, a, b = memorized
    got = extraction_strength(model, tok, a[:4] + b[:4], max_tokens=50)
    ma = extraction_metrics(model, tok, a[:4] + b[:4], max_length=50)["ma"]
    assert got["em"] == pytest.approx(ma, abs=1e-12)
    assert got["es_mean"] > 0 and got["es"][:4] == pytest.approx([1.0] * 4, abs=0.1)
