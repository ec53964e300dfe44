"""MA and EL_n (loku.metrics.extraction) against a slow reference written straight from the definition.

Tiny models are trained for a few seconds to memorize some random sequences fully, others only in their
first half, and not at all the rest, so the metrics have something to tell apart."""

import pytest
import torch
from conftest import tiny_gptneo, tiny_llama

from loku.errors import LokuError
from loku.metrics import (extraction_likelihood, extraction_metrics, greedy_suffixes, memorization_accuracy,
                          memorization_metrics)
from loku.metrics.extraction import overlap

T, N = 36, 10  # 36 > the tiny GPT-Neo's local window (32), so its sliding attention is exercised
GROUPS = {"memorized": [0, 1], "half": [2, 3], "none": [4, 5]}



def reference(model, rows: list[list[int]], n: int):
    """For each prefix t, greedy-decode up to T tokens by re-running the whole sequence every step (no cache,
    no sharing between prefixes); MA from each prefix's first greedy token, EL_n from plain n-gram counting."""
    length = len(rows[0])
    conts = {}  # t -> (B, T - t) continuations
    with torch.no_grad():
        for t in range(1, length):
            seq = torch.tensor(rows)[:, :t]
            while seq.shape[1] < length:
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1)  # (B,)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
            conts[t] = seq[:, t:].tolist()
    ma, el = [], []
    for b, x in enumerate(rows):
        ma.append(sum(conts[t][b][0] == x[t] for t in range(1, length)) / (length - 1))
        total = 0.0
        for t in range(1, length):
            truth = [tuple(x[i:i + n]) for i in range(t, length - n + 1)]
            if not truth:
                continue
            gen = conts[t][b]
            found = sum(tuple(gen[i:i + n]) in set(truth) for i in range(len(gen) - n + 1))
            total += found / len(truth)
        el.append(total / (length - n))
    return ma, el, conts


def _train(model, rows):
    """Adam on the full 'memorized' rows and the first half of the 'half' rows until they are reproduced.
    The model stays in eval mode: no dropout (GPT-Neo's default 0.1 would slow memorization)."""
    full = torch.tensor([rows[i] for i in GROUPS["memorized"]])
    half = torch.tensor([rows[i][:T // 2] for i in GROUPS["half"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(input_ids=full, labels=full).loss + model(input_ids=half, labels=half).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module", params=["llama", "gptneo"])
def trained(request, tokenizer):
    """Rows of distinct random token ids (no token repeats anywhere, so full memorization is possible)."""
    g = torch.Generator().manual_seed(1)
    rows = (1 + torch.randperm(len(tokenizer) - 1, generator=g)[:6 * T]).view(6, T).tolist()
    build = {"llama": tiny_llama, "gptneo": tiny_gptneo}[request.param]
    model = _train(build(len(tokenizer)), rows)
    return model, rows, reference(model, rows, N), memorization_metrics(model, torch.tensor(rows), N)


def test_fast_equals_reference(trained):
    model, rows, (ref_ma, ref_el, ref_conts), out = trained
    assert out["ma"].tolist() == ref_ma  # exact: both are count / (T-1)
    assert torch.allclose(out["el"], torch.tensor(ref_el, dtype=torch.float64), rtol=0, atol=1e-6)
    assert memorization_accuracy(model, torch.tensor(rows)).tolist() == ref_ma
    assert torch.equal(extraction_likelihood(model, torch.tensor(rows), N, batch_size=4, decode_batch_size=5),
                       out["el"])
    # Every spliced continuation is the token-for-token greedy continuation, with other batching too.
    s = greedy_suffixes(model, torch.tensor(rows), batch_size=4, decode_batch_size=7)
    assert all(s.continuation(b, t) == ref_conts[t][b] for t in ref_conts for b in range(len(rows)))
    assert 0 < out["decoded_tokens"] < len(rows) * (T - 1) * (T - 2) / 2  # less than the per-prefix loop
    # Decode batches spread over worker threads (one intra-op thread each): the same tokens, torch's threads restored.
    threads = torch.get_num_threads()
    s = greedy_suffixes(model, torch.tensor(rows), batch_size=4, decode_batch_size=3, workers=3)
    assert all(s.continuation(b, t) == ref_conts[t][b] for t in ref_conts for b in range(len(rows)))
    assert torch.get_num_threads() == threads


def test_memorized_beats_half_beats_none(trained):
    out = trained[-1]
    mean = {k: {m: float(out[m][idx].mean()) for m in ("ma", "el")} for k, idx in GROUPS.items()}
    for m in ("ma", "el"):
        assert mean["memorized"][m] > mean["half"][m] > mean["none"][m], (m, mean)
        assert ((out[m] >= 0) & (out[m] <= 1)).all()
    assert mean["memorized"]["ma"] == 1.0 and mean["memorized"]["el"] == 1.0


def test_texts_and_training_mode_restored(trained, tokenizer):
    """Texts are tokenized without special tokens, cut to max_length, batched by length, returned in order."""
    model, rows, _, _ = trained
    texts = [tokenizer.decode(rows[i]) for i in (0, 2, 4)] + [tokenizer.decode(rows[0][:10])]  # about 18 tokens
    model.train()
    res = extraction_metrics(model, tokenizer, texts, n=N, max_length=T - 4)
    assert model.training
    model.eval()
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:T - 4]
        alone = memorization_metrics(model, torch.tensor([ids]), N)
        assert (res["ma"][i], res["el"][i], res["tokens"][i]) == (alone["ma"].item(), alone["el"].item(), len(ids))
    assert res["tokens"][3] < res["tokens"][0] == T - 4
    assert res["el_mean"] == pytest.approx(sum(res["el"]) / 4) and res["n"] == N


def test_overlap_counts_with_repetition_against_the_set():
    assert overlap([1, 2, 1, 2], [1, 2, 1, 2], 2) == 1.0  # truth n-grams (1,2),(2,1),(1,2): 3 of 3
    assert overlap([1, 2, 1, 2, 1], [1, 2, 9, 9, 9], 2) == 2 / 4  # (1,2) twice; (2,1) is not a true n-gram
    assert overlap([7, 7], [7, 7], 3) is None  # suffix shorter than n: skipped, adds 0


def test_too_short_is_a_clear_error(tokenizer):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(LokuError, match=r"row 0.*8 tokens.*EL_10 needs at least 11"):
        extraction_likelihood(model, torch.randint(1, 100, (2, 8)), n=10)
    with pytest.raises(LokuError, match=r"text 1 has \d+ tokens.*at least 11"):
        extraction_metrics(model, tokenizer, ["word " * 30, "hi"], n=10)
    with pytest.raises(LokuError, match="integer tensor"):
        memorization_accuracy(model, torch.zeros(4))
