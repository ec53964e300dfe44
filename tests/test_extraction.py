"""MA and EL_n (loku.metrics.extraction) against two slow references: a greedy loop written straight from the
definition (no cache: every continuation token checked), and a transcription of Jang et al.'s own EL code
(per-sequence `generate` of each prefix: the EL values checked exactly).

Tiny models are trained for a few seconds to memorize some random sequences fully, others only in their
first half, and not at all the rest, so the metrics have something to tell apart."""

from contextlib import contextmanager

import pytest
import torch
from transformers import GenerationConfig
from conftest import tiny_gptneo, tiny_llama

from loku.errors import LokuError
from loku.metrics import (extraction_likelihood, extraction_metrics, greedy_suffixes, memorization_accuracy,
                          memorization_metrics, ragged_metrics)
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


@contextmanager
def never_stopping(model):
    """loku's one deliberate difference from Jang et al.: decoding never stops at EOS (their `generate` does, and
    then pads). The tiny models' EOS is token 0, which greedy decoding of unknown text can emit, so the reference's
    `generate` runs with the model's EOS unset; the reference asserts every continuation has full length."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def ngram_of_1d_tensor(x: torch.Tensor, n: int) -> list[tuple]:
    return [tuple(x[i:i + n].tolist()) for i in range(x.shape[0] - n + 1)]


@torch.no_grad()
def jang_ma_el(model, row: list[int], ns: tuple[int, ...]) -> tuple[float, dict[int, float]]:
    """MA and EL_n of one sequence, transcribed from joeljang/knowledge-unlearning, models/Neo_Model.py
    (`Neo.validation_el`, `Neo.validation_ma`, `Neo.ngram_of_1D_tensor`), for a batch of one row whose
    `max_len` is its own length: for each prefix i, longest first, greedy `generate` to max_len; the
    numerator adds (generated n-grams found in the set of true-suffix n-grams) / (true-suffix n-grams),
    skipping a suffix with no n-gram (ZeroDivisionError); EL_n = numerator / (max_len - 1 - (n - 1)).
    MA: validation_ma's `generate(prompt, max_length=i + 1)[:, -1]` is the first generated token here."""
    greedy = GenerationConfig(do_sample=False, num_beams=1, pad_token_id=0)
    input_ids = torch.tensor([row])
    max_len = input_ids.shape[1]
    numerator = {n: 0 for n in ns}
    hits = 0
    for i in reversed(range(1, max_len)):
        label = input_ids[..., i:max_len]
        prompt = input_ids[..., :i]
        pred = model.generate(prompt, generation_config=greedy, max_length=max_len)[..., i:]
        assert pred.shape[-1] == max_len - i  # decoded to the end, as loku does
        p, l = pred[0], label[0]
        hits += int(p[0] == l[0])
        for n in ns:
            p_ngram = ngram_of_1d_tensor(p, n)
            l_ngram = ngram_of_1d_tensor(l, n)
            l_unique = set(l_ngram)
            p_tp = [g for g in p_ngram if g in l_unique]
            try:
                numerator[n] += len(p_tp) / len(l_ngram)
            except ZeroDivisionError:  # n-gram isn't defined
                pass
    return hits / (max_len - 1), {n: numerator[n] / (max_len - 1 - (n - 1)) for n in ns}


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


NS = (1, 4, N)
RAGGED = [(0, T), (2, 30), (4, T), (1, 24), (3, 17), (5, 30)]  # (row, its length): three groups of lengths


def test_el_equals_jang_et_al_exactly(trained):
    """Per-sequence `generate` of each prefix (Jang et al.'s code, transcribed) against the fast path, value for
    value (the same float operations in the same order), for several n, rows of several lengths pooled by
    length, on one thread and on decode workers (small decode batches, so there are several to share out)."""
    model, rows = trained[:2]
    ragged = [rows[r][:length] for r, length in RAGGED]
    with never_stopping(model):
        ref = [jang_ma_el(model, x, NS) for x in ragged]
    assert max(el[N] for _, el in ref) == 1.0 and min(el[N] for _, el in ref) < 0.5  # memorized and not
    for n in NS:
        for workers, pool_rows in ((1, 64), (3, 64), (2, 1)):
            out = ragged_metrics(model, ragged, n, batch_size=2, decode_batch_size=3, pool_rows=pool_rows,
                                 workers=workers)
            assert out["el"] == [el[n] for _, el in ref], (n, workers, pool_rows)
            assert out["ma"] == [ma for ma, _ in ref], (n, workers, pool_rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # workers default to torch's threads on CPU
    try:
        assert ragged_metrics(model, ragged, N, decode_batch_size=2)["el"] == [el[N] for _, el in ref]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_ragged_rows_too_short(trained):
    model, rows = trained[:2]
    with pytest.raises(LokuError, match=r"row 1 has 8 tokens but EL_10 needs at least 11"):
        ragged_metrics(model, [rows[0], rows[1][:8]], N)


def test_decode_progress_counts_every_token_decoded(trained):
    """The decoding's progress (the bar of `loku audit` and `--until forgotten`): each length group's tokens are
    planned before any of them is decoded, then each decode batch's are told as it ends, on worker threads too;
    planned and decoded both add up to `decoded_tokens`, and the values are those without progress."""
    model, rows = trained[:2]
    ragged = [rows[i][:length] for i, length in RAGGED]
    plain = ragged_metrics(model, ragged, N, decode_batch_size=3)
    for workers in (1, 3):
        calls = []
        out = ragged_metrics(model, ragged, N, decode_batch_size=3, workers=workers,
                             decode_progress=lambda planned, decoded: calls.append((planned, decoded)))
        assert (out["ma"], out["el"], out["decoded_tokens"]) == (plain["ma"], plain["el"], plain["decoded_tokens"])
        assert sum(p for p, _ in calls) == sum(d for _, d in calls) == out["decoded_tokens"] > 0
        groups, batches = sum(bool(p) for p, _ in calls), sum(bool(d) for _, d in calls)
        assert 1 < groups < batches   # length groups with something to decode, each of several batches
        planned = decoded = 0
        for p, d in calls:   # never more decoded than planned so far
            planned, decoded = planned + p, decoded + d
            assert decoded <= planned


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
