"""Where public data comes from (loku.data.sources): the data folder given, else $LOKU_DATA, then the files
shipped inside loku, then the Hugging Face hub; one error line naming the data set, the places tried and the fix
when none has it. The hub cannot be reached here (the suite runs with HF_HUB_OFFLINE=1), so the real
`datasets.load_dataset` call is exercised only as far as its failure."""

import hashlib
import re
from pathlib import Path

import datasets
import pytest

from loku.data import sources
from loku.data.eval_tasks import load_task
from loku.data.sources import SHIPPED, WIKITEXT2_TEST, find, tofu_split
from loku.data.tofu import load_split
from loku.errors import LokuError
from loku.tdec import retain_examples, text_file

SRC = Path(__file__).resolve().parents[1] / "src" / "loku"


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("LOKU_DATA", raising=False)


def _tofu_folder(root: Path, question: str) -> Path:
    (root / "tofu").mkdir(parents=True)
    (root / "tofu" / "full.json").write_text(f'[{{"question": "{question}", "answer": "a"}}]')
    return root


def test_order_data_dir_then_env_then_shipped(tmp_path, monkeypatch):
    given, env = _tofu_folder(tmp_path / "given", "from --data-dir"), _tofu_folder(tmp_path / "env", "from env")
    monkeypatch.setenv("LOKU_DATA", str(env))
    assert load_split("full", given)[0]["question"] == "from --data-dir"   # the given folder beats $LOKU_DATA
    assert load_split("full")[0]["question"] == "from env"                 # $LOKU_DATA when none is given
    # a data set the given folder lacks: loku's own copy (TOFU's refusals ship with loku)
    refusals = load_split("idontknow", given)
    assert len(refusals) == 100 and refusals[0] == "I'm not certain about that."
    (env / "tofu" / "idontknow.jsonl").write_text("Mine.\nAlso mine.\n")
    assert load_split("idontknow") == ["Mine.", "Also mine."]              # a data folder's copy beats loku's
    assert find(WIKITEXT2_TEST, given).path == SHIPPED / "tdec" / "retain" / "wikitext2_test.raw"


def test_shipped_wikitext_is_the_retain_set(tmp_path):
    examples = retain_examples()
    assert len(examples) == 2891 and examples[0]["text"] == " = Robert Boulter = "   # the README's count
    own = tmp_path / "mine"
    (own / "tdec" / "retain").mkdir(parents=True)
    (own / "tdec" / "retain" / "wikitext2_test.raw").write_text("first line\n\n second line \n")
    assert retain_examples(own) == [{"text": "first line"}, {"text": " second line "}]


def test_shipped_files_match_their_readme():
    """Every shipped file is listed in files/README.md with its sha256 (byte-exact copies), and pyproject ships
    the folder as package data."""
    readme = (SHIPPED / "README.md").read_text()
    files = [p for p in SHIPPED.rglob("*") if p.is_file() and p.name != "README.md"]
    assert sorted(p.relative_to(SHIPPED).as_posix() for p in files) == ["tdec/retain/wikitext2_test.raw",
                                                                         "tofu/idontknow.jsonl"]
    for p in files:
        row = next(line for line in readme.splitlines() if f"`{p.relative_to(SHIPPED).as_posix()}`" in line)
        assert hashlib.sha256(p.read_bytes()).hexdigest() in row, row
        assert re.search(r"CC BY-SA 3\.0|MIT", row), row
    pyproject = (SRC.parents[1] / "pyproject.toml").read_text()
    assert 'loku = ["data/files/**/*"]' in pyproject


def test_tdec_set_by_name(tmp_path):
    data = tmp_path / "data"
    (data / "tdec" / "forget").mkdir(parents=True)
    (data / "tdec" / "forget" / "lm_extraction_32_0.csv").write_text("text\nhello\n")
    assert text_file("lm_extraction_32_0", data) == data / "tdec" / "forget" / "lm_extraction_32_0.csv"
    assert text_file("lm_extraction_32_0.csv", data) == data / "tdec" / "forget" / "lm_extraction_32_0.csv"
    (tmp_path / "mine.csv").write_text("text\nx\n")
    assert text_file(tmp_path / "mine.csv", data) == tmp_path / "mine.csv"        # a path is a path
    with pytest.raises(LokuError) as e:
        text_file("lm_extraction_32_3", data)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("TDEC forget set lm_extraction_32_3 not found: tried ")
    assert f"{data}/tdec/forget/lm_extraction_32_3.csv (--data-dir)" in msg
    assert "the Hugging Face hub (no copy there)" in msg and "joeljang/knowledge-unlearning" in msg
    assert "pass --data-dir DIR or set LOKU_DATA=DIR" in msg


def test_a_named_folder_that_is_absent_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(LokuError, match=r"data folder .*nowhere \(--data-dir\) does not exist: pass a folder laid "
                                        r"out as tdec/, eval/, tofu/"):
        find(WIKITEXT2_TEST, tmp_path / "nowhere")
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(LokuError, match=r"a.csv \(--data-dir\) is a file, not a folder"):
        find(WIKITEXT2_TEST, tmp_path / "a.csv")
    monkeypatch.setenv("LOKU_DATA", str(tmp_path / "gone"))
    with pytest.raises(LokuError, match=r"gone \(\$LOKU_DATA\) does not exist"):
        find(WIKITEXT2_TEST)


def test_hub_unreachable_is_one_line_naming_set_places_and_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LokuError) as e:
        load_split("forget10", empty)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"TOFU split forget10 not found: tried {empty}/tofu/forget10_perturbed.json (--data-dir); "
                          "loku's own files; hub dataset locuslab/TOFU (forget10, train) (ConnectionError: ")
    assert msg.endswith(": put forget10_perturbed.json under DIR/tofu/ (from hub dataset locuslab/TOFU, or github "
                        "locuslab/tofu) and pass --data-dir DIR or set LOKU_DATA=DIR, or connect to the Hugging "
                        "Face hub")
    with pytest.raises(LokuError, match=r"^TOFU split full not found: tried --data-dir and \$LOKU_DATA \(neither "
                                        r"given\); loku's own files; hub dataset locuslab/TOFU"):
        load_split("full")
    with pytest.raises(LokuError, match=r"task pile not found: .*the Hugging Face hub \(no copy there\)"):
        load_task("pile")


def test_muse_and_wmdp_not_found_is_the_same_one_line(tmp_path):
    """MUSE and WMDP are looked up like every other data set: data folder, loku's files, then the hub."""
    from loku.muse import load_muse
    from loku.wmdp import task_sources

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LokuError) as e:
        load_muse(empty, "news")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"MUSE News not found: tried {empty}/muse/news (--data-dir); loku's own files; hub dataset "
                          "muse-bench/MUSE-News (verbmem, forget) (")
    assert msg.endswith(": put news under DIR/muse/ (from muse_bench's data/, github swj0419/muse_bench "
                        "load_data.py) and pass --data-dir DIR or set LOKU_DATA=DIR, or connect to the Hugging Face hub")
    with pytest.raises(LokuError) as e:
        task_sources(["wmdp_cyber", "mmlu"], empty)
    assert str(e.value).startswith(f"WMDP wmdp-cyber not found: tried {empty}/wmdp/wmdp-cyber (--data-dir); loku's "
                                   "own files; hub dataset cais/wmdp (wmdp-cyber, test) (")
    with pytest.raises(LokuError) as e:
        task_sources(["mmlu"], None)
    msg = str(e.value)
    assert msg.startswith("MMLU not found: tried --data-dir and $LOKU_DATA (neither given); loku's own files; "
                          "hub dataset cais/mmlu (abstract_algebra, test) (")
    assert ": put mmlu under DIR/ (from huggingface-cli download cais/mmlu" in msg and "\n" not in msg


def test_hub_rows_are_read_like_the_local_files(monkeypatch):
    """With no local copy, the rows `datasets.load_dataset(repo, config, split=...)` returns are used. The hub is
    out of reach, so load_dataset is replaced by one returning rows in the hub's published shapes (WikiText: one
    row per line of wiki.test.raw, with its "\\n", the empty lines too; TOFU: the JSON records)."""
    lines = (SHIPPED / "tdec" / "retain" / "wikitext2_test.raw").read_text(encoding="utf-8").splitlines()
    hub = {("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): [{"text": ""}] + [
               {"text": t} for line in lines for t in (line + "\n", "")],
           ("locuslab/TOFU", "full", "train"): [{"question": "Who?", "answer": "Her."}]}
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list(hub[(repo, config, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(sources, "SHIPPED", Path("/nonexistent/loku-files"))   # as if installed without them
    assert retain_examples() == [{"text": line} for line in lines]              # the same examples as the file
    assert load_split("full") == [{"question": "Who?", "answer": "Her."}]
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test"), ("locuslab/TOFU", "full", "train")]
    with pytest.raises(LokuError, match=r"hub dataset locuslab/TOFU \(full, train\) \(not asked\)"):
        find(tofu_split("full", "full.json"), hub=False)
    assert len(calls) == 2


def test_no_product_code_names_the_development_folder():
    """The development data folder is only what tests, CI and benchmarks pass in explicitly."""
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in ("../shared", '"shared"', "shared/data", "LOKU_EVAL_DATA", "eval_data_dir"):
            assert pattern not in text, (path, pattern)
