"""The README's commands, read from README.md and run as a user would: from a folder outside the checkout (a
temporary directory with no ../shared beside it), against a data folder this test writes (the README's DATA,
passed explicitly with --data-dir; $LOKU_DATA unset, the hub out of reach).

What runs differs from the README text only where the real thing would take minutes (all for speed):
- `M` and `smollm2-135m` (also `tofu finetune`'s default model, so given there as `--model`) -> a tiny 2-layer
  Llama; for TDEC, one that first memorized the forget set (as the paper's GPT-Neo models memorized theirs), so
  there is something to unlearn;
- the data folder holds small hand-made files in the public data's layout (4 TDEC sequences per set, 2 items per
  utility task, a 10-author TOFU); WikiText-2 test (the TDEC retain set) is loku's shipped copy;
- TDEC: `run` adds `--epochs 2` (the default 10 epochs take 20 s here: IHL at the README's lr 2e-4 moves the
  tiny memorized model little, so the stop rule does not end the run early);
- TOFU: `finetune --authors 20` adds `--authors 10 --qa-per-author 2 --max-length 64` (the README's 20 authors x
  20 QA is 400 rows; the tiny model's context is 256 tokens); `unlearn` and `eval` add `--epochs 1 --limit 2
  --max-new-tokens 8 --max-length 64`, so `aggregate` reads epoch-1 where the README (5 epochs) reads epoch-5.
Every other flag, path and command is the README's (they run in the README's order: later commands read what
earlier ones wrote), except commands that download a model from the hub (`tofu eval --model
locuslab/tofu_ft_llama2-7b`), which are not run; the MUSE/WMDP section (hub models only) is not run either."""

import json
import re
import shlex
from pathlib import Path

import datasets
import pytest
import torch
from conftest import run_cli, tiny_llama, write_csv

from loku.data.records import make_records, record_text

README = Path(__file__).resolve().parents[1] / "README.md"
RECORDS = [record_text(r) for r in make_records(12, seed=5)]
EXTRA = {  # command -> flags appended (a repeated flag's last value wins); see the module docstring
    ("tdec", "run"): ["--epochs", "2"],
    ("tofu", "finetune"): ["--authors", "10", "--qa-per-author", "2", "--max-length", "64"],
    ("tofu", "unlearn"): ["--epochs", "1", "--limit", "2", "--max-new-tokens", "8", "--max-length", "64"],
    ("tofu", "eval"): ["--limit", "2", "--max-new-tokens", "8"],
}


def hub_model(words: list[str]) -> bool:
    """The command names a hub model (owner/name, not a local runs/ folder or a placeholder)."""
    model = words[words.index("--model") + 1] if "--model" in words else ""
    return "/" in model and not model.startswith("runs/")


def readme_commands(section: str) -> list[list[str]]:
    """The `loku ...` lines of a README section's bash blocks (continuations joined, comments dropped), but
    those that need a hub model."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    part = text[start: text.index("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", part, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("loku ") and not hub_model(shlex.split(line)):
                commands.append(shlex.split(line)[1:])
    return commands


def run_readme(commands, capsys, subst: dict[str, str], renames: tuple = ()) -> list[str]:
    """Run each command in process; returns stdout of each. Asserts exit code 0 with the error shown."""
    outputs = []
    for words in commands:
        args = [subst.get(w, w) for w in words]
        for old, new in renames:
            args = [a.replace(old, new) for a in args]
        args += EXTRA.get(tuple(args[:2]), [])
        code, out, err = run_cli(args, capsys)
        assert code == 0, (args, err[-2000:])
        outputs.append(out)
    return outputs


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A working folder outside the checkout, with no ../shared, no $LOKU_DATA."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("LOKU_DATA", raising=False)
    assert not (work.parent / "shared").exists() and README.parent not in work.parents
    return work


# ------------------------------------------------------------------ the data folder (DATA)

def _save_to_disk(path: Path, rows: list[dict]) -> None:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def write_eval(root: Path) -> None:
    """Every TDEC utility task, 2 items each, in the public files' formats."""
    r, d, p = root / "reasoning", root / "dialogue", root / "ppl"
    for folder in (r, d, p):
        folder.mkdir(parents=True)
    _save_to_disk(r / "piqa", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "kick it", "label": 0},
                               {"goal": "Dry a towel", "sol1": "soak it", "sol2": "hang it in the sun", "label": 1}])
    _save_to_disk(r / "hellaswag", [{"ctx": "A man sits down. he", "endings": [" eats", " flies", " swims", " runs"],
                                     "label": "0"}] * 2)
    arc = {"question": "Which is a fruit?", "choices": {"text": ["apple", "stone", "car", "cloud"],
                                                        "label": ["A", "B", "C", "D"]}, "answerKey": "A"}
    _save_to_disk(r / "arc_easy", [arc, arc])
    _save_to_disk(r / "arc_challenge", [arc, arc])
    _save_to_disk(r / "copa", [{"premise": "It rained.", "choice1": "The street got wet.", "choice2": "The sun rose.",
                                "question": "effect", "label": 0}] * 2)
    _save_to_disk(r / "winogrande", [{"sentence": "Anna gave Maria the book because _ had finished it.",
                                      "option1": "Anna", "option2": "Maria", "answer": "1"}] * 2)
    (r / "lambada.csv").write_text("id,text\n0,The quick brown fox jumps over the lazy dog\n"
                                   "1,Machine learning models memorize data\n")
    (r / "pubmed_qa.csv").write_text("question,abstract,final_decision\nIs it?,We looked.,yes\nReally?,Twice.,no\n")
    (r / "mathqa_test_subset.jsonl").write_text(
        "".join(json.dumps({"Problem": f"{i} + 1 =", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5",
                            "correct": "abcde"[i]}) + "\n" for i in (1, 2)))
    for name in ("wizard_of_wikipedia", "empathetic_dialogues", "blended_skill_talk", "wizard_of_internet"):
        (d / f"{name}.json").write_text(json.dumps({"text": {"0": ["hi", "hello", "how are you", "fine"],
                                                             "1": ["who wrote it", "the author"]}}))
    (p / "pile.csv").write_text("doc_id,text,corpus\n0,The quick brown fox.,Pile-CC\n1,def main():,Github\n")
    (p / "wikitext.csv").write_text(",text\n0, = Valkyria = \n1,The game began development in 2010 .\n")


def write_tofu(root: Path) -> None:
    """A 10-author TOFU in TOFU's shape (20 QA per author, author-major); the last author is forget10's."""
    root.mkdir(parents=True)
    jobs = ["painter", "baker", "sailor", "doctor", "farmer", "pilot", "singer", "writer", "teacher", "miner"]
    rows = [{"question": f"What is fact {q} about author {a}?", "answer": f"Author {a} was a {jobs[(a + q) % 10]}.",
             "paraphrased_answer": f"A {jobs[(a + q) % 10]}, author {a}.",
             "perturbed_answer": [f"Author {a} was a {jobs[(a + q + k) % 10]}." for k in (1, 2, 3)]}
            for a in range(10) for q in range(20)]
    plain = [{"question": x["question"], "answer": x["answer"]} for x in rows]
    general = [{"question": "Who wrote Hamlet?", "answer": "Shakespeare", "perturbed_answer": ["Dickens", "Austen",
                                                                                               "Twain"]}] * 2
    files = {"full.json": plain, "retain90.json": plain[:180], "forget10_perturbed.json": rows[180:],
             "retain_perturbed.json": rows[:20], "real_authors_perturbed.json": general,
             "world_facts_perturbed.json": general}
    for name, data in files.items():
        (root / name).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "tdec" / "forget").mkdir(parents=True)
    for k, texts in ((0, RECORDS[:4]), (1, RECORDS[4:8])):
        write_csv(root / "tdec" / "forget" / f"lm_extraction_32_{k}.csv", texts)
    write_eval(root / "eval")
    write_tofu(root / "tofu")
    return root


@pytest.fixture(scope="module")
def memorized_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama after memorizing lm_extraction_32_0's four sequences (plain Adam on their tokens)."""
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).train()
    ids = [tokenizer(t).input_ids for t in RECORDS[:4]]
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("memorized")
    model.eval().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------ the README's sections

def test_command_line_section(outside, tiny_model_dir, capsys):
    write_csv(outside / "forget.csv", RECORDS[:4])
    write_csv(outside / "retain.csv", RECORDS[4:8])
    commands = readme_commands("Command line")
    assert [c[:2] for c in commands] == [["list", "methods"], ["unlearn", "--model"], ["unlearn", "--config"]]
    out = run_readme(commands, capsys, {"smollm2-135m": str(tiny_model_dir)})
    assert "ihl" in out[0]
    for run in ("first", "again"):
        assert (outside / "runs" / run / "adapter" / "adapter_model.safetensors").is_file()
    assert len((outside / "runs" / "again" / "metrics.jsonl").read_text().splitlines()) > 3


def test_tdec_commands(outside, data_dir, memorized_dir, capsys):
    commands = readme_commands("Benchmarks of the paper")
    tdec = [c for c in commands if c[0] == "tdec"]
    assert [c[1] for c in tdec] == ["thresholds", "run", "utility"]
    run_readme(tdec, capsys, {"M": str(memorized_dir), "DATA": str(data_dir)})
    report = json.loads((outside / "runs" / "tdec-ihl" / "report.json").read_text())
    assert report["trained"] and report["forget"]["path"] == str(data_dir / "tdec/forget/lm_extraction_32_0.csv")
    assert report["initial"]["ma_mean"] > report["thresholds"]["ma"]          # memorized: something to unlearn
    assert report["init"] == "fila" and report["epochs_run"] == 2 and len(report["utility"]["tasks"]) == 15
    where = report["utility"]["settings"]["data"]
    assert all(w.startswith(str(data_dir / "eval")) for w in where.values()), where
    util = json.loads((outside / "runs" / "util" / "utility.json").read_text())
    assert len(util["tasks"]) == 15 and util["adapter"] == "runs/tdec-ihl/unlearned/adapter"


def test_tofu_commands(outside, data_dir, tiny_model_dir, capsys):
    commands = readme_commands("Benchmarks of the paper")
    tofu = [c for c in commands if c[0] == "tofu"]
    assert [c[1] for c in tofu] == ["finetune", "unlearn", "eval", "aggregate"]
    tofu[0] += ["--model", "smollm2-135m"]   # the README relies on the default model, the embedded SmolLM2
    out = run_readme(tofu, capsys, {"DATA": str(data_dir), "smollm2-135m": str(tiny_model_dir)},
                     renames=(("epoch-5", "epoch-1"),))
    results = json.loads((outside / "runs" / "tofu-unlearn" / "results.json").read_text())
    assert sorted(results["methods"]) == sorted(["ga", "gd", "npo", "idk", "ihl", "ihl+fila"])
    assert "as fine-tuned" in out[1] and f"--data-dir {data_dir}" in out[1]
    assert "Forget Quality" in out[3] and "Model Utility" in out[3]
