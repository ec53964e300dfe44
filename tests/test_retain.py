"""A forget file is all a user must give: the built-in retain set, and refusing forget/retain overlap."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_csv
from loku.config import UnlearnConfig
from loku.data.records import make_records, record_text
from loku.data.retain import BUILTIN, builtin_retain, general_paragraphs, settle_retain, shared_examples
from loku.errors import LokuError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def forget_file(tmp_path):
    return write_csv(tmp_path / "forget.csv", [record_text(r) for r in make_records(4, seed=5)])


def test_builtin_set_is_clean_general_text_from_the_shipped_wikitext():
    texts = [e["text"] for e in builtin_retain()]
    assert len(texts) == 242 and len(set(texts)) == 242
    assert all(200 <= len(t) <= 600 for t in texts)
    assert not [t for t in texts if "@-@" in t or " , " in t or " ." in t]   # WikiText's tokenization undone
    assert texts[0].startswith("Robert Boulter is an English film, television and theatre actor.")
    notice = (ROOT / "src/loku/data/files/README.md").read_text()
    assert "loku.data.retain" in notice and "CC BY-SA 3.0" in notice


def test_paragraph_selection_and_detokenization():
    raw = (" = Alpha = \r\n \r\n A short line . \r\n"
           " The river , 1 @,@ 200 km long , is n't \" wide \" ( mostly ) . " + "It flows on . " * 60 + "\r\n"
           " = = Section = = \r\n" + " Second paragraph of Alpha is long enough to keep here . " * 5 + "\r\n")
    out = general_paragraphs(raw)
    assert len(out) == 2   # the short line is dropped, the heading skipped
    assert out[0].startswith('The river, 1,200 km long, isn\'t "wide" (mostly). It flows on.')
    assert len(out[0]) <= 600 and out[0].endswith("It flows on.")   # cut after a whole sentence


def test_forget_file_alone_trains_on_builtin_retain_and_records_it(tiny_model_dir, forget_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["unlearn", "--model", tiny_model_dir, "--forget", forget_file, "--method", "ihl",
                                 "--init", "default", "--epochs", "1", "--batch-size", "2", "--out", out], capsys)
    assert code == 0, err
    said = [line for line in stdout.splitlines() if "retain" in line]
    assert len(said) == 1 and said[0].startswith("retain set: none given") and BUILTIN in said[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["retain"] == BUILTIN
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(s["retain"] > 0 for s in steps if s["kind"] == "step")   # a retain term was trained
    # The recorded config reruns with the same retain set, now named rather than chosen.
    again = tmp_path / "again.yaml"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    again.write_text(yaml.safe_dump({**saved, "out": str(tmp_path / "run2")}))
    code, stdout, err = run_cli(["unlearn", "--config", again], capsys)
    assert code == 0, err
    assert "none given" not in stdout
    first = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(l) for l in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [s["retain"] for s in first if s["kind"] == "step"] == [s["retain"] for s in second if s["kind"] == "step"]


def test_api_without_retain_uses_builtin_and_ga_needs_none(tokenizer):
    forget = [{"text": record_text(r)} for r in make_records(3, seed=6)]
    cfg = UnlearnConfig(method="ihl")
    retain = settle_retain(cfg, True, forget, None)
    assert retain == builtin_retain() and cfg.retain == BUILTIN
    cfg = UnlearnConfig(method="ga")
    assert settle_retain(cfg, False, forget, None) is None and cfg.retain is None


def test_shared_examples_count_text_and_qa_up_to_whitespace():
    f = [{"text": "Ann lives at 1 Elm St."}, {"text": "Bo  works\nat Acme."}, {"question": "Q?", "answer": "A."},
         {"text": "only here"}]
    r = [{"text": " Bo works at Acme. "}, {"question": "Q?", "answer": "A."}, {"question": "Q?", "answer": "B."},
         {"text": "Ann lives at 1 Elm St"}]   # no full stop: a different example
    assert shared_examples(f, r) == 2
    assert shared_examples(f, f) == 4


def test_same_file_as_forget_and_retain_refused_unless_allowed(tiny_model_dir, forget_file, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["unlearn", "--model", tiny_model_dir, "--forget", forget_file, "--retain", forget_file, "--init", "default",
            "--epochs", "1", "--batch-size", "2", "--out", out]
    code, _, err = run_cli(base, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: forget and retain share 4 of the 4 forget examples")
    assert "--allow-overlap" in lines[0]
    assert not out.exists()
    code, stdout, err = run_cli(base + ["--allow-overlap"], capsys)
    assert code == 0, err
    assert [l for l in stdout.splitlines() if "share" in l] == [
        "warning: forget and retain share 4 of the 4 forget examples; training on them anyway (--allow-overlap)"]
    assert yaml.safe_load((out / "config.yaml").read_text())["allow_overlap"] is True


def test_allow_overlap_is_a_documented_config_field():
    import dataclasses

    field = next(f for f in dataclasses.fields(UnlearnConfig) if f.name == "allow_overlap")
    assert field.default is False and "share examples" in field.metadata["help"]
    assert UnlearnConfig.from_dict({"allow_overlap": True}).allow_overlap is True
    with pytest.raises(LokuError, match="allow_overlap must be"):
        UnlearnConfig.from_dict({"allow_overlap": "maybe"})
