"""Membership-inference attacks against slow transcriptions of OpenUnlearning's code.

Reference: locuslab/open-unlearning, commit d3d7cf9e6b3c125d16687d4232680d8d83548f1a:
src/evals/metrics/utils.py (evaluate_probability, tokenwise_logprobs, tokenwise_vocab_logprobs,
extract_target_texts_from_processed_data), src/evals/metrics/mia/{loss,zlib,min_k,min_k_plus_plus,reference,
utils}.py. The transcriptions below keep their arithmetic and run one example at a time (no padding).
OpenUnlearning signs scores like a loss (lower = member); loku's are the negation. Its token-wise attacks drop
each example's last scored token (its EOS), so they get each example with one extra trailing EOS token.
"""

import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from conftest import record_texts, tiny_llama
from loku.errors import LokuError
from loku.metrics.forward import text_features
from loku.metrics.membership import ATTACKS, attack_scores, auc, feature_scores, mean_losses, zlib_sizes

IGNORE_INDEX = -100


# ---- transcription of OpenUnlearning src/evals/metrics/utils.py ------------------------------------------------

def ou_evaluate_probability(model, batch):
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits
    labels = batch["labels"]
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
    losses = loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    num_token_gt = (batch["labels"] != IGNORE_INDEX).sum(-1)
    avg_losses = losses / num_token_gt
    normalized_probs = torch.exp(-avg_losses)
    return [{"prob": p, "avg_loss": a} for p, a in zip(normalized_probs.tolist(), avg_losses.tolist())]


def ou_tokenwise_logprobs(model, batch):
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits
    bsz, seq_len, V = logits.shape
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    next_tokens = batch["input_ids"][:, 1:].unsqueeze(-1)
    target_log_probs = torch.gather(log_probs, dim=2, index=next_tokens).squeeze(-1)
    log_probs_batch = []
    for i in range(bsz):
        labels = batch["labels"][i]
        actual_indices = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        log_probs_batch.append(target_log_probs[i, start_idx - 1: end_idx])
    return log_probs_batch


def ou_tokenwise_vocab_logprobs(model, batch):
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits
    bsz, seq_len, V = logits.shape
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    log_probs_batch = []
    for i in range(bsz):
        labels = batch["labels"][i]
        actual_indices = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        log_probs_batch.append(log_probs[i, start_idx - 1: end_idx])
    return log_probs_batch


def ou_target_texts(tokenizer, batch):
    labels = [elem[elem != -100] for elem in batch["labels"]]
    return [tokenizer.decode(elem.tolist(), skip_special_tokens=True) for elem in labels]


# ---- transcription of OpenUnlearning src/evals/metrics/mia/*.py ------------------------------------------------

def ou_loss(model, batch, tokenizer, k, ref):
    return ou_evaluate_probability(model, batch)[0]["avg_loss"]


def ou_zlib(model, batch, tokenizer, k, ref):
    loss = ou_evaluate_probability(model, batch)[0]["avg_loss"]
    text = ou_target_texts(tokenizer, batch)[0]
    return loss / len(zlib.compress(text.encode("utf-8")))


def ou_min_k(model, batch, tokenizer, k, ref):
    lp = ou_tokenwise_logprobs(model, batch)[0].float().cpu().numpy()
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ou_min_k_plus_plus(model, batch, tokenizer, k, ref):
    all_probs = ou_tokenwise_vocab_logprobs(model, batch)[0]
    target_prob = ou_tokenwise_logprobs(model, batch)[0]
    mu = (torch.exp(all_probs) * all_probs).sum(-1)
    sigma = (torch.exp(all_probs) * torch.square(all_probs)).sum(-1) - torch.square(mu)
    sigma = torch.clamp(sigma, min=1e-6)
    scores = (target_prob.float().cpu().numpy() - mu.float().cpu().numpy()) / torch.sqrt(sigma).cpu().numpy()
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def ou_reference(model, batch, tokenizer, k, ref):
    target = ou_evaluate_probability(model, batch)[0]["avg_loss"]
    reference = ou_evaluate_probability(ref, batch)[0]["avg_loss"]
    return target - reference


def ou_mia_auc(forget_scores, holdout_scores):
    """mia/utils.py mia_auc: forget labelled 0, holdout 1, scores signed like a loss."""
    scores = np.array(forget_scores + holdout_scores)
    labels = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    return roc_auc_score(labels, scores)


OU = {"loss": ou_loss, "zlib": ou_zlib, "min_k": ou_min_k, "min_k_plus_plus": ou_min_k_plus_plus,
      "reference": ou_reference}
TOKENWISE = {"min_k", "min_k_plus_plus"}  # the attacks whose OpenUnlearning code drops the last scored token


def ou_batch(feature: dict, eos: int, extra_eos: bool) -> dict:
    ids, labels = list(feature["input_ids"]), list(feature["labels"])
    if extra_eos:
        ids, labels = ids + [eos], labels + [eos]
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def ou_scores(attack, model, tokenizer, features, k=0.4, ref=None):
    return [OU[attack](model, ou_batch(f, tokenizer.eos_token_id, attack in TOKENWISE), tokenizer, k, ref)
            for f in features]


@pytest.fixture(scope="module")
def half_trained(memorized):
    """A model that knows the records partly: scores spread out instead of saturating."""
    from conftest import memorize

    _, tok, a, b = memorized
    return memorize(tiny_llama(len(tok), seed=3), tok, a, steps=40), tok, a, b


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("k", [0.4, 0.2])
def test_each_attack_equals_openunlearning(half_trained, attack, k):
    model, tok, a, b = half_trained
    texts = a[:5] + b[:5]
    features = text_features(tok, texts, max_tokens=48)
    features[1] = {**features[1], "input_ids": features[1]["input_ids"][:30], "labels": features[1]["labels"][:30]}
    ref = tiny_llama(len(tok), seed=9)
    got = feature_scores(model, features, tok.pad_token_id, attacks=[attack], k=k, zlib=zlib_sizes(tok, features),
                         reference_losses=mean_losses(ref, features, tok.pad_token_id), batch_size=4)[attack]
    want = ou_scores(attack, model, tok, features, k=k, ref=ref)
    assert len(set(np.round(want, 6))) > 5  # the scores really vary across examples
    np.testing.assert_allclose(got, [-w for w in want], rtol=2e-5, atol=2e-6)
    # AUC: loku's (higher = member) equals OpenUnlearning's (lower = member, forget labelled 0)
    assert auc(got[:5], got[5:]) == pytest.approx(ou_mia_auc(want[:5], want[5:]), abs=1e-12)


def test_qa_features_score_only_the_answer(half_trained):
    """With a prompt (labels -100), OpenUnlearning and loku score the same answer tokens."""
    from loku.data.qa import format_qa

    model, tok, a, _ = half_trained
    features = [format_qa(tok, t[:30], t[30:], 256) for t in a[:4]]   # answer ends with EOS (format_qa)
    for attack in ("loss", "min_k", "min_k_plus_plus"):
        got = feature_scores(model, features, tok.pad_token_id, attacks=[attack], batch_size=2)[attack]
        want = ou_scores(attack, model, tok, features)
        np.testing.assert_allclose(got, [-w for w in want], rtol=2e-5, atol=2e-6)


def test_memorized_set_is_told_apart(memorized):
    model, tok, a, b = memorized
    ma, mb = attack_scores(model, tok, a), attack_scores(model, tok, b)
    assert set(ma) == {"loss", "zlib", "min_k", "min_k_plus_plus"}   # no reference model: no reference attack
    assert auc(ma["loss"], mb["loss"]) > 0.9
    assert all(auc(ma[name], mb[name]) > 0.9 for name in ma)


def test_untrained_model_is_near_chance():
    from loku.models import ensure_pad_token
    from conftest import build_tokenizer

    tok = ensure_pad_token(build_tokenizer())
    texts = record_texts(80, seed=11)
    model = tiny_llama(len(tok), seed=5)
    ref = tiny_llama(len(tok), seed=6)
    s_a, s_b = attack_scores(model, tok, texts[:40], reference=ref), attack_scores(model, tok, texts[40:],
                                                                                  reference=ref)
    assert "reference" in s_a
    for name in s_a:   # 40 vs 40 from one distribution: AUC sd ~0.065 around 0.5
        assert 0.3 < auc(s_a[name], s_b[name]) < 0.7, name


def test_scores_do_not_depend_on_batching(half_trained):
    model, tok, a, b = half_trained
    one = attack_scores(model, tok, a[:6] + b[:3], batch_size=1)
    many = attack_scores(model, tok, a[:6] + b[:3], batch_size=4)
    for name in one:
        np.testing.assert_allclose(one[name], many[name], rtol=1e-5, atol=1e-6)


def test_reference_attack_needs_a_reference(memorized):
    model, tok, a, _ = memorized
    with pytest.raises(LokuError, match="reference model"):
        attack_scores(model, tok, a[:2], attacks=["reference"])
    with pytest.raises(LokuError, match="did you mean 'min_k'"):
        attack_scores(model, tok, a[:2], attacks=["min-k"])


def test_auc_is_sklearn_and_refuses_empty_sets():
    assert auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert auc([0.0], [1.0]) == 0.0
    assert auc([1.0, 0.0], [1.0, 0.0]) == 0.5
    with pytest.raises(LokuError, match="non-members"):
        auc([1.0], [])


def test_model_left_in_its_mode(memorized):
    model, tok, a, _ = memorized
    model.train()
    try:
        attack_scores(model, tok, a[:2])
        assert model.training
    finally:
        model.eval()
