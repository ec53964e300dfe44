"""The bad-input matrix: every case runs the real CLI in process and must exit 2 with exactly one stderr
line that names the problem and the fix, no traceback, and nothing written: every file and folder under
the test's sandbox (inputs, model folders, config, Fisher file, output, $LOKU_CACHE) and the shared
tiny model keep their bytes and modes, and absent outputs stay absent.

Simulations (no real read-only mount or full disk in a test):
- read-only output: the parent is chmod 0o555. Root ignores permission bits (os.access says yes, and
  writes succeed), so as root os.access is replaced by one that answers as for the owner: no write bit,
  no write. loku checks writability with os.access before anything heavy, so this is the path it takes.
- full disk: one write raises OSError(ENOSPC) after writing half its bytes, once at the start of a run
  (config.yaml) and once at the end (the adapter); both leave no partial file, and the second run
  continues with --resume after the "disk" is freed.

`pytest -s tests/test_bad_input.py` (or any run: the table bypasses capture) prints the matrix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_tokenizer, tiny_llama
from loku.config import UnlearnConfig
from test_cli import run_cli, write_csv

ROWS: list[tuple[str, object, str]] = []   # (case, exit code, message) for the printed matrix


@pytest.fixture(scope="module", autouse=True)
def matrix(request):
    """Prints the matrix after the module's tests, past pytest's capture (so a plain run shows it too)."""
    yield ROWS
    if not ROWS:
        return
    width = max(len(c) for c, _, _ in ROWS)
    lines = [f"{'case':{width}s} | exit | message", f"{'-' * width}-+------+{'-' * 60}"]
    lines += [f"{case:{width}s} | {code!s:>4} | {msg}" for case, code, msg in ROWS]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n\nbad-input matrix (loku CLI)\n" + "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- sandbox

def snapshot(*roots: Path) -> dict[str, str]:
    """Path -> sha256 of the bytes (files) or 'dir', plus the permission bits: any write shows up."""
    state = {}
    for root in roots:
        for p in sorted([Path(root), *Path(root).rglob("*")]):
            mode = oct(stat.S_IMODE(p.lstat().st_mode))
            state[str(p)] = f"dir {mode}" if p.is_dir() else f"{hashlib.sha256(p.read_bytes()).hexdigest()} {mode}"
    return state


class Sandbox:
    """Files one case needs, all under tmp_path; `args` is a valid `loku unlearn` until a case breaks it."""

    def __init__(self, root: Path, model: Path, monkeypatch):
        self.root, self.model, self.monkeypatch = root, Path(model), monkeypatch
        texts = [f"Person {i} lives at {10 + i} Elm Street and works as a baker in Eastvale." for i in range(8)]
        self.forget = write_csv(root / "forget.csv", texts[:4])
        self.retain = write_csv(root / "retain.csv", texts[4:])
        self.out = root / "out"

    def args(self, *extra, forget=None, retain="default", model=None, out=None, init="default") -> list:
        args = ["unlearn", "--model", model or self.model, "--forget", forget or self.forget]
        if retain is not None:
            args += ["--retain", self.retain if retain == "default" else retain]
        return args + ["--out", out or self.out, "--init", init, "--epochs", "1", *extra]

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def model_copy(self, name: str) -> Path:
        import shutil

        return Path(shutil.copytree(self.model, self.root / name))

    def yaml(self, name: str, **values) -> Path:
        base = dict(model=str(self.model), forget=str(self.forget), retain=str(self.retain), out=str(self.out),
                    init="default", epochs=1)
        return self.file(name, yaml.safe_dump({**base, **values}))


@pytest.fixture()
def box(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LOKU_CACHE", str(tmp_path / "cache"))   # a GGUF case must not write a cache either
    return Sandbox(tmp_path, tiny_model_dir, monkeypatch)


# ------------------------------------------------------------------------------------------- cases
# Each returns the CLI arguments; CASES maps its name to (function, phrase the one stderr line must hold).

def missing_file(b):
    return b.args(forget=b.root / "nope.csv")


def forget_is_a_directory(b):
    (b.root / "data.csv").mkdir()
    return b.args(forget=b.root / "data.csv")


def empty_file(b):
    return b.args(forget=b.file("empty.txt", b""))


def truncated_csv(b):   # cut inside a quoted field
    return b.args(forget=b.file("cut.csv", 'text\n"Person 1 lives at 11 Elm Street,\nand works as a ba'))


def truncated_qa_json(b):
    return b.args(forget=b.file("cut.json", '[{"question": "Where does Ann live?", "answer": "Elm St"}, {"quest'))


def not_utf8(b):
    return b.args(forget=b.file("latin.txt", "caf\xe9 au lait\n".encode("latin-1")))


def unknown_format(b):
    return b.args(forget=b.file("forget.xlsx", b"PK\x03\x04"))


def csv_wrong_columns(b):
    return b.args(forget=b.file("cols.csv", "name,bio\nAnn,Lives at 1 Elm St\n"))


def csv_row_missing_fields(b):
    return b.args(forget=b.file("short.csv", "text,source\nhello world,web\nonly one field\n"))


def csv_unquoted_comma(b):   # would silently cut the text at the comma
    return b.args(forget=b.file("comma.csv", "text\nAnn lives at 1 Elm St, Eastvale\n"))


def jsonl_bad_line(b):
    return b.args(forget=b.file("bad.jsonl", '{"text": "fine"}\n{"text": "cut\n{"text": "fine"}\n'))


def qa_json_missing_answer(b):
    return b.args(forget=b.file("qa.json", json.dumps([{"question": "Q1?", "answer": "A1."},
                                                         {"question": "Where does Ann live?"}])))


def json_not_a_list(b):
    return b.args(forget=b.file("n.json", "42\n"))


def retain_is_the_forget_file(b):   # a new user's slip; with --allow-overlap it would train
    return b.args("--method", "gd", retain=b.forget)


def fila_without_retain(b):   # ga needs no retain set, but FILA's Fisher ratio does
    return b.args("--method", "ga", retain=None, init="fila")


def max_length_over_context(b):   # the tiny model has max_position_embeddings = 256
    return b.args("--max-length", "1024")


def model_missing(b):
    return b.args(model=b.root / "no-such-model")


def model_without_weights(b):
    d = b.model_copy("m")
    (d / "model.safetensors").unlink()
    return b.args(model=d)


def model_truncated_safetensors(b):
    d = b.model_copy("m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return b.args(model=d)


def model_pickle_only(b):
    d = b.model_copy("m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return b.args(model=d)


def model_without_tokenizer(b):
    d = b.model_copy("m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    return b.args(model=d)


def tokenizer_of_another_model(b):   # 512-token tokenizer, 256-row embedding
    d = b.root / "mismatch"
    tiny_llama(256).save_pretrained(d)
    build_tokenizer(512).save_pretrained(d)
    return b.args(model=d)


def corrupt_gguf(b):
    return b.args(model=b.file("model.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 40))


def lora_rank_larger_than_layer(b):   # k_proj is (32, 64)
    return b.args("--lora-rank", "40")


def lora_rank_not_positive(b):
    return b.args("--lora-rank", "-4")


def unknown_target_module(b):
    return ["unlearn", "--config", b.yaml("c.yaml", lora_targets=["qproj", "v_proj"])]


def fisher_file_of_another_model(b):
    from loku.fisher import FisherStats, model_identity, target_weights, weight_of
    from loku.lora import default_target_modules

    from loku.models import load_model

    d = b.root / "finetune"   # same architecture, other weights (e.g. another fine-tune), loaded as loku does
    tiny_llama(512, seed=1).save_pretrained(d)
    build_tokenizer(512).save_pretrained(d)
    other, _ = load_model(str(d))
    mods = target_weights(other, default_target_modules(other))
    forget, retain = ({n: torch.rand(weight_of(m).shape) for n, m in mods.items()} for _ in range(2))
    path = b.root / "fisher.safetensors"
    FisherStats(forget, retain, 10, 10, {"kind": "fila", **model_identity(other, mods)}).save(path)
    return b.args("--fisher-cache", path, init="fila")


def fisher_file_not_safetensors(b):
    path = b.file("fisher.safetensors", b"not a safetensors file at all")
    return b.args("--fisher-cache", path, init="fila")


def yaml_unknown_key(b):
    return ["unlearn", "--config", b.yaml("c.yaml", lora_rnak=4)]


def yaml_invalid(b):
    return ["unlearn", "--config", b.file("c.yaml", "method: ihl\nlora_rank: [4\nepochs: 2\n")]


def yaml_wrong_type(b):
    return ["unlearn", "--config", b.yaml("c.yaml", epochs="five")]


def unknown_method(b):
    return b.args("--method", "ihk")


def out_not_empty(b):
    b.file("out/keep.txt", "precious")
    return b.args()


def out_is_a_file(b):
    return b.args(out=b.file("out.txt", "a file"))


def out_read_only(b):
    parent = b.root / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:   # root writes anyway; answer os.access as for a normal owner (see module doc)
        real = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
                return False
            return real(path, mode, *args, **kwargs)
        b.monkeypatch.setattr(os, "access", access)
    return b.args(out=parent / "run")


def resume_without_checkpoint(b):
    run = b.root / "killed"
    b.file("killed/config.yaml", UnlearnConfig(model=str(b.model), forget=str(b.forget), retain=str(b.retain),
                                               out=str(run), init="default", epochs=1).to_yaml())
    return ["unlearn", "--resume", run]


def resume_not_a_run(b):
    (b.root / "somewhere").mkdir()
    return ["unlearn", "--resume", b.root / "somewhere"]


def resume_damaged_checkpoint(b):
    run = b.root / "killed"
    b.file("killed/config.yaml", UnlearnConfig(model=str(b.model), forget=str(b.forget), retain=str(b.retain),
                                               out=str(run), init="default", epochs=1).to_yaml())
    b.file("killed/checkpoint/state.json", json.dumps({"epoch": 0, "next_step": 1, "global_step": 1, "sums": {},
                                                       "epoch_tokens": 0, "done": False, "history": []}))
    b.file("killed/checkpoint/trainable.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    b.file("killed/checkpoint/training_state.pt", b"")
    return ["unlearn", "--resume", run]


def unknown_prompt_format(b):
    return b.args("--prompt-format", "tofu-phi3")


def chat_format_without_template(b):   # the tiny model's tokenizer has no chat template
    qa = b.file("qa.json", json.dumps([{"question": "Where does Ann live?", "answer": "On Elm Street."}]))
    return b.args("--method", "ga", "--prompt-format", "chat", forget=qa, retain=None)


def method_setting_out_of_range(b):
    return b.args("--method", "wga", "--wga-beta", "-1")


def pdu_without_its_budget(b):
    return b.args("--method", "pdu")


def lunar_without_harmful_prompts(b):
    return b.args("--method", "lunar")


def lunar_harmful_prompts_missing(b):
    return b.args("--method", "lunar", "--lunar-harmful", b.root / "harmful.txt")


def rmu_layer_the_model_lacks(b):   # the tiny model has 2 layers; RMU's default is OpenUnlearning's layer 7
    return b.args("--method", "rmu")


def lmcleaner_without_trajectory(b):
    return b.args("--method", "lmcleaner")


def lmcleaner_trajectory_incomplete(b):
    b.file("trajectory/trajectory.json", '{"format": "loku-trajectory", "version": 1, "steps": []}')
    return b.args("--method", "lmcleaner", "--lmcleaner-trajectory", b.root / "trajectory")


def t3_with_fila(b):
    return b.args("--method", "t3", init="fila")


def tofu_aggregate_missing_file(b):
    return ["tofu", "aggregate", b.root / "eval_log_aggregated.json", b.root / "retain"]


def public_data_not_found(b):
    (b.root / "data").mkdir()   # a data folder without eval/ppl/pile.csv; the pile set has no hub copy
    b.monkeypatch.delenv("LOKU_DATA", raising=False)
    return ["tdec", "utility", "--model", b.model, "--tasks", "pile", "--data-dir", b.root / "data", "--out", b.out]


def public_data_hub_unreachable(b):
    b.monkeypatch.delenv("LOKU_DATA", raising=False)   # no data folder: TOFU from the hub, unreachable offline
    return ["tofu", "eval", "--model", b.model, "--out", b.out, "--limit", "2"]


def muse_data_hub_unreachable(b):
    b.monkeypatch.delenv("LOKU_DATA", raising=False)   # no data folder: MUSE from the hub, unreachable offline
    return ["muse", "eval", "--model", b.model, "--out", b.out, "--corpus", "books"]


def wmdp_data_hub_unreachable(b):
    (b.root / "data" / "wmdp").mkdir(parents=True)   # a data folder without wmdp/wmdp-bio/: the hub, offline
    return ["wmdp", "eval", "--model", b.model, "--out", b.out, "--data-dir", b.root / "data", "--tasks", "wmdp_bio"]


def until_without_unseen(b):
    return b.args("--until", "forgotten")


def unseen_empty(b):
    return b.args("--until", "forgotten", "--unseen", b.file("unseen.csv", "text\n"))


def unseen_missing(b):
    return b.args("--until", "forgotten", "--unseen", b.root / "nope_unseen.csv")


def unseen_of_another_kind(b):
    return b.args("--until", "forgotten", "--unseen", b.file("holdout.json", '[{"question": "Q?", "answer": "A."}]'))


def unseen_without_until(b):
    return b.args("--unseen", b.file("unseen.csv", "text\nNever seen.\n"))


def until_auc_margin_over_half(b):
    return b.args("--until", "forgotten", "--unseen", b.file("unseen.csv", "text\nNever seen.\n"),
                  "--until-auc-margin", "0.7")


def unseen_too_short_for_el10(b):   # checked once the model's tokenizer is loaded: still nothing written
    return b.args("--until", "forgotten", "--unseen", b.file("unseen.csv", "text\nHi.\n"))


UNTIL_CASES = {
    "until_without_unseen": (until_without_unseen, "pass --unseen FILE"),
    "unseen_empty": (unseen_empty, "holds no examples: add at least one row"),
    "unseen_missing": (unseen_missing, "does not exist: check the path"),
    "unseen_of_another_kind": (unseen_of_another_kind, "holds question/answer pairs but the forget set holds plain "
                                                       "text: the never-seen set must be of the same kind"),
    "unseen_without_until": (unseen_without_until, "--unseen belongs to the stop rule: add --until forgotten"),
    "until_auc_margin_over_half": (until_auc_margin_over_half, "at most 0.5, got 0.7"),
}

CASES = {
    "missing_file": (missing_file, "does not exist: check the path"),
    "forget_is_a_directory": (forget_is_a_directory, "is a directory: pass a .csv"),
    "empty_file": (empty_file, "holds no examples: add at least one row"),
    "truncated_csv": (truncated_csv, "is not valid CSV (unexpected end of data)"),
    "truncated_qa_json": (truncated_qa_json, "is not valid JSON"),
    "not_utf8": (not_utf8, "line 1 is not UTF-8: re-encode"),
    "unknown_format": (unknown_format, "unknown data format '.xlsx'"),
    "csv_wrong_columns": (csv_wrong_columns, "has no column 'text' (columns: name, bio): pass --text-column"),
    "csv_row_missing_fields": (csv_row_missing_fields, "row on line 3 has fewer fields than the header"),
    "csv_unquoted_comma": (csv_unquoted_comma, "row on line 2 has more fields than the header"),
    "jsonl_bad_line": (jsonl_bad_line, "line 2 is not valid JSON"),
    "qa_json_missing_answer": (qa_json_missing_answer, "record 2 has 'question' but no 'answer': add the answer"),
    "json_not_a_list": (json_not_a_list, "holds a JSON int, not a list of examples"),
    "retain_is_the_forget_file": (retain_is_the_forget_file, "forget and retain share 4 of the 4 forget examples: "),
    "fila_without_retain": (fila_without_retain, "pass --retain FILE (or use --init default)"),
    "max_length_over_context": (max_length_over_context,
                                "--max-length 1024 is longer than the model's context of 256 tokens"),
    "model_missing": (model_missing, "does not exist: check the path"),
    "model_without_weights": (model_without_weights, "has no weights"),
    "model_truncated_safetensors": (model_truncated_safetensors, "is cut short: it holds"),
    "model_pickle_only": (model_pickle_only, "only pickle weights (pytorch_model.bin): convert it to safetensors, "
                                             "or pass --allow-pickle"),
    "model_without_tokenizer": (model_without_tokenizer, "has no tokenizer"),
    "tokenizer_of_another_model": (tokenizer_of_another_model,
                                   "has 512 token ids but the model's embedding has only 256 rows"),
    "corrupt_gguf": (corrupt_gguf, "cannot read GGUF file"),
    "lora_rank_larger_than_layer": (lora_rank_larger_than_layer, "LoRA rank 40 exceeds layer"),
    "lora_rank_not_positive": (lora_rank_not_positive, "lora-rank must be a positive integer, got -4: pass "
                                                       "--lora-rank 1 or more"),
    "unknown_target_module": (unknown_target_module, "target module 'qproj' is not a linear layer of this model: "
                                                     "choose from down_proj, gate_proj, k_proj"),
    "fisher_file_of_another_model": (fisher_file_of_another_model, "are for another model (its weights differ"),
    "fisher_file_not_safetensors": (fisher_file_not_safetensors, "is not a readable safetensors file"),
    "yaml_unknown_key": (yaml_unknown_key, "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
    "yaml_invalid": (yaml_invalid, "is not valid YAML"),
    "yaml_wrong_type": (yaml_wrong_type, "epochs must be an integer, got 'five': write e.g. `epochs: 5`"),
    "unknown_method": (unknown_method, "unknown method 'ihk': did you mean 'ihl'?"),
    "out_not_empty": (out_not_empty, "is not empty: choose a new --out, or pass --overwrite"),
    "out_is_a_file": (out_is_a_file, "is a file: pass a new directory to --out"),
    "out_read_only": (out_read_only, "(permission denied): choose a writable --out"),
    "resume_without_checkpoint": (resume_without_checkpoint, "has no checkpoint to resume from"),
    "resume_not_a_run": (resume_not_a_run, "is not a loku run directory (no config.yaml)"),
    "resume_damaged_checkpoint": (resume_damaged_checkpoint, "is damaged"),
    "unknown_prompt_format": (unknown_prompt_format, "unknown prompt format 'tofu-phi3': did you mean 'tofu-phi'?"),
    "chat_format_without_template": (chat_format_without_template, "needs a tokenizer with a chat template"),
    "tofu_aggregate_missing_file": (tofu_aggregate_missing_file, "TOFU log"),
    "public_data_not_found": (public_data_not_found, "TDEC utility task pile not found: tried "),
    "public_data_hub_unreachable": (public_data_hub_unreachable, "TOFU split retain_perturbed not found: tried "
                                                                 "--data-dir and $LOKU_DATA (neither given)"),
    "muse_data_hub_unreachable": (muse_data_hub_unreachable, "MUSE Books not found: tried --data-dir and $LOKU_DATA "
                                                             "(neither given); loku's own files; hub dataset "
                                                             "muse-bench/MUSE-Books (verbmem, forget)"),
    "wmdp_data_hub_unreachable": (wmdp_data_hub_unreachable, "/data/wmdp/wmdp-bio (--data-dir); loku's own files; "
                                                             "hub dataset cais/wmdp (wmdp-bio, test)"),
    "method_setting_out_of_range": (method_setting_out_of_range, "wga-beta must be 0 or more, got -1.0: pass e.g. "
                                                                 "--wga-beta 1"),
    "pdu_without_its_budget": (pdu_without_its_budget, "pdu needs --pdu-retain-loss-eps"),
    "lunar_without_harmful_prompts": (lunar_without_harmful_prompts, "lunar needs --lunar-harmful FILE"),
    "lunar_harmful_prompts_missing": (lunar_harmful_prompts_missing, "harmful.txt does not exist: check "
                                                                     "--lunar-harmful"),
    "rmu_layer_the_model_lacks": (rmu_layer_the_model_lacks, "rmu_layer 7 is not a layer of this model (2 decoder "
                                                             "layers): pass --rmu-layer between 0 and 1"),
    "lmcleaner_without_trajectory": (lmcleaner_without_trajectory, "lmcleaner needs --lmcleaner-trajectory DIR"),
    "lmcleaner_trajectory_incomplete": (lmcleaner_trajectory_incomplete, "has no examples.jsonl"),
    "t3_with_fila": (t3_with_fila, "--init fila has nothing to initialise: drop --init"),
    **UNTIL_CASES,
    "unseen_too_short_for_el10": (unseen_too_short_for_el10, "row 1 has"),
}


def one_error_line(code: int, err: str, phrase: str, case: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (case, code, err)
    assert "Traceback" not in err, (case, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
    assert phrase in lines[0], (case, phrase, lines[0])
    assert ": " in lines[0][len("error: "):], (case, "no fix named", lines[0])
    return lines[0][len("error: "):]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, box, tiny_model_dir, capsys):
    make, phrase = CASES[case]
    args = make(box)
    capsys.readouterr()   # what building the case printed (save_pretrained's bars) is not the CLI's
    before = snapshot(box.root, tiny_model_dir)
    code, _, err = run_cli(args, capsys)
    ROWS.append((case, code, err.strip().removeprefix("error: ").replace(str(box.root), "TMP")))
    one_error_line(code, err, phrase, case)
    assert snapshot(box.root, tiny_model_dir) == before, f"{case}: something was written or changed"


def test_a_file_that_is_no_gguf_model_is_refused_before_any_output(box, capsys):
    """Refused from its header, before the "dequantizing ... once" line: stdout stays empty, no cache is written."""
    for name, data in (("empty.gguf", b""), ("text.gguf", b"not a model\n" * 4),
                       ("no_tensors.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 5))):
        code, out, err = run_cli(box.args(model=box.file(name, data)), capsys)
        why = one_error_line(code, err, "cannot read GGUF file", name)
        assert out == "" and ("no GGUF header" in why or "holds no tensors" in why), (name, out, why)
    assert not (box.root / "cache").exists()


# ------------------------------------------------------------------------------------------- full disk

def _enospc(written: Path, data: bytes):
    written.write_bytes(data[: len(data) // 2])   # the disk fills half-way through the file
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(written))


def test_disk_full_at_the_first_write_leaves_no_file(box, capsys):
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(".config.yaml."):   # io.write_text's temporary file for config.yaml
            _enospc(self, text.encode())
        return real(self, text, *args, **kwargs)

    box.monkeypatch.setattr(Path, "write_text", write_text)
    inputs = snapshot(box.forget, box.retain)
    code, _, err = run_cli(box.args("--method", "ga", retain=None), capsys)
    ROWS.append(("disk_full_at_start", code, err.strip().removeprefix("error: ").replace(str(box.root), "TMP")))
    one_error_line(code, err, "no space left on device while writing", "disk_full_at_start")
    assert "then run again" in err
    assert not [p for p in box.out.rglob("*")], "a partial or temporary file was left"
    assert snapshot(box.forget, box.retain) == inputs


def test_disk_full_at_the_end_keeps_no_partial_file_and_resumes(box, capsys):
    from peft import PeftModel

    real = PeftModel.save_pretrained
    with box.monkeypatch.context() as m:
        m.setattr(PeftModel, "save_pretrained",
                  lambda self, d, **kw: _enospc(Path(d) / "adapter_model.safetensors", b"\0" * 4096))
        code, _, err = run_cli(box.args("--method", "ga", retain=None), capsys)
    ROWS.append(("disk_full_at_save", code, err.strip().removeprefix("error: ").replace(str(box.root), "TMP")))
    one_error_line(code, err, "no space left on device while writing", "disk_full_at_save")
    assert f"loku unlearn --resume {box.out}" in err
    names = {p.relative_to(box.out).parts[0] for p in box.out.rglob("*")}
    assert names == {"config.yaml", "metrics.jsonl", "checkpoint"}, names   # no adapter, no temp, no manifest
    assert PeftModel.save_pretrained is real
    code, _, err = run_cli(["unlearn", "--resume", box.out], capsys)   # space freed: the run finishes
    assert code == 0, err
    assert (box.out / "adapter" / "adapter_model.safetensors").is_file() and (box.out / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------- accepted input

def test_sequences_longer_than_the_context_are_truncated(box, capsys):
    """Not an error: examples longer than --max-length are cut to it (a whole document in one CSV cell too,
    beyond the csv module's 128 KiB default field limit)."""
    long = "Ann lives at 1 Elm Street and her phone number is 555 0100. " * 4000   # ~240 KB, ~100k tokens
    forget = write_csv(box.root / "long.csv", [long, "Person 2 lives at 12 Elm Street."])
    code, _, err = run_cli(box.args("--method", "ga", "--max-length", "64", retain=None, forget=forget), capsys)
    ROWS.append(("long_sequences_truncated (ok)", code, "" if code == 0 else err.strip()))
    assert code == 0, err
    assert (box.out / "manifest.json").is_file()

    from loku.data.text import load_examples, tokenize_examples

    feats = tokenize_examples(load_examples(forget), build_tokenizer(), 64)
    assert len(feats[0]["input_ids"]) == 64


def test_yaml_1e_minus_4_is_a_number(box):
    """YAML 1.1 reads `lr: 1e-4` (no dot) as a string; the config takes numeric text for float fields."""
    assert UnlearnConfig.from_yaml(box.file("c.yaml", "lr: 1e-4\nretain_weight: 2\n")).lr == 1e-4


def test_usage_errors_are_one_line(box, capsys):
    code, _, err = run_cli(["unlearn", "--epochs", "five"], capsys)
    one_error_line(code, err, "Invalid value for '--epochs'", "flag_wrong_type")


# ------------------------------------------------------------------------------------------- GGUF cache

def test_interrupted_dequantization_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch, tokenizer):
    """The cache of a dequantized GGUF is used only when complete. A `.tmp-*` folder (a dequantization
    killed before its rename) is never loaded, and removed once stale; an entry without whole weights is
    rebuilt. Dequantization itself is replaced by the tiny model (making a real GGUF needs a tokenizer
    export transformers can read back; `tests/test_models.py` covers the real one)."""
    import loku.models as models

    cache = tmp_path / "cache"
    monkeypatch.setenv("LOKU_CACHE", str(cache))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1))   # a header (version 3, one tensor): a stand-in
    calls = []
    monkeypatch.setattr(models, "_dequantize", lambda path: calls.append(path) or (tiny_llama(len(tokenizer)),
                                                                                   tokenizer))
    st = gguf.stat()
    target = cache / f"tiny-{st.st_size}-{int(st.st_mtime)}"

    # A killed run: a stale complete-looking .tmp- folder and a target whose weights were cut short.
    stale = cache / ".tmp-killed"
    tiny_llama(len(tokenizer)).save_pretrained(stale)
    tokenizer.save_pretrained(stale)
    old = stale.stat().st_mtime - 2 * models.STALE_TMP_S
    os.utime(stale, (old, old))
    fresh = cache / ".tmp-running"   # another process dequantizing right now: left alone
    fresh.mkdir()
    tiny_llama(len(tokenizer)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    w = target / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])

    assert models.resolve_model_path(str(gguf)) == str(target)
    assert calls == [gguf], "a half-written cache entry was used"
    models.check_safetensors(target / "model.safetensors")   # whole now
    assert not stale.exists() and fresh.exists()
    model, _ = models.load_model(str(gguf))
    assert calls == [gguf] and model.config.vocab_size == len(tokenizer)   # the complete entry is reused

    (target / "model.safetensors").unlink()   # an entry missing its weights is rebuilt too
    assert models.resolve_model_path(str(gguf)) == str(target) and len(calls) == 2
    assert sorted(p.name for p in cache.iterdir()) == [".tmp-running", target.name]


def test_model_checks_for_in_memory_models(tokenizer):
    """The checks load_model runs on what it loads, callable on a model handed to the Python API."""
    from loku.errors import LokuError
    from loku.models import check_max_length, check_tokenizer_fits, context_length

    model = tiny_llama(len(tokenizer))
    assert context_length(model) == 256
    check_max_length(model, 256)
    with pytest.raises(LokuError, match=r"--max-length 257 is longer than the model's context of 256 tokens"):
        check_max_length(model, 257)
    check_tokenizer_fits(model, tokenizer)
    with pytest.raises(LokuError, match=r"has 512 token ids but the model's embedding has only 128 rows"):
        check_tokenizer_fits(tiny_llama(128), tokenizer)


# ------------------------------------------------------------------------------------------- settings
# Invalid settings are refused when the config is built: before a model loads, before the Fisher pass.

INVALID_SETTINGS = {
    ("--lora-alpha", "-1"): "lora-alpha must be positive, got -1.0",
    ("--lora-rank", "0"): "lora-rank must be a positive integer, got 0",
    ("--retain-weight", "-1"): "retain-weight must be 0 or more, got -1.0",
    ("--forget-weight", "-0.5"): "forget-weight must be 0 or more, got -0.5",
    ("--npo-beta", "0"): "npo-beta must be positive, got 0.0",
    ("--simnpo-beta", "-4.5"): "simnpo-beta must be positive, got -4.5",
    ("--init", "fisher"): "unknown init 'fisher'",
    ("--kl-reduction", "sum"): "unknown kl reduction 'sum'",
    ("--idk-pooling", "joint"): "unknown idk pooling 'joint'",
    ("--fisher-eps", "0"): "fisher-eps must be positive",
    ("--lr", "-1e-4"): "lr must be positive",
    ("--warmup-steps", "-1"): "warmup-steps must be 0 or more",
    ("--mixed-precision", "fp8"): "unknown mixed precision 'fp8'",
}


@pytest.fixture()
def heavy_calls(monkeypatch):
    """Records model loads and Fisher passes (the Fisher pass stops the run once it is reached)."""
    import loku.fisher
    import loku.models
    from loku.errors import LokuError

    calls, real_load = [], loku.models.load_model

    def load_model(*args, **kwargs):
        calls.append("load_model")
        return real_load(*args, **kwargs)

    def fisher_statistics(*args, **kwargs):
        calls.append("fisher")
        raise LokuError("stopped at the Fisher pass: test")

    monkeypatch.setattr(loku.models, "load_model", load_model)
    monkeypatch.setattr(loku.fisher, "fisher_statistics", fisher_statistics)   # the one place FILA's pass is chosen
    return calls


@pytest.mark.parametrize("flag,value", list(INVALID_SETTINGS))
def test_invalid_settings_refused_before_any_model_loads(flag, value, box, heavy_calls, capsys):
    before = snapshot(box.root)
    code, _, err = run_cli(box.args(flag, value, init="fila" if flag != "--init" else value), capsys)
    one_error_line(code, err, INVALID_SETTINGS[(flag, value)], f"{flag} {value}")
    assert heavy_calls == [], heavy_calls
    assert snapshot(box.root) == before


@pytest.mark.parametrize("case", list(UNTIL_CASES))
def test_until_forgotten_refused_before_any_model_loads(case, box, heavy_calls, capsys):
    make, phrase = UNTIL_CASES[case]
    args = make(box)
    before = snapshot(box.root)
    code, _, err = run_cli(args, capsys)
    one_error_line(code, err, phrase, case)
    assert heavy_calls == [], heavy_calls
    assert snapshot(box.root) == before


def test_valid_settings_reach_the_fisher_pass(box, heavy_calls, capsys):
    """The control: the same run with a valid alpha loads the model and starts the Fisher pass."""
    code, _, err = run_cli(box.args("--lora-alpha", "16", init="fila"), capsys)
    assert code == 2 and "stopped at the Fisher pass" in err
    assert heavy_calls == ["load_model", "fisher"]
