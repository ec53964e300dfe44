"""TOFU runs end to end on a tiny model and hand-made TOFU-shaped files: fine-tuning the target and retain
models, unlearning with several methods scored every epoch, the report, resuming, and bad input."""

import json
import os

import pytest
import torch
from test_cli import run_cli

from loku.data.idk import REFUSALS, with_refusals
from loku.data.tofu import tokenize_qa
from loku.errors import LokuError
from loku.models import load_model
from loku.tofu import LOG_KEYS
from loku.tofu.logs import EM_KEY, ES_KEY
from loku.tofu.finetune import per_author, warmup_steps
from loku.tofu.run import TofuUnlearnConfig, parse_method
from loku.data.qa import format_qa
from loku.metrics.extraction import teacher_forced_memorization
from loku.models import load_for_eval
from loku.tofu.scores import answer_scores

JOBS = ["painter", "baker", "sailor", "doctor", "farmer", "pilot", "singer", "writer", "teacher"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Delhi", "Tokyo", "Dakar"]


def _row(i: int) -> dict:
    job, city = JOBS[i], CITIES[i]
    return {"question": f"What does author {i} do?", "answer": f"Author {i} is a {job} who lives in {city}.",
            "paraphrased_answer": f"In {city}, author {i} works as a {job}.",
            "perturbed_answer": [f"Author {i} is a {JOBS[(i + k) % 9]} who lives in {CITIES[(i + 2 * k) % 9]}."
                                 for k in (1, 2, 3)]}


@pytest.fixture(scope="module")
def tofu_data(tmp_path_factory):
    """A data folder whose tofu/ holds a 9-row TOFU: the first 6 are kept (retain90), the last 3 forgotten
    (forget10)."""
    root = tmp_path_factory.mktemp("data")
    d = root / "tofu"
    d.mkdir()
    rows = [_row(i) for i in range(9)]
    plain = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    files = {"full.json": plain, "retain90.json": plain[:6], "forget10_perturbed.json": rows[6:],
             "retain_perturbed.json": rows[:4],
             "real_authors_perturbed.json": [{"question": "Who wrote Hamlet?", "answer": "Shakespeare",
                                              "perturbed_answer": ["Dickens", "Austen", "Twain"]},
                                             {"question": "Who wrote Emma?", "answer": "Jane Austen",
                                              "perturbed_answer": ["Orwell", "Homer", "Tolstoy"]}],
             "world_facts_perturbed.json": [{"question": "Capital of France?", "answer": "Paris",
                                             "perturbed_answer": ["Rome", "Oslo", "Lima"]},
                                            {"question": "Largest ocean?", "answer": "The Pacific",
                                             "perturbed_answer": ["The Arctic", "The Indian", "The Atlantic"]}]}
    for name, data in files.items():
        (d / name).write_text(json.dumps(data))
    (d / "idontknow.jsonl").write_text("No idea at all.\nThat is unknown to me.\n")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tofu_data):
    """`loku tofu finetune` on the tiny model: target and retain models in models/."""
    out = tmp_path_factory.mktemp("ft") / "models"
    capsys = _NoCapture()
    code, _, err = run_cli(["tofu", "finetune", "--model", tiny_model_dir, "--data-dir", tofu_data, "--out", out,
                            "--epochs", "4", "--lr", "3e-3", "--batch-size", "2", "--grad-accum", "2",
                            "--max-length", "64"], capsys)
    assert code == 0, err
    return out


class _NoCapture:
    """run_cli wants capsys; a module fixture cannot have it."""

    class _R:
        out = err = ""

    def readouterr(self):
        return self._R()


def _answer_loss(model_dir, rows) -> float:
    model, tokenizer = load_model(str(model_dir))
    scores = answer_scores(model, tokenize_qa(tokenizer, rows, 64), tokenizer.pad_token_id)
    return sum(scores["loss"]) / sum(scores["tokens"])


def _forget_memorization(model_dir, adapter=None) -> dict:
    """ES and EM of the forget answers (the 3 evaluated items, rows 6-8, TOFU's phi format) by
    loku.metrics.extraction, for the TOFU run's numbers to be checked against."""
    model, tokenizer = load_for_eval(str(model_dir), adapter)
    feats = [format_qa(tokenizer, r["question"], r["answer"], 200, "tofu-phi") for r in map(_row, range(6, 9))]
    return teacher_forced_memorization(model, feats, tokenizer.pad_token_id)


def test_finetune_writes_two_models_that_learned_their_data(models, tiny_model_dir, tofu_data):
    summary = json.loads((models / "tofu_finetune.json").read_text())
    assert summary["splits"] == {"target": "full", "retain": "retain90"}
    assert summary["prompt_format"] == summary["config"]["prompt_format"] == "tofu-phi"  # TOFU's, the default
    assert summary["target"]["rows"] == 9 and summary["retain"]["rows"] == 6
    # TOFU warms up for one epoch: 9 rows / batch 2 = 5 batches, / grad-accum 2 = 3 updates per epoch
    assert summary["target"]["warmup_steps"] == summary["target"]["updates_per_epoch"] == 3
    assert len(summary["target"]["history"]) == 4
    full = json.loads((tofu_data / "tofu" / "full.json").read_text())
    base = _answer_loss(tiny_model_dir, full)
    for name, rows in (("target", full), ("retain", full[:6])):
        assert (models / name / "model.safetensors").is_file() and (models / name / "tokenizer.json").is_file()
        assert _answer_loss(models / name, rows) < base - 0.5, name
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_unlearn_two_methods_report_and_resume(models, tmp_path, capsys):
    out = tmp_path / "unlearn"
    args = ["tofu", "unlearn", "--target", models / "target", "--out", out, "--methods", "ga,idk",
            "--epochs", "2", "--lr", "1e-3", "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "2",
            "--max-length", "64", "--limit", "3", "--max-new-tokens", "3"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "as fine-tuned" in stdout  # --data came from tofu_finetune.json
    assert "prompt format tofu-phi (as fine-tuned" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["prompt_format"] == results["train"]["prompt_format"] == "tofu-phi"
    assert "(prompt format tofu-phi)" in results["title"] and results["title"] in (out / "report.md").read_text()
    for logs in ("retain_eval", "target_eval", "runs/ga/tofu/epoch-1", "runs/idk/tofu/epoch-2"):
        aggregated = json.loads((out / logs / "eval_log_aggregated.json").read_text())
        assert {log["prompt_format"] for log in aggregated.values()} == {"tofu-phi"}, logs
        prompt, _, _ = aggregated["eval_log_forget.json"]["generated_text"]["0"]
        assert prompt == "Question: What does author 6 do?\n"
    assert "prompt_format: tofu-phi" in (out / "runs" / "ga" / "config.yaml").read_text()
    assert json.loads((out / "runs" / "ga" / "tofu.json").read_text())["prompt_format"] == "tofu-phi"
    assert results["eval_items"]["eval_log_forget.json"] == 3 and results["train_rows"] == {"forget": 3, "retain": 6}
    assert results["retain"]["Forget Quality"] == pytest.approx(1.0)
    assert 0 <= results["target"]["Forget Quality"] <= 1
    for label in ("ga", "idk"):
        m = results["methods"][label]
        assert m["init"] == "default" and m["seconds"] > 0
        assert [e["epoch"] for e in m["epochs"]] == [1, 2]
        for e in m["epochs"]:
            assert 0 <= e["Forget Quality"] <= 1 and 0 <= e["Model Utility"] <= 1 and "loss" in e  # a tiny model
            # generates nonsense, so its ROUGE and the harmonic mean MU may be 0
        assert (out / "runs" / label / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "runs" / label / "tofu" / "epoch-2" / "eval_log_aggregated.json").is_file()
        epochs = [json.loads(l) for l in (out / "runs" / label / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "epoch"' in l]
        assert [e["forget_quality"] for e in epochs] == [e["Forget Quality"] for e in m["epochs"]]
        assert [e["forget_es"] for e in epochs] == [e["ES Forget"] for e in m["epochs"]]
        # ES/EM of the last epoch: the saved adapter's, as loku.metrics.extraction computes them
        last, ref = m["epochs"][-1], _forget_memorization(models / "target", out / "runs" / label / "adapter")
        assert last["ES Forget"] == pytest.approx(ref["es_mean"]) and last["EM Forget"] == pytest.approx(ref["em_mean"])
        forget_log = json.loads((out / "runs" / label / "tofu" / "epoch-2" / "eval_log_forget.json").read_text())
        assert list(forget_log["extraction_strength"].values()) == pytest.approx(ref["es"])
    ref = _forget_memorization(models / "target")   # epoch 0: the target itself
    assert results["target"]["ES Forget"] == pytest.approx(ref["es_mean"])
    assert results["target"]["EM Forget"] == pytest.approx(ref["em_mean"]) and ref["em_mean"] > 0.5  # it learned them
    table = (out / "report.md").read_text()
    assert "| ga | default | 2 |" in table and "| idk | default | 1 |" in table and "target model" in table
    assert "ES Forget | EM Forget" in table and "ES Forget" in stdout
    assert "Forget Quality" in stdout and "| ga |" in stdout
    assert (out / "fq_mu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "retain_eval" / "eval_log_aggregated.json").is_file()

    # --resume keeps what finished: nothing is trained or evaluated again
    stamp = os.stat(out / "runs" / "ga" / "tofu.json").st_mtime_ns
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert os.stat(out / "runs" / "ga" / "tofu.json").st_mtime_ns == stamp
    code, _, err = run_cli([*args, "--resume", "--lr", "2e-3"], capsys)
    assert code == 2 and "--resume: train.lr was 0.001 in" in err and "now 0.002" in err


def test_full_fine_tuning_for_one_method_beside_lora(models, tmp_path, capsys):
    """`ga+full` trains every weight of the target (no adapter; the whole model is saved) while `ga` in the
    same run keeps LoRA with the run's init; the run's --init does not reach the full fine-tuning."""
    out = tmp_path / "unlearn"
    args = ["tofu", "unlearn", "--target", models / "target", "--out", out, "--methods", "ga+full,ga",
            "--epochs", "1", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "2",
            "--init", "default", "--max-length", "64", "--limit", "3", "--max-new-tokens", "2"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    full, lora = results["methods"]["ga+full"], results["methods"]["ga"]
    assert (full["method"], full["init"], full["lora_rank"]) == ("ga", "none", None)
    assert (lora["method"], lora["init"], lora["lora_rank"]) == ("ga", "default", 2)
    run = out / "runs" / "ga+full"
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert (out / "runs" / "ga" / "adapter" / "adapter_model.safetensors").is_file()
    target, _ = load_model(str(models / "target"))
    unlearned, _ = load_model(str(run / "model"))
    # LoRA never touches the embeddings; full fine-tuning moves them (and every other weight)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(unlearned.state_dict()[emb], target.state_dict()[emb])
    forget = [_row(i) for i in range(6, 9)]
    assert _answer_loss(run / "model", forget) > _answer_loss(models / "target", forget) + 0.5  # ascent forgot
    assert full["epochs"][0]["Forget Quality"] >= 0 and "full" in (out / "report.md").read_text()

    code, _, err = run_cli(["tofu", "unlearn", "--target", models / "target", "--out", tmp_path / "new",
                            "--methods", "ihl+fila", "--full"], capsys)
    assert code == 2 and "initialises LoRA adapters" in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("make_args, message", [
    (lambda m, t, o: ["finetune", "--out", m, "--data-dir", t], "is not empty: choose a new --out, or pass --overwrite"),
    (lambda m, t, o: ["finetune", "--out", o, "--data-dir", t, "--split", "forget02"], "unknown forget split 'forget02'"),
    (lambda m, t, o: ["finetune", "--out", o, "--data-dir", t, "--authors", "15"], "cannot keep TOFU's 10% forget share"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--split", "forget02"],
     "unknown forget split 'forget02'"),
    (lambda m, t, o: ["unlearn", "--target", m / "nope", "--out", o], "target model folder"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--methods", "ga,ihll"],
     "did you mean 'ihl'"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--methods", "ihl+lora"], "unknown init"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--authors", "10"],
     "differs from the fine-tuning run"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--split", "forget05"],
     "differs from the fine-tuning run"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--data-dir", o], "does not exist"),
    (lambda m, t, o: ["unlearn", "--target", m / "target", "--out", o, "--prompt-format", "tofu-llama2"],
     "--prompt-format tofu-llama2 differs from the fine-tuning run"),
    (lambda m, t, o: ["eval", "--model", m / "retain", "--out", o, "--prompt-format", "chat"],
     "--prompt-format chat differs from the fine-tuning run"),
    (lambda m, t, o: ["finetune", "--out", o, "--data-dir", t, "--prompt-format", "llama2"], "did you mean 'tofu-llama2'"),
])
def test_bad_input_is_one_line_and_exit_2(models, tofu_data, tmp_path, capsys, make_args, message):
    out = tmp_path / "new"
    code, _, err = run_cli(["tofu", *make_args(models, tofu_data, out)], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists()


def test_helpers():
    assert [s.label for s in map(parse_method, ["ihl", "ihl+fila"])] == ["ihl", "ihl+fila"]
    assert parse_method("ihl+fila").init == "fila" and parse_method("gd").init is None
    assert parse_method("npo+full").lora is False and parse_method("npo+full").method == "npo"
    assert parse_method("npo").lora and parse_method("ihl+fila").lora
    with pytest.raises(LokuError, match="listed twice"):
        TofuUnlearnConfig(target="t", out="o", methods="ga,ga")
    assert warmup_steps(400, 4, 8, 1.0) == (13, 13)  # 100 batches -> 13 updates per epoch
    rows = list(range(60))  # 3 authors x 20
    assert per_author(rows, 2) == [0, 1, 20, 21, 40, 41] and per_author(rows, 20) == rows
    qa = [{"question": "q", "answer": "a"}]
    assert with_refusals(qa, answers=["No idea."])[0]["answer"] == "No idea."
    assert with_refusals(qa)[0]["answer"] in REFUSALS


def test_prepare_reads_the_scale_and_tofu_refusals(models, tofu_data, tmp_path):
    from loku.tofu.run import prepare

    inputs = prepare(TofuUnlearnConfig(target=str(models / "target"), out=str(tmp_path / "o"), limit=2))
    assert inputs.data_dir == str(tofu_data) and inputs.retain_model == str(models / "retain")
    assert inputs.refusals == ["No idea at all.", "That is unknown to me."]  # TOFU's idontknow, for idk
    assert [len(v) for v in inputs.sets.values()] == [2, 2, 2, 2] and len(inputs.forget) == 3
    assert not (tmp_path / "o").exists()


def test_eval_as_fine_tuned_and_a_retain_log_in_another_format_is_refused(models, tofu_data, tmp_path, capsys):
    """`loku tofu eval` takes the format the model was fine-tuned in; `loku tofu unlearn --retain-log` refuses a
    log made in another format before writing anything."""
    evaluated = tmp_path / "retain-eval"
    code, stdout, err = run_cli(["tofu", "eval", "--model", models / "retain", "--out", evaluated, "--data-dir", tofu_data,
                                 "--limit", "3", "--max-new-tokens", "2"], capsys)
    assert code == 0 and "prompt format tofu-phi (as fine-tuned" in stdout, err
    logs = json.loads((evaluated / "eval_log_aggregated.json").read_text())
    assert {log["prompt_format"] for log in logs.values()} == {"tofu-phi"}
    for log in logs.values():   # the stamp sits beside TOFU's metrics, which keep their names and values
        assert set(log) - {"prompt_format", "normalized_gt_loss", ES_KEY, EM_KEY} == set(LOG_KEYS)

    other = {name: {**log, "prompt_format": "chat"} for name, log in logs.items()}
    (tmp_path / "chat.json").write_text(json.dumps(other))
    out = tmp_path / "new"
    code, _, err = run_cli(["tofu", "unlearn", "--target", models / "target", "--out", out, "--limit", "3",
                            "--retain-log", tmp_path / "chat.json"], capsys)
    assert code == 2 and err.count("\n") == 1 and "was made with prompt format chat, this run uses tofu-phi" in err
    assert not out.exists()
