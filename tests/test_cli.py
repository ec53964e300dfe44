"""The CLI end to end in process, YAML round trip, data loading, model loading, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loku.config import UnlearnConfig
from loku.data.records import make_records, record_text
from loku.data.text import load_examples
from conftest import run_cli, write_csv



@pytest.fixture()
def data(tmp_path):
    texts = [record_text(r) for r in make_records(12, seed=2)]
    return write_csv(tmp_path / "forget.csv", texts[:6]), write_csv(tmp_path / "retain.csv", texts[6:])



def test_unlearn_end_to_end(tiny_model_dir, data, tmp_path, capsys):
    forget, retain = data
    out = tmp_path / "run"
    code, stdout, err = run_cli(["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain,
                                 "--method", "ihl", "--init", "default", "--lora-rank", "4", "--epochs", "2",
                                 "--lr", "1e-3", "--batch-size", "4", "--out", out, "--save-merged"], capsys)
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "adapter/adapter_model.safetensors" in manifest["files"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps, epochs = [l for l in lines if l["kind"] == "step"], [l for l in lines if l["kind"] == "epoch"]
    assert len(steps) == 4 and len(epochs) == 2
    assert {"loss", "forget", "retain", "lr", "tokens_per_s"} <= set(steps[0])
    cfg = UnlearnConfig.from_yaml(out / "config.yaml")
    assert cfg.lora_rank == 4 and cfg.lora_alpha == 8.0 and cfg.init == "default" and cfg.lora_targets
    # The adapter loads on the original model with plain peft, and the merged model equals it.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    # Same run from the saved YAML (its out must be new).
    cfg2 = tmp_path / "again.yaml"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["out"] = str(tmp_path / "run2")
    cfg2.write_text(yaml.safe_dump(saved))
    code, _, err = run_cli(["unlearn", "--config", cfg2, "--epochs", "1"], capsys)
    assert code == 0, err
    assert UnlearnConfig.from_yaml(tmp_path / "run2" / "config.yaml").epochs == 1


def test_yaml_round_trip(tmp_path):
    cfg = UnlearnConfig(forget="f.csv", retain="r.csv", method="npo", lora_rank=16, lora_targets=["q_proj"],
                        epochs=3, lr=1e-4, extra={"note": "x"})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert UnlearnConfig.from_yaml(p) == cfg


def test_list_methods(capsys):
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert code == 0
    for name in ("ga", "gd", "kl", "npo", "simnpo", "idk", "ihl"):
        assert any(line.startswith(name) for line in out.splitlines())


def test_python_m_loku_runs():
    r = subprocess.run([sys.executable, "-m", "loku", "list", "methods"], capture_output=True, text=True)
    assert r.returncode == 0 and "ihl" in r.stdout


def test_load_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    assert load_examples(tmp_path / "a.txt") == [{"text": "first line"}, {"text": "second line"}]
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n{"content": "y"}\n')
    assert load_examples(tmp_path / "b.jsonl", "content") == [{"text": "x"}, {"text": "y"}]
    (tmp_path / "c.json").write_text(json.dumps([{"question": "Q?", "answer": "A."}]))
    assert load_examples(tmp_path / "c.json") == [{"question": "Q?", "answer": "A."}]
    (tmp_path / "d.json").write_text('[{"question": "1", "answer": "2"}]\n[{"question": "3", "answer": "4"}]\n')
    assert len(load_examples(tmp_path / "d.json")) == 2  # TOFU's several-arrays-per-file layout


def test_qa_loss_covers_only_the_answer(tokenizer):
    from loku.data.qa import format_qa

    f = format_qa(tokenizer, "Where does Amara live?", "In Eastvale.", 128)
    n_answer = len(tokenizer(" In Eastvale.", add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert sum(l != -100 for l in f["labels"]) == n_answer
    assert f["labels"][-n_answer:] == f["input_ids"][-n_answer:]
    assert tokenizer.decode(f["input_ids"][: len(f["input_ids"]) - n_answer]).startswith("Question:")


def test_local_model_dir_and_pad_token(tiny_model_dir):
    from loku.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    assert tok.pad_token is not None and model.config.pad_token_id is not None


@pytest.mark.parametrize("case", ["missing", "empty", "column", "method", "rank", "nonempty_out", "no_weights",
                                  "retain_is_forget", "bad_yaml_key", "not_utf8", "bad_jsonl"])
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_model_dir, data, tmp_path, capsys):
    forget, retain = data
    out = tmp_path / "out"
    args = ["unlearn", "--model", tiny_model_dir, "--forget", forget, "--retain", retain, "--out", out,
            "--init", "default"]
    expect = {"missing": "does not exist", "empty": "no examples", "column": "no column", "method": "did you mean",
              "rank": "lora-rank must be a positive", "nonempty_out": "not empty", "no_weights": "no weights",
              "retain_is_forget": "forget and retain share 6 of the 6", "bad_yaml_key": "unknown key",
              "not_utf8": "not UTF-8",
              "bad_jsonl": "not valid JSON"}[case]
    if case == "missing":
        args[4] = tmp_path / "nope.csv"
    elif case == "empty":
        args[4] = write_csv(tmp_path / "empty.csv", [])
    elif case == "column":
        args[4] = write_csv(tmp_path / "other.csv", ["a"], column="content")
    elif case == "method":
        args += ["--method", "ihk"]
    elif case == "rank":
        args += ["--lora-rank", "0"]
    elif case == "nonempty_out":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "no_weights":
        bad = tmp_path / "m"
        bad.mkdir()
        (bad / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
        args[2] = bad
    elif case == "retain_is_forget":   # a new user's slip: the same file as both
        args[6] = forget
    elif case == "bad_yaml_key":
        (tmp_path / "c.yaml").write_text("forget: x.csv\nlora_rnak: 4\n")
        args = ["unlearn", "--config", tmp_path / "c.yaml", "--out", out]
    elif case == "not_utf8":
        (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
        args[4] = tmp_path / "latin.txt"
    elif case == "bad_jsonl":
        (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": \n')
        args[4] = tmp_path / "x.jsonl"
    code, stdout, err = run_cli(args, capsys)
    assert code == 2, (case, err)
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and expect in lines[0], (case, err)
    assert "Traceback" not in err
    if case == "nonempty_out":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
