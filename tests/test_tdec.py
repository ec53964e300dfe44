"""TDEC protocol: the stop rule (fake metric sequence and a real memorized tiny model), thresholds as the mean
of per-item values, `loku tdec run/thresholds/utility` end to end on a tiny model, and bad input."""

import csv
import json

import pytest
import torch
from conftest import need_shared, tiny_llama

from loku import UnlearnConfig, unlearn
from conftest import run_cli
from loku.data.records import make_records, record_text
from loku.data.text import tokenize_examples
from loku.errors import LokuError
from loku.finetune import finetune
from loku.metrics.extraction import extraction_likelihood, memorization_accuracy, teacher_forced_memorization
from loku.tdec import (PRESETS, ExtractionMeter, StopWhenForgotten, TdecConfig, Thresholds, compute_thresholds,
                       load_sequences, markdown_table, preset_for, resolve_thresholds, run_tdec, table_row,
                       tdec_markdown, tokenize_sequences)

RECORDS = [record_text(r) for r in make_records(16, seed=11)]
FORGET, HELDOUT = RECORDS[:6], RECORDS[6:12]



def write_csv(path, texts, column="text"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["doc_id", column])
        w.writerows([i, t] for i, t in enumerate(texts))
    return path


def eval_dir(data):
    """A data folder whose eval/ holds two utility tasks (LAMBADA-style completion and a perplexity set)."""
    root = data / "eval"
    (root / "reasoning").mkdir(parents=True)
    (root / "ppl").mkdir()
    (root / "reasoning" / "lambada.csv").write_text("id,text\n0,The quick brown fox jumps over the lazy dog.\n"
                                                     "1,Machine learning models memorize data\n")
    (root / "ppl" / "pile.csv").write_text("doc_id,text,corpus\n0,The quick brown fox.,Pile-CC\n1,def main():,Github\n")
    return data


# ------------------------------------------------------------------ the stop rule

class FakeMeter:
    """Per-epoch (EL, MA) means, as two-item per-item lists; records which epochs it measured."""

    def __init__(self, means):
        self.means, self.calls = list(means), 0

    def __call__(self, model):
        el, ma = self.means[self.calls]
        self.calls += 1
        return {"el": [el - 0.01, el + 0.01], "ma": [ma, ma]}


def test_stop_rule_stops_at_first_epoch_with_both_below(tokenizer):
    th = Thresholds(el=0.05, ma=0.30)
    # epoch 1 neither, 2 only EL, 3 only MA, 4 EL equal to the threshold (not below), 5 both, 6 both again
    meter = FakeMeter([(0.20, 0.90), (0.04, 0.50), (0.10, 0.20), (0.05, 0.10), (0.03, 0.25), (0.01, 0.1)])
    rule = StopWhenForgotten(meter, th)
    cfg = UnlearnConfig(method="ga", epochs=10, lr=1e-3, batch_size=4, init="default")
    res = unlearn(cfg, tiny_llama(len(tokenizer)), tokenizer, callbacks=[rule], progress=False, forget=FORGET[:4])
    assert meter.calls == 5 and res.epochs_run == 5 and res.stopped_early
    assert rule.epochs_to_forget == 5
    assert [r["forgotten"] for r in rule.records] == [False, False, False, False, True]
    assert [h["forgotten"] for h in res.history] == [False, False, False, False, True]
    assert rule.records[1]["el_mean"] == pytest.approx(0.04) and rule.records[1]["el"] == pytest.approx([0.03, 0.05])
    assert res.history[-1]["el10"] == pytest.approx(0.03) and "el" not in res.history[-1]  # means only in history


def test_forgotten_is_strictly_below_except_at_zero():
    th = Thresholds(el=0.05, ma=0.3)
    assert th.forgotten(0.049, 0.29) and not th.forgotten(0.05, 0.29) and not th.forgotten(0.01, 0.3)
    zero = Thresholds(el=0.0, ma=0.3)  # short unseen sequences: EL_10 is often exactly 0
    assert zero.forgotten(0.0, 0.29) and not zero.forgotten(1e-9, 0.29)


def test_stop_rule_never_forgotten_runs_all_epochs(tokenizer):
    rule = StopWhenForgotten(FakeMeter([(0.04, 0.5), (0.1, 0.2)]), Thresholds(0.05, 0.3))
    res = unlearn(UnlearnConfig(method="ga", epochs=2, lr=1e-3, init="default"), tiny_llama(len(tokenizer)),
                  tokenizer, callbacks=[rule], progress=False, forget=FORGET[:2])
    assert res.epochs_run == 2 and not res.stopped_early and rule.epochs_to_forget is None


@pytest.fixture(scope="module")
def memorized(tokenizer):
    """A tiny Llama that has memorized FORGET (and never saw HELDOUT)."""
    model = tiny_llama(len(tokenizer), seed=3)
    feats = tokenize_examples([{"text": t} for t in FORGET], tokenizer, 128)
    finetune(model, feats, tokenizer.eos_token_id, epochs=60, lr=3e-3, batch_size=8, progress=False)
    return model


def test_stop_rule_on_a_memorized_model(memorized, tokenizer):
    import copy

    forget = tokenize_sequences(FORGET, tokenizer, max_tokens=48)
    heldout = tokenize_sequences(HELDOUT, tokenizer, max_tokens=48)
    th = compute_thresholds(memorized, heldout)["thresholds"]
    meter = ExtractionMeter(forget)
    before = meter(memorized)
    assert before["ma_mean"] > th.ma + 0.2 and before["el_mean"] > th.el + 0.2  # memorized, unlike unseen text
    rule = StopWhenForgotten(meter, th)
    cfg = UnlearnConfig(method="ga", epochs=30, lr=3e-3, batch_size=8, init="default", lora_rank=8)
    res = unlearn(cfg, copy.deepcopy(memorized), tokenizer, callbacks=[rule], progress=False,
                  forget=forget.texts(tokenizer))
    assert res.stopped_early and rule.epochs_to_forget == res.epochs_run == len(rule.records)
    last = rule.records[-1]
    assert last["el_mean"] < th.el and last["ma_mean"] < th.ma
    assert not any(r["forgotten"] for r in rule.records[:-1])
    after = meter(res.model)  # the stop rule measured the model the run returns
    assert after["el"] == pytest.approx(last["el"]) and after["ma"] == pytest.approx(last["ma"])
    assert after["es"] == pytest.approx(last["es"]) and last["es_mean"] == pytest.approx(after["es_mean"])


def test_meter_extraction_strength_is_loku_metrics_es_of_each_sequence(memorized, tokenizer):
    """ES from the meter's shared teacher-forced pass (rows of a length together, unpadded) equals
    loku.metrics.extraction's ES of each sequence alone (every token but the first scored)."""
    forget = tokenize_sequences(FORGET, tokenizer, max_tokens=48)
    heldout = tokenize_sequences(HELDOUT, tokenizer, max_tokens=48)
    m = ExtractionMeter(forget)(memorized)
    ref = [teacher_forced_memorization(memorized, [{"input_ids": x, "labels": x}], tokenizer.pad_token_id)["es"][0]
           for x in forget.ids]
    assert m["es"] == pytest.approx(ref, abs=1e-12) and m["es_mean"] == pytest.approx(sum(ref) / len(ref))
    assert m["es_mean"] > ExtractionMeter(heldout)(memorized)["es_mean"] + 0.3  # memorized vs never seen


# ------------------------------------------------------------------ thresholds

def test_thresholds_are_the_mean_of_per_item_values(tokenizer):
    model = tiny_llama(len(tokenizer), seed=5)
    texts = HELDOUT + ["hi", "x"]  # two too short for EL_10: skipped
    seqs = tokenize_sequences(texts, tokenizer, max_tokens=30, skip_short=True)
    assert seqs.skipped == [7, 8] and seqs.rows == list(range(1, 7))
    seqs.ids[0] = seqs.ids[0][:20]  # mixed lengths: grouped into separate (B, T) batches
    out = compute_thresholds(model, seqs, n=10, batch_size=4)
    ma = [float(memorization_accuracy(model, torch.tensor([x]))[0]) for x in seqs.ids]
    el = [float(extraction_likelihood(model, torch.tensor([x]), n=10)[0]) for x in seqs.ids]
    assert out["ma"] == pytest.approx(ma, abs=1e-12) and out["el"] == pytest.approx(el, abs=1e-12)
    assert out["thresholds"].ma == pytest.approx(sum(ma) / len(ma))
    assert out["thresholds"].el == pytest.approx(sum(el) / len(el))


def test_presets_and_resolution():
    assert preset_for("EleutherAI/gpt-neo-125M") == PRESETS["gpt-neo-125m"] == Thresholds(0.0499, 0.2994, 10,
                                                                                         PRESETS["gpt-neo-125m"].source)
    assert preset_for("smollm2-135m") is None
    assert resolve_thresholds(None, 0.1, 0.2, "any", 10) == Thresholds(0.1, 0.2, 10, "given")
    with pytest.raises(LokuError, match="no forgetting thresholds known for model 'smollm2-135m'"):
        resolve_thresholds(None, None, None, "smollm2-135m", 10)
    with pytest.raises(LokuError, match="did you mean 'gpt-neo-125m'"):
        resolve_thresholds("gpt-neo-125", None, None, "x", 10)
    with pytest.raises(LokuError, match="EL_10 but this run measures EL_5"):
        resolve_thresholds("gpt-neo-125m", None, None, "x", 5)
    with pytest.raises(LokuError, match="both --el-threshold and --ma-threshold"):
        resolve_thresholds(None, 0.1, None, "x", 10)


def test_table_layout():
    rows = [table_row("before", el=0.5, ma=0.9, utility={"reasoning_accuracy": 0.4, "pile_ppl": 20.0}),
            table_row("ihl (FILA LoRA r=8)", epochs=None, max_epochs=10, el=0.01, ma=0.2, seconds=12.3)]
    assert markdown_table(rows, seconds=True).splitlines() == [
        "| Method | Epochs | EL10 (%) ↓ | MA (%) ↓ | Reasoning (Acc) ↑ | Dialogue (F1) ↑ | Pile (PPL) ↓ | "
        "Wikitext (PPL) ↓ | Seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| before | - | 50.0 | 90.0 | 40.0 | - | 20.0 | - | - |",
        "| ihl (FILA LoRA r=8) | >10 | 1.0 | 20.0 | - | - | - | - | 12 |"]
    assert markdown_table(rows[:1], extraction=False).splitlines()[2] == "| before | 40.0 | - | 20.0 | - |"
    with_es = [table_row("before", el=0.5, ma=0.9, es=0.75), table_row("ga", epochs=2, el=0.0, ma=0.1)]
    assert markdown_table(with_es).splitlines()[0::2] == [
        "| Method | Epochs | EL10 (%) ↓ | MA (%) ↓ | ES (%) ↓ | Reasoning (Acc) ↑ | Dialogue (F1) ↑ | "
        "Pile (PPL) ↓ | Wikitext (PPL) ↓ |", "| before | - | 50.0 | 90.0 | 75.0 | - | - | - | - |",
        ]
    assert markdown_table(with_es).splitlines()[3] == "| ga | 2 | 0.0 | 10.0 | - | - | - | - | - |"


# ------------------------------------------------------------------ the CLI end to end

def test_cli_thresholds_run_and_utility(tiny_model_dir, tmp_path, capsys):
    forget = write_csv(tmp_path / "forget.csv", FORGET[:4])
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(HELDOUT + ["short"]) + "\n")
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RECORDS[12:]) + "\n")
    data = eval_dir(tmp_path / "data")

    code, out, err = run_cli(["tdec", "thresholds", "--model", tiny_model_dir, "--data", heldout,
                              "--max-tokens", "40", "--out", tmp_path / "th"], capsys)
    assert code == 0, err
    th = json.loads((tmp_path / "th" / "thresholds.json").read_text())
    assert th["count"] == 6 and th["skipped_rows"] == [7] and th["el"] == pytest.approx(sum(th["per_item"]["el"]) / 6)

    run = tmp_path / "run"
    code, out, err = run_cli(["tdec", "run", "--model", tiny_model_dir, "--forget", forget, "--retain", retain,
                              "--method", "ihl", "--init", "default", "--lora-rank", "4", "--epochs", "2",
                              "--lr", "1e-3", "--batch-size", "4", "--max-tokens", "40", "--thresholds",
                              tmp_path / "th", "--tasks", "lambada,pile", "--limit", "2", "--data-dir", data,
                              "--utility-before", "--out", run], capsys)
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["thresholds"]["el"] == th["el"] and report["forget"]["rows"] == [1, 2, 3, 4]
    assert 1 <= report["epochs_run"] <= 2 and len(report["epochs"]) == report["epochs_run"]
    assert len(report["initial"]["el"]) == 4 and all(len(e["ma"]) == 4 and "loss" in e["train"]
                                                     for e in report["epochs"])
    assert report["final"]["ma_mean"] == report["epochs"][-1]["ma_mean"]
    assert report["final"]["es_mean"] == report["epochs"][-1]["es_mean"] and len(report["initial"]["es"]) == 4
    assert set(report["utility"]["tasks"]) == {"lambada", "pile"} and report["utility_before"]["summary"]["pile_ppl"]
    table = (run / "table.md").read_text()
    assert "| before | - |" in table and "| ihl (LoRA r=4) |" in table and "first 2 items per task" in table
    assert "| MA (%) ↓ | ES (%) ↓ |" in table
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "unlearned" / "adapter" / "adapter_model.safetensors").is_file()
    assert "report.json" in json.loads((run / "manifest.json").read_text())["files"]

    code, out, err = run_cli(["tdec", "utility", "--model", tiny_model_dir, "--adapter", run / "unlearned" / "adapter",
                              "--tasks", "pile", "--limit", "2", "--data-dir", data, "--out", tmp_path / "u"], capsys)
    assert code == 0, err
    u = json.loads((tmp_path / "u" / "utility.json").read_text())
    assert u["tasks"]["pile"]["n"] == 2 and u["adapter"].endswith("adapter")
    assert "| Method | Reasoning (Acc) ↑ |" in (tmp_path / "u" / "table.md").read_text()

    code, _, err = run_cli(["tdec", "run", "--model", tiny_model_dir, "--forget", forget, "--out", run,
                            "--el-threshold", "0.1", "--ma-threshold", "0.1", "--no-utility"], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err


def test_nothing_to_unlearn_stops_before_training_unless_forced(tiny_model_dir, tmp_path, capsys):
    """The untrained tiny model never saw the forget records: measured before training, its EL10/MA are below
    GPT-Neo's published thresholds (EL10 4.99 %, MA 29.94 %), so `tdec run` says there is nothing to unlearn,
    trains nothing and exits 0; --force trains anyway (and the stop rule ends after one epoch)."""
    forget = write_csv(tmp_path / "forget.csv", FORGET[:4])
    args = ["tdec", "run", "--model", tiny_model_dir, "--forget", forget, "--method", "ga", "--epochs", "3",
            "--lr", "1e-3", "--max-tokens", "40", "--thresholds", "gpt-neo-125m", "--no-utility"]
    code, out, err = run_cli([*args, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    before, th = report["initial"], report["thresholds"]
    assert before["el_mean"] < th["el"] and before["ma_mean"] < th["ma"] == 0.2994   # measured, not assumed
    assert report["initially_forgotten"] and report["trained"] is False and report["epochs_run"] == 0
    said = [line for line in out.splitlines() if line.startswith("nothing to unlearn")]
    assert len(said) == 1 and f"MA {100 * before['ma_mean']:.2f} % vs 29.94 %" in said[0]
    assert "pass --force to train anyway" in said[0] and said[0] == report["note"]
    assert out.index("nothing to unlearn") > out.index("before: EL10")
    assert not (tmp_path / "run" / "unlearned").exists()
    assert sorted(json.loads((tmp_path / "run" / "manifest.json").read_text())["files"]) == ["report.json"]

    code, out, err = run_cli([*args, "--force", "--out", tmp_path / "forced"], capsys)
    assert code == 0, err
    forced = json.loads((tmp_path / "forced" / "report.json").read_text())
    assert forced["trained"] is True and forced["epochs_run"] == forced["epochs_to_forget"] == 1
    assert forced["initial"] == {**before, "seconds": forced["initial"]["seconds"]}
    assert "--force: training anyway" in out and "nothing to unlearn" not in out
    assert (tmp_path / "forced" / "unlearned" / "adapter" / "adapter_model.safetensors").is_file()


def test_nothing_to_unlearn_leaves_the_model_untouched(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TdecConfig(forget=str(write_csv(tmp_path / "forget.csv", FORGET[:3])), max_tokens=40, el_threshold=0.5,
                     ma_threshold=0.5, utility=False, unlearn=UnlearnConfig(method="ga", epochs=2))
    report = run_tdec(cfg, model, tokenizer, log=lambda s: None)
    assert report["trained"] is False and report["initial"]["ma_mean"] < 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["short", "column", "empty_task", "no_thresholds"])
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_model_dir, tmp_path, capsys):
    texts = FORGET[:3]
    if case == "short":
        texts = [FORGET[0], "Hi there", FORGET[1]]
    forget = write_csv(tmp_path / "forget.csv", texts, column="content" if case == "column" else "text")
    data = eval_dir(tmp_path / "data")
    if case == "empty_task":
        (data / "eval" / "reasoning" / "lambada.csv").write_text("")
    out = tmp_path / "out"
    thresholds = [] if case == "no_thresholds" else ["--el-threshold", "0.05", "--ma-threshold", "0.3"]
    code, stdout, err = run_cli(["tdec", "run", "--model", tiny_model_dir, "--forget", forget, "--method", "ga",
                                 "--tasks", "lambada", "--data-dir", data, "--out", out, *thresholds], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    expected = {"short": "forget.csv row 2 has 4 tokens but EL_10 needs at least 11",
                "column": "has no column 'text' (columns: doc_id, content): pass --text-column",
                "empty_task": "lambada.csv", "no_thresholds": "no forgetting thresholds known for model"}[case]
    assert expected in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------ the real TDEC files (skip without ../shared)

def test_real_forget_file_and_retain(tokenizer):
    path = need_shared("tdec", "forget", "lm_extraction_32_0.csv")
    seqs = load_sequences(path, tokenizer, max_tokens=200)
    assert len(seqs) == 32 and seqs.rows == list(range(1, 33)) and max(map(len, seqs.ids)) == 200
    assert len(load_sequences(path, tokenizer, max_tokens=100, limit=16)) == 16
    wiki = load_sequences(need_shared("tdec", "retain", "wikitext2_test.raw"), tokenizer, limit=5, skip_short=True,
                          min_tokens=50)
    assert len(wiki) == 5 and wiki.skipped and min(map(len, wiki.ids)) >= 50  # headings are skipped


# ------------------------------------------------------------------ Jang et al.'s step: the whole forget set

@pytest.mark.parametrize("full_batch,steps", [(True, 2), (False, 6)])
def test_tdec_run_takes_one_optimizer_step_per_epoch_by_default(full_batch, steps, tokenizer, monkeypatch):
    """Jang et al. (joeljang/knowledge-unlearning) update once per epoch on the whole forget set (batch 32 = the
    32 sequences). 5 sequences in micro-batches of 2 (3 per epoch), 2 epochs: 2 optimizer steps; with
    --no-full-batch a step per micro-batch: 6."""
    counted = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        counted.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(Thresholds, "forgotten", lambda self, el, ma: False)   # every epoch runs
    model = tiny_llama(len(tokenizer))
    cfg = TdecConfig(forget="inline", full_batch=full_batch, max_tokens=30, el_threshold=0.05, ma_threshold=0.3,
                     utility=False, unlearn=UnlearnConfig(method="ga", init="default", epochs=2, batch_size=2))
    monkeypatch.setattr("loku.tdec.run.read_texts", lambda path, column: FORGET[:5])
    report = run_tdec(cfg, model, tokenizer, progress=False, log=lambda s: None)
    assert report["epochs_run"] == 2 and len(counted) == steps
    assert report["optimizer"] == {"full_batch": full_batch, "micro_batch": 2, "grad_accum": 3 if full_batch else 1,
                                   "effective_batch": 5 if full_batch else 2, "steps_per_epoch": steps // 2}
    note = "one step per epoch over all 5 sequences" if full_batch else "a step every 2 sequences"
    assert note in tdec_markdown(report)


def test_tdec_grad_accum_needs_no_full_batch():
    with pytest.raises(LokuError, match="--no-full-batch"):
        TdecConfig(forget="f.csv", unlearn=UnlearnConfig(grad_accum=4))
    assert TdecConfig(forget="f.csv", full_batch=False, unlearn=UnlearnConfig(grad_accum=4)).unlearn.grad_accum == 4
