"""WMDP and MMLU through lm-evaluation-harness on tiny local tasks in the hub datasets' format: the harness's
accuracy and log-likelihoods equal loku's own multiple-choice scorer on the same prompts; bad input."""

import json
import shutil

import datasets
import pytest
from conftest import run_cli, tiny_llama

from loku.data.eval_tasks import MultipleChoice
from loku.errors import LokuError
from loku.metrics.reasoning import multiple_choice_results
from loku.wmdp import WmdpEvalConfig, evaluate_wmdp, local_tasks, task_sources

pytest.importorskip("lm_eval")

WORDS = ["the fox", "a lazy dog", "Paris", "machine learning", "the author", "a bank account", "Rome", "data"]
DESCRIPTION = {"wmdp_bio": "biology", "wmdp_cyber": "cybersecurity", "anatomy": "anatomy",
               "astronomy": "astronomy"}


def questions(n, seed):
    return [{"question": f"  Which is {WORDS[(i + seed) % 8]} related to {WORDS[(3 * i + seed) % 8]}? ",
             "choices": [WORDS[(i + j + seed) % 8] for j in range(4)], "answer": (i * 3 + seed) % 4}
            for i in range(n)]


def write(folder, rows, name="test.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(folder / name))
    else:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def wmdp_dir(tmp_path):
    root = tmp_path / "data"
    write(root / "wmdp" / "wmdp-bio", questions(6, 0))
    write(root / "wmdp" / "wmdp-cyber", questions(5, 1), "test-00000-of-00001.parquet")
    write(root / "mmlu" / "anatomy", questions(3, 2))
    write(root / "mmlu" / "astronomy", questions(4, 3))
    write(root / "mmlu" / "astronomy", questions(2, 5), "dev.jsonl")
    write(root / "mmlu" / "anatomy", questions(2, 6), "dev.jsonl")
    return root


def harness_prompt(row):
    """lm-evaluation-harness lm_eval/tasks/wmdp/_default_template_yaml (and mmlu/default/
    _default_template_yaml) doc_to_text; the choices are "A".."D" after target_delimiter " "."""
    c = row["choices"]
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def description(subject):
    """wmdp_bio.yaml / wmdp_cyber.yaml / mmlu_<subject>.yaml description."""
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def reference(model, tokenizer, rows, subject, shots=()):
    """loku's own log-likelihood scorer on the harness's prompts; few-shot examples as the harness joins
    them (first_n sampler, "\\n\\n" between examples, each followed by " " + its letter)."""
    fewshot = "".join(harness_prompt(s) + " " + "ABCD"[s["answer"]] + "\n\n" for s in shots)
    items = [MultipleChoice(description(subject) + fewshot + harness_prompt(r), (" A", " B", " C", " D"), r["answer"])
             for r in rows]
    return multiple_choice_results(model, tokenizer, items, batch_size=4)


def test_harness_accuracy_equals_loku_scorer(tokenizer, wmdp_dir):
    model = tiny_llama(len(tokenizer), seed=4)
    result = evaluate_wmdp(model, tokenizer, WmdpEvalConfig(data_dir=str(wmdp_dir), batch_size=3))["tasks"]
    for task, folder, seed, n in (("wmdp_bio", "wmdp-bio", 0, 6), ("wmdp_cyber", "wmdp-cyber", 1, 5)):
        ref = reference(model, tokenizer, questions(n, seed), DESCRIPTION[task])
        assert [it["acc"] for it in result[task]["items"]] == [r["correct"] for r in ref]
        for it, r in zip(result[task]["items"], ref):
            assert it["loglikelihoods"] == pytest.approx(r["scores"], abs=1e-4)
        assert result[task]["acc"] == pytest.approx(sum(r["correct"] for r in ref) / n)
        assert result[task]["n"] == n
    # MMLU: the group's accuracy is the mean over every question of every subject (weight_by_size).
    per_subject = {s: reference(model, tokenizer, questions(n, seed), s)
                   for s, seed, n in (("anatomy", 2, 3), ("astronomy", 3, 4))}
    mmlu = result["mmlu"]
    assert mmlu["subjects"] == 2 and mmlu["n"] == 7
    for s, ref in per_subject.items():
        assert [it["acc"] for it in mmlu["items"][f"mmlu_{s}"]] == [r["correct"] for r in ref]
    correct = [r["correct"] for ref in per_subject.values() for r in ref]
    assert mmlu["acc"] == pytest.approx(sum(correct) / len(correct))
    assert 0 < sum(correct) < len(correct) or 0 < result["wmdp_bio"]["acc"] < 1   # not a constant answer


def test_mmlu_few_shot_reads_the_local_dev_split(tokenizer, wmdp_dir):
    model = tiny_llama(len(tokenizer), seed=4)
    result = evaluate_wmdp(model, tokenizer, WmdpEvalConfig(data_dir=str(wmdp_dir), tasks=["mmlu"], num_fewshot=1))
    ref = reference(model, tokenizer, questions(4, 3), "astronomy", shots=questions(2, 5)[:1])
    for it, r in zip(result["tasks"]["mmlu"]["items"]["mmlu_astronomy"], ref):
        assert it["loglikelihoods"] == pytest.approx(r["scores"], abs=1e-4)


def test_wmdp_is_zero_shot_only(tokenizer, wmdp_dir):
    with pytest.raises(LokuError, match="--num-fewshot 0"):
        evaluate_wmdp(tiny_llama(len(tokenizer)), tokenizer,
                      WmdpEvalConfig(data_dir=str(wmdp_dir), tasks=["wmdp_bio"], num_fewshot=1))


def test_hub_is_the_last_place_and_runs_the_harness_own_tasks(wmdp_dir, tmp_path, monkeypatch):
    """Where a task's data is not local, loku.data.sources loads its hub dataset (the real load_dataset call,
    replaced here: the hub is out of reach) and the harness's own task runs; local and hub tasks mix."""
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list(questions(2, 0))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("LOKU_DATA", raising=False)
    sources = task_sources(["wmdp_bio", "mmlu"], None)
    assert calls == [("cais/wmdp", "wmdp-bio", "test"), ("cais/mmlu", "abstract_algebra", "test")]
    yamls = tmp_path / "yamls"
    yamls.mkdir()
    assert local_tasks(sources, 0, yamls) == {"wmdp_bio": "wmdp_bio", "mmlu": "mmlu"}
    assert not list(yamls.iterdir())
    shutil.rmtree(wmdp_dir / "mmlu")   # a data folder with wmdp/ only: WMDP from it, MMLU from the hub
    sources = task_sources(["wmdp_bio", "mmlu"], wmdp_dir)
    assert sources["wmdp_bio"].path == wmdp_dir / "wmdp" / "wmdp-bio" and sources["mmlu"].path is None
    assert local_tasks(sources, 0, yamls) == {"wmdp_bio": "loku_wmdp_bio", "mmlu": "mmlu"}
    assert len(calls) == 3


@pytest.mark.parametrize("case", ["no_field", "bad_answer", "no_folder", "no_subject", "task", "no_dev"])
def test_bad_wmdp_input_one_line_exit_2_nothing_written(case, tiny_model_dir, wmdp_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["wmdp", "eval", "--model", tiny_model_dir, "--data-dir", wmdp_dir, "--out", out]
    expect = {"no_field": "row 0 has no field 'answer'", "bad_answer": "row 1 is malformed",
              "no_folder": "WMDP wmdp-cyber not found: tried ", "no_subject": "holds no MMLU subject folder",
              "task": "did you mean 'wmdp_bio'", "no_dev": "has no dev file"}[case]
    if case == "no_field":
        rows = [{k: v for k, v in r.items() if k != "answer"} for r in questions(3, 0)]
        write(wmdp_dir / "wmdp" / "wmdp-bio", rows)
    elif case == "bad_answer":
        rows = questions(3, 0)
        rows[1]["answer"] = 7
        write(wmdp_dir / "wmdp" / "wmdp-bio", rows)
    elif case == "no_folder":
        shutil.rmtree(wmdp_dir / "wmdp" / "wmdp-cyber")
    elif case == "no_subject":
        shutil.rmtree(wmdp_dir / "mmlu")
        (wmdp_dir / "mmlu").mkdir()
    elif case == "task":
        args += ["--tasks", "wmdp_bi"]
    elif case == "no_dev":
        (wmdp_dir / "mmlu" / "anatomy" / "dev.jsonl").unlink()
        args += ["--tasks", "mmlu", "--num-fewshot", "1"]
    code, _, err = run_cli(args, capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and expect in lines[0], (case, err)
    assert not out.exists()


def test_wmdp_eval_cli_writes_results(tiny_model_dir, wmdp_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = run_cli(["wmdp", "eval", "--model", tiny_model_dir, "--data-dir", wmdp_dir, "--out", out,
                                 "--tasks", "wmdp_bio,mmlu", "--limit", "2"], capsys)
    assert code == 0, err
    result = json.loads((out / "wmdp.json").read_text())
    assert set(result["tasks"]) == {"wmdp_bio", "mmlu"}
    assert result["tasks"]["wmdp_bio"]["n"] == 2 and result["tasks"]["mmlu"]["n"] == 4   # 2 per subject
    assert "wmdp_bio: acc" in stdout
