"""MUSE: every metric against a transcription of muse_bench's code (and OpenUnlearning's for its convention),
PrivLeak's sign and sides on a model that really memorized its forget set, the data layout, the CLI and bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_llama
from rouge_score import rouge_scorer
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score, roc_curve

from loku.data.records import make_records, record_text
from loku.errors import LokuError
from loku.muse import CONVENTIONS, MuseScoring, aggregate, evaluate_muse, load_muse, read_summary
from loku.muse.memorization import cut_at_stopwords, knowmem, knowmem_prompt, verbmem
from loku.metrics.membership import lowest_k_mean
from loku.muse.privleak import auc, privleak, privleak_eval
from loku.muse.run import chunk_corpus

MB, OU = CONVENTIONS["muse_bench"], CONVENTIONS["open-unlearning"]
TEXTS = [record_text(r) for r in make_records(16, seed=5)]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=3)


def greedy(model, ids, n):
    """One prompt, no padding: what muse_bench's `model.generate(input_ids, do_sample=False)` returns."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def decode(tok, ids):
    # muse_bench passes clean_up_tokenization_spaces=True, which transformers 5 ignores for BPE tokenizers
    return tok.decode(ids, skip_special_tokens=True)


def write_muse(root, model, tokenizer, corpus="news", drop=None):
    """A data folder whose muse/ holds a small corpus in muse_bench's data/ layout. Half the VerbMem truths and
    KnowMem answers are the model's own greedy continuations, so ROUGE sees both full and partial overlaps."""
    d = root / "muse" / corpus
    verb = []
    for i, t in enumerate(TEXTS[:6]):
        prompt, gt = t[:40], t[40:]
        if i % 2 == 0:
            gt = decode(tokenizer, greedy(model, tokenizer(prompt).input_ids, 24))
        verb.append({"prompt": prompt, "gt": gt})
    qa = [{"question": f"Where does {t.split(' lives')[0]} live?", "answer": t.split(" lives at ")[1].split(".")[0]}
          for t in TEXTS[6:12]]
    icl = [{"question": "Who wrote the book?", "answer": "The author wrote it in Paris."},
           {"question": "What do models do?", "answer": "Models memorize data."}]
    for i in (0, 3):
        ids = tokenizer(knowmem_prompt(icl, qa[i]["question"])).input_ids
        qa[i]["answer"] = cut_at_stopwords(decode(tokenizer, greedy(model, ids, 12))) or "x"
    files = {"verbmem/forget.json": verb, "knowmem/forget_qa.json": qa[:3], "knowmem/forget_qa_icl.json": icl,
             "knowmem/retain_qa.json": qa[3:], "knowmem/retain_qa_icl.json": icl,
             "privleak/forget.json": TEXTS[:5], "privleak/retain.json": TEXTS[5:8],
             "privleak/holdout.json": TEXTS[8:13], "raw/forget.json": TEXTS[:4], "raw/retain1.json": TEXTS[4:10]}
    for name, rows in files.items():
        if name == drop:
            continue
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory, model, tokenizer):
    return write_muse(tmp_path_factory.mktemp("muse") / "data", model, tokenizer)


# ---------------------------------------------------------------- transcriptions of the reference code
def mb_rouge(gt, output):
    """swj0419/muse_bench metrics/logger.py RougeEvalLogger.log: no stemmer, rougeL F-measure and recall."""
    s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False).score(gt, output)
    return s["rougeL"].fmeasure, s["rougeL"].recall


def mb_verbmem(model, tok, rows, max_new_tokens):
    """swj0419/muse_bench metrics/verbmem.py eval: one prompt at a time; the truth is the gt's first
    max_new_tokens tokens (special tokens counted) decoded; mean rougeL x 100 (eval.py)."""
    f1s = []
    for r in rows:
        ids = tok(r["prompt"], add_special_tokens=True).input_ids
        gt_short = decode(tok, tok(r["gt"], add_special_tokens=True).input_ids[:max_new_tokens])
        output = decode(tok, greedy(model, ids, max_new_tokens))
        f1s.append(mb_rouge(gt_short, output)[0])
    return 100 * sum(f1s) / len(f1s), f1s


def mb_knowmem(model, tok, qa, icl, max_new_tokens):
    """swj0419/muse_bench metrics/knowmem.py eval: the few-shot prompt, greedy, cut before the stop words."""
    general = ""
    for ex in icl:
        general += "Question: " + ex["question"] + "\nAnswer: " + ex["answer"] + "\n\n"
    f1s = []
    for r in qa:
        prompt = general + "Question: " + r["question"] + "\nAnswer: "
        out = decode(tok, greedy(model, tok(prompt, add_special_tokens=True).input_ids, max_new_tokens))
        for word in ["\n\n", "\nQuestion", "Question:"]:
            out = out.split(word)[0]
        f1s.append(mb_rouge(r["answer"], out)[0])
    return 100 * sum(f1s) / len(f1s), f1s


def mb_min_k(model, tok, text, ratio=0.4):
    """swj0419/muse_bench metrics/privleak.py compute_ppl + inference: log-probs of tokens 1.. of
    tokenizer.encode(text); Min-k = -mean of the int(n*ratio) smallest."""
    ids = torch.tensor(tok.encode(text)).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    logp = torch.nn.functional.log_softmax(logits, dim=-1)
    all_prob = [logp[0, i, t].item() for i, t in enumerate(ids[0][1:])]
    k_length = int(len(all_prob) * ratio)
    return float(-np.mean(np.sort(all_prob)[:k_length]))


def mb_auc(forget_scores, holdout_scores):
    """swj0419/muse_bench metrics/privleak.py eval/sweep for key forget_holdout: forget = 0, holdout = 1,
    roc_curve on -score, trapezoid AUC."""
    ppl = np.array(forget_scores + holdout_scores)
    y = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    fpr, tpr, _ = roc_curve(y, -ppl)
    return sk_auc(fpr, tpr)


def ou_min_k(model, tok, text, k=0.4, max_length=2048):
    """locuslab/open-unlearning: data/utils.py preprocess_pretraining_instance(prefix "") then
    evals/metrics/utils.py tokenwise_logprobs (labelled positions, last dropped) and mia/min_k.py compute_score."""
    prefix_len = len(tok("", add_special_tokens=True)["input_ids"])
    full = tok("" + text, add_special_tokens=True)["input_ids"][: prefix_len + max_length]
    matched = max(prefix_len, 1)
    labels = [-100] * matched + full[matched:]
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits
    logp = torch.log_softmax(logits, -1)[0, :-1]
    target = logp.gather(1, torch.tensor(full[1:])[:, None])[:, 0]
    idx = [i for i, x in enumerate(labels) if x != -100][:-1]
    lp = target[idx[0] - 1: idx[-1]].numpy()
    num_k = max(1, int(len(lp) * k))
    return float(-np.mean(np.sort(lp)[:num_k]))


def ou_privleak(forget_scores, holdout_scores, ref_auc_ou=None):
    """locuslab/open-unlearning mia/utils.py mia_auc (forget 0, holdout 1, roc_auc_score on the score) and
    metrics/privacy.py privleak (both flipped to 1 - x; ref_value 0.5 without retain logs)."""
    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    score = 1 - roc_auc_score(labels, forget_scores + holdout_scores)
    ref = 1 - (ref_auc_ou if ref_auc_ou is not None else 0.5)
    return (score - ref) / (ref + 1e-10) * 100


def ou_verbmem_truth(tok, prompt, gt, max_length=2048):
    """open-unlearning data/utils.py preprocess_pretraining_instance(insert_space=True) labels, decoded as
    evals/metrics/utils.py eval_text_similarity does (skip special tokens, strip)."""
    full = tok(prompt + " " + gt, add_special_tokens=True)["input_ids"]
    n = len(tok(prompt, add_special_tokens=True)["input_ids"])
    return decode(tok, full[:n + max_length][n:]).strip()


# ---------------------------------------------------------------- metrics
def test_verbmem_matches_muse_bench(model, tokenizer, muse_dir):
    rows = load_muse(muse_dir, "news", ["verbmem_f"])["verbmem/forget"]
    got = verbmem(model, tokenizer, rows, MB, max_new_tokens=24, batch_size=4)
    ref, f1s = mb_verbmem(model, tokenizer, rows, 24)
    assert got["value"] == pytest.approx(ref, abs=1e-9)
    assert [it["rougeL"] for it in got["items"]] == pytest.approx(f1s, abs=1e-12)
    assert max(f1s) > 0.5 > min(f1s)                  # the model's own continuations overlap, the rest not


def test_verbmem_open_unlearning_truth_and_stemmer(model, tokenizer, muse_dir):
    rows = load_muse(muse_dir, "news", ["verbmem_f"])["verbmem/forget"]
    got = verbmem(model, tokenizer, rows, OU, max_new_tokens=8, batch_size=3)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)   # eval_rouge_recall_batch
    for r, it in zip(rows, got["items"]):
        truth = ou_verbmem_truth(tokenizer, r["prompt"], r["gt"])
        out = decode(tokenizer, greedy(model, tokenizer(r["prompt"]).input_ids, 8)).strip()
        assert it["gt"] == truth and len(tokenizer(truth).input_ids) > 8   # the whole gt, not 8 tokens
        assert it["rougeL"] == pytest.approx(scorer.score(truth, out)["rougeL"].fmeasure, abs=1e-12)


@pytest.mark.parametrize("split", ["forget", "retain"])
def test_knowmem_matches_muse_bench(model, tokenizer, muse_dir, split):
    data = load_muse(muse_dir, "news", [f"knowmem_{split[0]}"])
    qa, icl = data[f"knowmem/{split}_qa"], data[f"knowmem/{split}_qa_icl"]
    got = knowmem(model, tokenizer, qa, icl, MB, max_new_tokens=12, batch_size=2)
    ref, f1s = mb_knowmem(model, tokenizer, qa, icl, 12)
    assert got["value"] == pytest.approx(ref, abs=1e-9)
    assert [it["rougeL"] for it in got["items"]] == pytest.approx(f1s, abs=1e-12)
    assert got["items"][0]["rougeL"] > 0.5 and got["value"] > 0   # item 0's answer is the model's own


def test_knowmem_prompt_is_muse_bench_few_shot():
    icl = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2."}]
    assert knowmem_prompt(icl, "Q3?") == "Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: A2.\n\nQuestion: Q3?\nAnswer: "
    assert cut_at_stopwords("Paris\nQuestion: more") == "Paris" and cut_at_stopwords("a\n\nb") == "a"


def test_privleak_matches_muse_bench(model, tokenizer, muse_dir):
    data = load_muse(muse_dir, "news", ["privleak"])
    forget, holdout = data["privleak/forget"], data["privleak/holdout"]
    got = privleak_eval(model, tokenizer, forget, holdout, MB, k=0.4, batch_size=3)
    ref_f = [mb_min_k(model, tokenizer, t) for t in forget]
    ref_h = [mb_min_k(model, tokenizer, t) for t in holdout]
    assert [x["score"] for x in got["items"]["forget"]] == pytest.approx(ref_f, rel=1e-5)
    assert [x["score"] for x in got["items"]["holdout"]] == pytest.approx(ref_h, rel=1e-5)
    assert got["auc"] == pytest.approx(mb_auc(ref_f, ref_h), abs=1e-12)
    # eval.py: (auc - AUC_RETRAIN[corpus][key]) / AUC_RETRAIN[corpus][key] * 100, constants.py news Min-40%
    scoring = MuseScoring(corpus="news", metrics=["privleak"])
    ref_auc, where = scoring.auc_reference()
    assert ref_auc == 0.47719999999999996 and "constants.py" in where
    summary = evaluate_muse(model, tokenizer, data, scoring, progress=False)
    assert summary["metrics"]["privleak"] == pytest.approx((mb_auc(ref_f, ref_h) - ref_auc) / ref_auc * 100, abs=1e-9)


def test_privleak_matches_open_unlearning(model, tokenizer, muse_dir):
    data = load_muse(muse_dir, "news", ["privleak"])
    forget, holdout = data["privleak/forget"], data["privleak/holdout"]
    got = privleak_eval(model, tokenizer, forget, holdout, OU, k=0.4, batch_size=2)
    ref_f = [ou_min_k(model, tokenizer, t) for t in forget]
    ref_h = [ou_min_k(model, tokenizer, t) for t in holdout]
    assert [x["score"] for x in got["items"]["forget"]] == pytest.approx(ref_f, rel=1e-5)
    summary = evaluate_muse(model, tokenizer, data, MuseScoring(metrics=["privleak"], convention="open-unlearning"),
                            progress=False)
    assert summary["auc_retrain"] == 0.5
    assert summary["metrics"]["privleak"] == pytest.approx(ou_privleak(ref_f, ref_h), abs=1e-6)


def min_k_score(lp, k, at_least_one=False):
    """MUSE's Min-K% (high = unlikely) of one text's token log-probs, through loku.metrics.membership."""
    lp = torch.tensor([lp], dtype=torch.float64)
    return float(-lowest_k_mean(lp, torch.ones_like(lp, dtype=torch.bool), k, at_least_one)[0])


def test_min_k_rounding_of_the_two_conventions():
    lp = [-0.5, -3.0, -1.0, -2.0, -0.1]
    assert min_k_score(lp, 0.4) == pytest.approx(2.5)             # int(2.0) = 2 lowest: -3, -2
    assert min_k_score(lp[:2], 0.4) != min_k_score(lp[:2], 0.4)   # int(0.8) = 0: NaN, as muse_bench
    assert min_k_score(lp[:2], 0.4, at_least_one=True) == 3.0     # OpenUnlearning: max(1, 0)


def test_short_privleak_text_fails_under_muse_bench_only(model, tokenizer):
    short = ["Paris"]                                              # one or two tokens: int(0.4 n) = 0
    with pytest.raises(LokuError, match="too few for Min-40%.*open-unlearning"):
        privleak_eval(model, tokenizer, short, TEXTS[:2], MB)
    assert 0 <= privleak_eval(model, tokenizer, short, TEXTS[:2], OU)["auc"] <= 1


def test_auc_orientation_and_privleak_sign():
    # Min-K% is high for unlikely text. Forget text more likely than holdout (memorized): AUC 0, PrivLeak -100.
    assert auc([0.1, 0.2], [1.0, 2.0]) == 0.0 and privleak(0.0, 0.5) == -100.0
    assert auc([1.0, 2.0], [0.1, 0.2]) == 1.0 and privleak(1.0, 0.5) == 100.0      # over-unlearned
    assert auc([1.0, 2.0], [1.0, 2.0]) == 0.5 and privleak(0.5, 0.5) == 0.0        # as the retrained model
    assert auc([0.3, 0.1], [0.2]) == mb_auc([0.3, 0.1], [0.2]) == 0.5


def test_privleak_of_a_model_that_memorized_its_forget_set(tokenizer):
    """Train a tiny model on the forget texts: they become more likely than the holdout texts, so AUC is
    near 0 and PrivLeak near -100; the holdout side and sign follow muse_bench."""
    model = tiny_llama(len(tokenizer), seed=1)
    forget, holdout = TEXTS[:4], TEXTS[8:12]
    batch = tokenizer(forget, padding=False).input_ids
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        for ids in batch:
            x = torch.tensor([ids])
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    got = privleak_eval(model, tokenizer, forget, holdout, MB)
    assert got["auc"] == 0.0
    assert privleak(got["auc"], 0.47719999999999996) == -100.0
    assert privleak_eval(model, tokenizer, holdout, forget, MB)["auc"] == 1.0   # sides swapped


# ---------------------------------------------------------------- data, runs, CLI
def test_chunk_corpus_covers_every_token(tokenizer):
    chunks = chunk_corpus(TEXTS[:4], tokenizer, max_length=32)
    joined = tokenizer("\n\n".join(TEXTS[:4]), add_special_tokens=False).input_ids
    assert sum(len(tokenizer(c, add_special_tokens=False).input_ids) for c in chunks) == len(joined)
    assert all(len(tokenizer(c).input_ids) <= 32 for c in chunks)


def test_data_dir_or_env_and_limit(muse_dir, monkeypatch):
    a = load_muse(muse_dir, "news", limit=2)
    monkeypatch.setenv("LOKU_DATA", str(muse_dir))
    b = load_muse(None, "news", limit=2)
    assert a.source == b.source == str(muse_dir / "muse" / "news")
    assert a.files == b.files and len(a["verbmem/forget"]) == 2 and len(a["knowmem/forget_qa_icl"]) == 2
    assert len(a["privleak/forget"]) == 2 and len(a["privleak/holdout"]) == 2


def test_hub_path_reads_muse_bench_configs_and_splits(monkeypatch):
    """Without a folder the data comes from muse-bench/MUSE-<Corpus> (muse_bench load_data.py's configs,
    splits and columns); the hub itself is not reached here."""
    import datasets

    calls = []
    tables = {"verbmem": [{"prompt": "p", "gt": "g", "extra": 1}], "knowmem": [{"question": "q", "answer": "a"}],
              "privleak": [{"text": "t1"}, {"text": "t2"}]}

    def fake(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(tables[name])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.delenv("LOKU_DATA", raising=False)
    data = load_muse(None, "books")
    assert data.source == "muse-bench/MUSE-Books" and data["verbmem/forget"] == [{"prompt": "p", "gt": "g"}]
    assert data["privleak/holdout"] == ["t1", "t2"]
    assert sorted(calls) == sorted([("muse-bench/MUSE-Books", "verbmem", "forget")] + [
        ("muse-bench/MUSE-Books", "knowmem", s) for s in ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl")]
        + [("muse-bench/MUSE-Books", "privleak", s) for s in ("forget", "holdout")])


def test_eval_aggregate_and_resume_cli(tiny_model_dir, muse_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["muse", "eval", "--model", tiny_model_dir, "--data-dir", muse_dir, "--out", out, "--limit", "3",
            "--batch-size", "2"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    summary = read_summary(out)
    assert set(summary["metrics"]) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak"}
    assert summary["items"]["privleak"] == 6 and "VerbMem forget" in stdout
    for metric in summary["metrics"]:
        log = json.loads((out / f"{metric}.json").read_text())
        assert log["value"] == summary["metrics"][metric]
    # Against itself as the retrained model: PrivLeak 0, the other numbers unchanged.
    code, stdout, err = run_cli(["muse", "aggregate", out, out, "--json"], capsys)
    agg = json.loads(stdout)
    assert code == 0 and agg["model"]["privleak"] == 0.0 and agg["model"]["verbmem_f"] == summary["metrics"]["verbmem_f"]
    # A killed evaluation resumes: finished metric logs are read back, not recomputed.
    log = json.loads((out / "knowmem_r.json").read_text())
    log["value"] = 12.5
    (out / "knowmem_r.json").write_text(json.dumps(log))
    (out / "muse.json").unlink()
    (out / "privleak.json").unlink()
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    again = read_summary(out)
    assert again["metrics"]["knowmem_r"] == 12.5
    assert again["metrics"]["privleak"] == pytest.approx(summary["metrics"]["privleak"], abs=1e-9)
    # A different scoring cannot be compared.
    other = dict(summary, scoring=dict(summary["scoring"], convention="open-unlearning"))
    with pytest.raises(LokuError, match="same --convention"):
        aggregate(summary, other)


def test_unlearn_cli_end_to_end(tiny_model_dir, muse_dir, tmp_path, capsys):
    scoring = ["--data-dir", muse_dir, "--limit", "2", "--metrics", "verbmem_f,privleak"]
    retrain = tmp_path / "retrain"   # the target itself plays the retrained model: its PrivLeak must be 0
    code, _, err = run_cli(["muse", "eval", "--model", tiny_model_dir, "--out", retrain, *scoring], capsys)
    assert code == 0, err
    out = tmp_path / "un"
    code, stdout, err = run_cli(["muse", "unlearn", "--target", tiny_model_dir, "--out", out, *scoring,
                                 "--methods", "ga,ihl+default", "--epochs", "2", "--max-length", "48",
                                 "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--eval-every-epoch",
                                 "--retrain-eval", retrain], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"ga", "ihl+default"}
    assert results["target"]["privleak"] == 0.0 and results["retrain"]["privleak"] == 0.0
    auc_retrain = read_summary(retrain)["auc"]
    for label, m in results["methods"].items():
        assert [e["epoch"] for e in m["epochs"]] == [1, 2]
        assert m["train_examples"]["forget"] >= 2
        for e in m["epochs"]:
            own = read_summary(out / "runs" / label / "muse" / f"epoch-{e['epoch']}")
            assert e["privleak"] == pytest.approx((own["auc"] - auc_retrain) / auc_retrain * 100)
            assert e["verbmem_f"] == own["metrics"]["verbmem_f"] and np.isfinite(e["verbmem_f"])
    assert (out / "runs" / "ga" / "adapter" / "adapter_model.safetensors").is_file()
    assert "target (before)" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["missing_file", "missing_field", "not_json", "no_corpus", "metric", "convention",
                                  "min_k"])
def test_bad_muse_input_one_line_exit_2_nothing_written(case, tiny_model_dir, model, tokenizer, tmp_path, capsys):
    drop = "knowmem/retain_qa.json" if case == "missing_file" else None
    root = write_muse(tmp_path / "data", model, tokenizer, drop=drop)
    out = tmp_path / "out"
    args = ["muse", "eval", "--model", tiny_model_dir, "--data-dir", root, "--out", out]
    expect = {"missing_file": "retain_qa.json is missing", "missing_field": "has no string field 'gt'",
              "not_json": "is not valid JSON", "no_corpus": "MUSE Books not found: tried ",
              "metric": "did you mean 'privleak'", "convention": "unknown MUSE convention",
              "min_k": "--min-k must be in (0, 1]"}[case]
    if case == "missing_field":
        (root / "muse" / "news" / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "a", "truth": "b"}]))
    elif case == "not_json":
        (root / "muse" / "news" / "privleak" / "holdout.json").write_text("[\"a\", ")
    elif case == "no_corpus":
        args += ["--corpus", "books"]
    elif case == "metric":
        args += ["--metrics", "verbmem_f,privlek"]
    elif case == "convention":
        args += ["--convention", "openunlearning"]
    elif case == "min_k":
        args += ["--min-k", "40"]
    code, _, err = run_cli(args, capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and expect in lines[0], (case, err)
    assert not out.exists()
