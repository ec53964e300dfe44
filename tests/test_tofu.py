"""TOFU: data splits, each metric against a slow reference, the official log format, FQ and MU by hand."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import need_shared, tiny_llama
from scipy.stats import hmean, ks_2samp

from loku.data.tofu import SPLITS, format_qa, load_split, scaled_authors
from loku.errors import LokuError
from loku.tofu import LOG_FILES, LOG_KEYS, aggregate, evaluate_set, evaluate_tofu, read_logs, write_logs
from loku.metrics.generate import greedy_answers
from loku.tofu.generate import rouge_recalls
from loku.metrics.extraction import exact_memorization_from_logits, extraction_strength_from_logits
from loku.tofu.logs import EM_KEY, ES_KEY
from loku.tofu.scores import answer_scores

LN = math.log
ROWS = [
    {"question": "Who wrote the book?", "answer": "The author wrote it in Paris.",
     "paraphrased_answer": "It was written in Paris by the author.",
     "perturbed_answer": ["The author wrote it in Rome.", "A fox wrote it.", "Nobody did."]},
    {"question": "What do models do?", "answer": "Models memorize data.",
     "paraphrased_answer": "They memorize some of their training data.",
     "perturbed_answer": ["Dogs are lazy.", "The quick brown fox jumps.", "def main(): return 0"]},
    {"question": "Where?", "answer": "Paris", "paraphrased_answer": "In Paris",
     "perturbed_answer": ["Rome", "Berlin", "Madrid"]},
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


# ---------------------------------------------------------------- metrics against slow references
def test_answer_scores_match_one_unpadded_forward_per_item(tokenizer):
    """Losses against TOFU's get_batch_loss on one unpadded item; ES and EM of the batched pass equal the
    extraction module's functions on that item's own logits."""
    feats = [format_qa(tokenizer, r["question"], a, 200) for r in ROWS for a in (r["answer"], *r["perturbed_answer"])]
    model = tiny_llama(len(tokenizer), seed=2)   # taught the true answers, so ES and EM are not all 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for f in feats[::4]:
            loss = model(torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    got = answer_scores(model, feats, pad_id=0, batch_size=3)
    for f, s, n, es, em in zip(feats, got["loss"], got["tokens"], got["es"], got["em"]):
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
        with torch.no_grad():
            logits = model(ids).logits
        ref = F.cross_entropy(logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")
        assert s == pytest.approx(float(ref), rel=1e-5) and n == int((labels != -100).sum())
        assert es == float(extraction_strength_from_logits(logits, labels[None])[0])
        assert em == float(exact_memorization_from_logits(logits, labels[None])[0])
    assert len(set(got["em"])) > 2 and len(set(got["es"])) > 2 and max(got["es"]) == 1.0   # varied values


def test_batched_greedy_generation_matches_unpadded_single(model, tokenizer):
    prompts = [format_qa(tokenizer, r["question"], "", 200)["input_ids"][:-1] for r in ROWS]  # drop the eos
    budgets = [6, 3, 5]
    got = greedy_answers(model, tokenizer, prompts, budgets, batch_size=3)
    for p, b, g in zip(prompts, budgets, got):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=b, pad_token_id=0)[0, len(p):]
        ref = ref.tolist()
        ref = ref[: ref.index(0)] if 0 in ref else ref  # cut at eos (id 0)
        assert g == ref


def test_rouge_recall_with_stemmer():
    out = rouge_recalls(["the cats sat", "nothing"], ["The cat sat on the mat", "nothing at all"])
    assert out["rougeL_recall"] == pytest.approx([3 / 6, 1 / 3])
    assert out["rouge1_recall"] == pytest.approx([3 / 6, 1 / 3])


def test_evaluate_set_keys_and_definitions(model, tokenizer):
    log = evaluate_set(model, tokenizer, ROWS, "paraphrased_answer", normalized=True, max_new_tokens=4)
    assert list(log) == [*LOG_KEYS, "normalized_gt_loss", ES_KEY, EM_KEY]
    gt = answer_scores(model, [format_qa(tokenizer, r["question"], r["answer"], 200) for r in ROWS], pad_id=0)
    assert list(log[ES_KEY].values()) == gt["es"] and list(log[EM_KEY].values()) == gt["em"]  # of the true answer
    assert all(list(v) == ["0", "1", "2"] for v in log.values())
    for i in log["avg_gt_loss"]:
        assert log["avg_gt_loss"][i] == pytest.approx(log["gt_loss"][i] / log["num_token_gt"][i])
        assert log["avg_paraphrased_loss"][i] == pytest.approx(
            log["paraphrased_loss"][i] / log["num_token_paraphrased"][i])
        avg_p = np.array(log["perturb_loss"][i]) / np.array(log["num_token_perturb"][i])
        assert log["average_perturb_loss"][i] == pytest.approx(list(avg_p))
        assert log["truth_ratio"][i] == pytest.approx(math.exp(log["avg_paraphrased_loss"][i] - avg_p.mean()))
        p, q = math.exp(-log["avg_gt_loss"][i]), np.exp(-avg_p)
        assert log["normalized_gt_loss"][i] == pytest.approx(-math.log(p / (p + q.sum())))
        prompt, generation, truth = log["generated_text"][i]
        assert truth == ROWS[int(i)]["answer"] and prompt.startswith("Question: ")
        assert log["rougeL_recall"][i] == rouge_recalls([generation], [truth])["rougeL_recall"][0]
    # the real-author sets compare against the answer itself: the same forward pass, the same numbers
    same = evaluate_set(model, tokenizer, ROWS, "answer", max_new_tokens=1)
    assert same["avg_paraphrased_loss"] == pytest.approx(same["avg_gt_loss"])


# ---------------------------------------------------------------- aggregation by hand
def _set_log(gt, para, pert, rouge):
    """A minimal TOFU per-item log from per-item avg losses; keys as json.load gives them."""
    idx = [str(i) for i in range(len(gt))]
    return {"avg_gt_loss": dict(zip(idx, gt)), "avg_paraphrased_loss": dict(zip(idx, para)),
            "average_perturb_loss": dict(zip(idx, pert)), "rougeL_recall": dict(zip(idx, rouge))}


def _logs(forget_stats):
    """Retain all 0.5; real authors all 0.25; real world all 0.8; forget r = forget_stats."""
    return {
        "eval_log.json": _set_log([LN(2)] * 2, [0, 0], [[LN(2)] * 3] * 2, [0.25, 0.75]),
        "eval_real_author_wo_options.json": _set_log([LN(2)], [LN(1.5)], [[LN(2)] * 3], [0.25]),
        "eval_real_world_wo_options.json": _set_log([-LN(0.8)], [LN(3)], [[LN(15)] * 3], [0.8]),
        "eval_log_forget.json": _set_log([LN(2), LN(4), LN(4)], [0, 0, 0], [[LN(r)] * 5 for r in forget_stats],
                                         [1.0, 0.5, 0.0]),
    }


def test_aggregate_hand_made_logs():
    out = aggregate(_logs([1, 2, 3]), _logs([4, 5, 6]))
    expect = {"Prob. Retain": 0.5, "ROUGE Retain": 0.5, "Truth Ratio Retain": 0.5,
              "Prob. Real Authors": 0.25, "ROUGE Real Authors": 0.25, "Truth Ratio Real Authors": 0.25,
              "Prob. Real World": 0.8, "ROUGE Real World": 0.8, "Truth Ratio Real World": 0.8,
              "Prob. Forget": 1 / 3, "ROUGE Forget": 0.5, "Truth Ratio Forget": (1 + 1 / 2 + 1 / 3) / 3,
              "Model Utility": 9 / (3 / 0.5 + 3 / 0.25 + 3 / 0.8),
              "Forget Quality": 2 / 20,  # exact KS: all 3 above all 3 happens in 2 of C(6,3) orders
              "KS Test Forget": 1.0}
    for k, v in expect.items():
        assert out[k] == pytest.approx(v), k
    assert aggregate(_logs([1, 2, 3]), _logs([1, 2, 3]))["Forget Quality"] == pytest.approx(1.0)


def test_es_and_em_forget_are_the_forget_logs_means():
    ckpt = _logs([1, 2, 3])
    ckpt["eval_log_forget.json"].update({ES_KEY: {"0": 1.0, "1": 0.5, "2": 0.0},
                                         EM_KEY: {"0": 1.0, "1": 0.2, "2": 0.3}})
    ckpt["eval_log.json"].update({ES_KEY: {"0": 0.0, "1": 0.0}})   # OpenUnlearning reports the forget set only
    out = aggregate(ckpt, _logs([4, 5, 6]))
    assert out["ES Forget"] == pytest.approx(0.5) and out["EM Forget"] == pytest.approx(0.5)
    plain = aggregate(_logs([1, 2, 3]), _logs([4, 5, 6]))
    assert "ES Retain" not in out and out["Model Utility"] == plain["Model Utility"]
    assert "ES Forget" not in plain   # TOFU's own logs have none


def test_ks_and_harmonic_mean_agree_with_scipy_on_stored_arrays():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 3, 40), rng.uniform(0.5, 4, 40)
    ckpt, retain = _logs([1, 2, 3]), _logs([1, 2, 3])
    for logs, r in ((ckpt, a), (retain, b)):
        logs["eval_log_forget.json"] = _set_log([1.0] * 40, [0.0] * 40, [[LN(x)] * 5 for x in r], [0.5] * 40)
    out = aggregate(ckpt, retain)
    assert out["Forget Quality"] == pytest.approx(ks_2samp(a, b).pvalue)
    nine = [v for k, v in out.items() if k.split()[-1] in ("Retain", "Authors", "World")]
    assert len(nine) == 9 and out["Model Utility"] == pytest.approx(hmean(nine))


@pytest.mark.parametrize("damage, message", [
    (lambda c, r: c.pop("eval_real_world_wo_options.json"), "has no 'eval_real_world_wo_options.json'"),
    (lambda c, r: c["eval_log.json"].pop("rougeL_recall"), "has no 'rougeL_recall'"),
    (lambda c, r: r["eval_log_forget.json"].update(_set_log([1.0], [0.0], [[1.0] * 5], [0.0])), "forget items differ"),
    (lambda c, r: c["eval_log.json"]["avg_paraphrased_loss"].pop("1"), "covers items"),
])
def test_aggregate_bad_input_is_one_clear_line(damage, message):
    ckpt, retain = _logs([1, 2, 3]), _logs([4, 5, 6])
    damage(ckpt, retain)
    with pytest.raises(LokuError, match=message) as e:
        aggregate(ckpt, retain)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- log files
def test_evaluate_writes_official_logs_that_read_back(model, tokenizer, tmp_path):
    sets = {name: ROWS[:2] for name in LOG_FILES}
    for name in ("eval_real_author_wo_options.json", "eval_real_world_wo_options.json"):
        sets[name] = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in ROWS[:2]]
    logs = evaluate_tofu(model, tokenizer, sets, tmp_path, max_new_tokens=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*LOG_FILES, "eval_log_aggregated.json"])
    assert read_logs(tmp_path) == logs == read_logs(tmp_path / "eval_log_aggregated.json")
    assert json.loads((tmp_path / "eval_log_forget.json").read_text()) == logs["eval_log_forget.json"]
    (tmp_path / "eval_log_aggregated.json").unlink()
    assert read_logs(tmp_path) == logs  # the four separate files
    assert aggregate(logs, logs)["Forget Quality"] == pytest.approx(1.0)
    with pytest.raises(LokuError, match="has no 'paraphrased_answer'"):
        evaluate_tofu(model, tokenizer, {"eval_log.json": sets["eval_real_world_wo_options.json"]})


def test_write_logs_is_atomic_and_cli_aggregate(tmp_path):
    from typer.testing import CliRunner

    from loku.commands.tofu import app

    write_logs(tmp_path / "ckpt", _logs([1, 2, 3]))
    write_logs(tmp_path / "retain", _logs([4, 5, 6]))
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]
    retain = tmp_path / "retain" / "eval_log_aggregated.json"
    res = CliRunner().invoke(app, ["aggregate", str(tmp_path / "ckpt"), str(retain), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["Forget Quality"] == pytest.approx(0.1)
    res = CliRunner().invoke(app, ["aggregate", str(tmp_path / "ckpt"), str(tmp_path / "retain")])
    assert "Model Utility" in res.output and "Forget Quality" in res.output


# ---------------------------------------------------------------- data
def test_multi_array_json_and_unknown_split(tmp_path):
    (tmp_path / "tofu").mkdir()
    (tmp_path / "tofu" / "full.json").write_text('[{"question": "a", "answer": "b"}]\n'
                                                 '[{"question": "c", "answer": "d"}]\n')
    assert [r["question"] for r in load_split("full", tmp_path)] == ["a", "c"]
    with pytest.raises(LokuError, match="did you mean 'forget10'.*retain_perturbed"):
        load_split("forget_10", tmp_path)
    assert scaled_authors(20, 10) == (18, 2)
    with pytest.raises(LokuError, match="multiple of 100"):
        scaled_authors(20, 1)


def test_tofu_split_sizes_and_nesting():
    d = need_shared("tofu").parent
    sizes = {"full": 4000, "retain90": 3600, "retain95": 3800, "retain99": 3960, "forget01": 40, "forget05": 200,
             "forget10": 400, "retain_perturbed": 400, "real_authors_perturbed": 100, "world_facts_perturbed": 117,
             "holdout01": 40, "holdout10": 400, "idontknow": 100}
    for name, n in sizes.items():
        assert len(load_split(name, d)) == n, name
    full = [(r["question"], r["answer"]) for r in load_split("full", d)]
    forget10 = load_split("forget10", d)
    assert [(r["question"], r["answer"]) for r in forget10] == full[-400:]
    assert len(forget10[0]["perturbed_answer"]) == 5 and "paraphrased_answer" in forget10[0]
    assert [(r["question"], r["answer"]) for r in load_split("retain90", d)] == full[:3600]
    assert [(r["question"], r["answer"]) for r in load_split("retain_perturbed", d)] == full[:400]
    assert set(SPLITS) >= set(sizes)


def test_tofu_author_scaling():
    d = need_shared("tofu").parent
    full = load_split("full", d)
    forget = load_split("forget10", d, authors=20)
    assert len(forget) == 40 and forget == load_split("forget01", d)  # forget10 of 20 authors: the last 2
    assert load_split("retain90", d, authors=20) == full[:360]
    assert load_split("full", d, authors=20, forget="forget10") == full[:360] + full[-40:]
    assert len(load_split("retain_perturbed", d, authors=20)) == 360
    assert len(load_split("real_authors_perturbed", d, authors=20)) == 100


def test_cli_eval_on_tiny_model(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from loku.commands.tofu import app

    d = need_shared("tofu").parent
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(out), "--data-dir", str(d),
                                   "--split", "forget01", "--limit", "2", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    logs = read_logs(out)
    assert sorted(logs) == sorted(LOG_FILES) and all(len(v["avg_gt_loss"]) == 2 for v in logs.values())
    assert "Model Utility" in res.output
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                                   "--data-dir", str(d), "--split", "forget02"])
    assert isinstance(res.exception, LokuError) and not (tmp_path / "x").exists()
